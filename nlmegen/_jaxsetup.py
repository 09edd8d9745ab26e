"""JAX settings nlmegen needs (64-bit mode, the persistent compilation cache), applied once JAX is imported.

``import nlmegen`` does not import JAX (so ``nlmegen --help`` answers at once); the settings must
still be in place before the first JAX array or compilation. If JAX is already imported they are
applied at once; otherwise a post-import hook on ``sys.meta_path`` applies them right after ``jax``
finishes importing, whoever imports it (nlmegen's own modules or the user), as the eager import did.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

__all__ = ["install"]

_done = False


def cache_dir() -> str | None:
    """nlmegen's compilation cache directory from the environment (see the package docstring): ``None``
    when ``NLMEGEN_CACHE_DIR`` turns it off."""
    setting = os.environ.get("NLMEGEN_CACHE_DIR", "")
    if setting.strip().lower() in ("0", "off", "false", "no"):
        return None
    if setting:
        return setting
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nlmegen", "jax")


def _enable_compilation_cache(jax) -> None:
    """Point JAX's persistent compilation cache at nlmegen's cache directory (see the package docstring)."""
    setting = cache_dir()
    if setting is None or jax.config.jax_compilation_cache_dir:
        return
    try:
        os.makedirs(setting, exist_ok=True)
    except OSError:  # read-only home: run without the cache rather than fail
        return
    jax.config.update("jax_compilation_cache_dir", setting)
    # every compilation is kept, the small ones too: a fit's start values, result tables and
    # standard errors run ~100 small programs (10-30 ms each to compile); loading them from the cache
    # cut a second process's theo_sd fit from 8.8 s to 6.7 s end to end (about 1 MB on disk)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def configure() -> None:
    """Apply the settings to the imported ``jax`` (once per process)."""
    global _done
    if _done:
        return
    _done = True
    jax = sys.modules["jax"]
    if os.environ.get("NLMEGEN_X64", "1") != "0":
        jax.config.update("jax_enable_x64", True)
    _enable_compilation_cache(jax)


class _AfterJax(importlib.abc.MetaPathFinder):
    """Finds ``jax`` as the other finders do and wraps its loader to call `configure` afterwards."""

    def find_spec(self, name, path, target=None):
        if name != "jax":
            return None
        _remove_hook()
        spec = None
        for finder in list(sys.meta_path):  # the finders after this one, in their order
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module):
            run(module)
            configure()

        loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterJax)]


def install() -> None:
    """Configure JAX now if it is imported, else as soon as it is."""
    if "jax" in sys.modules:
        configure()
    elif not any(isinstance(f, _AfterJax) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterJax())
