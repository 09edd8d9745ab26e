"""NUTS transitions in short compiled calls: Ctrl-C is seen within about a second, and a checkpoint
can be written between calls.

`numpyro.infer.MCMC.run` (progress bar off) runs warm-up and sampling as one XLA program, which
Python cannot interrupt: SIGINT waited for the whole run (84 s on a test model). Here NumPyro's own
kernel (``kernel.init`` / ``kernel.sample``, vectorised over chains) is driven by one jitted loop
whose trip count is an argument: each call runs as many transitions as take about
``target_seconds`` (measured), so chunking never recompiles, and, since every transition is the
same compiled body whatever the call it falls in, the draws do not depend on where calls begin
(a resumed run equals an uninterrupted one bit for bit).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..shared import checkpoint
from ..shared.progress import compiling

__all__ = ["Draws", "sample"]

MAX_CALL = 256  # transitions per call at most (the size of the call's output buffer)


@dataclass
class Draws:
    """Post-warm-up draws ``[chain, draw, ...]`` (constrained sites) and sampler statistics."""

    samples: dict
    stats: dict
    compile_s: float
    run_s: float
    interrupted: str | None


def _fields(state, extra: dict) -> dict:
    out = {"z": state.z, "diverging": state.diverging}
    for path in extra:
        value = state
        for part in path.split("."):
            value = getattr(value, part)
        out[path] = value
    return out


def sample(kernel, key, pop, *, num_warmup: int, num_samples: int, num_chains: int, extra: dict, progress: bool,
           target_seconds: float = 0.5) -> Draws:
    """Warm-up and sampling of ``num_chains`` vectorised chains in short calls (see module docstring)."""
    keys = jax.random.split(key, num_chains) if num_chains > 1 else key
    start = time.perf_counter()
    with compiling("the NUTS initialisation", progress):
        state = kernel.init(keys, num_warmup, init_params=None, model_args=(pop,), model_kwargs={})
    init_s = time.perf_counter() - start
    total = num_warmup + num_samples
    shapes = jax.eval_shape(lambda s: _fields(s, extra), state)

    def run(state, n, pop):
        buffer = jax.tree_util.tree_map(lambda s: jnp.zeros((MAX_CALL, *s.shape), s.dtype), shapes)

        def body(i, carry):
            st, buf = carry
            st = kernel.sample(st, (pop,), {})
            return st, jax.tree_util.tree_map(lambda b, v: b.at[i].set(v), buf, _fields(st, extra))

        return jax.lax.fori_loop(0, n, body, (state, buffer))

    start = time.perf_counter()
    with compiling(f"the NUTS sampler ({num_chains} chain{'s' if num_chains > 1 else ''})", progress):
        compiled = jax.jit(run).lower(state, jnp.int32(1), pop).compile()
    compile_s = time.perf_counter() - start + init_s
    done, kept, stopped = 0, [], None
    saved = checkpoint.restored("nuts")
    if saved is not None:  # resume: the chains' state (adaptation, key) and the draws of the checkpoint
        state = jax.tree_util.tree_map(lambda like, x: jnp.asarray(x, like.dtype) if isinstance(x, np.ndarray)
                                       else x, state, saved["state"])
        done, kept = int(saved["done"]), list(saved["kept"])
    bar = tqdm(total=total, initial=done, desc="nuts", unit="it", disable=not progress, leave=False)
    start, n = time.perf_counter(), 1
    try:
        while done < total:
            n = min(n, total - done, MAX_CALL)
            tick = time.perf_counter()
            new_state, buf = compiled(state, jnp.int32(n), pop)
            buf = jax.tree_util.tree_map(lambda b: np.asarray(b[:n]), buf)  # noqa: B023 (waits for the call)
            first = max(num_warmup - done, 0)  # draws after warm-up only
            if first < n:
                kept.append(jax.tree_util.tree_map(lambda b: b[first:], buf))  # noqa: B023
            state, done = new_state, done + n
            checkpoint.save("nuts", n, 100, lambda: {"state": state, "done": done, "kept": kept})  # noqa: B023
            bar.update(n)
            elapsed = max(time.perf_counter() - tick, 1e-4)
            n = int(np.clip(n * target_seconds / elapsed, 1, 2 * n))  # about target_seconds per call
    except KeyboardInterrupt:
        if not kept:
            raise  # still warming up: no draws to return
        stopped = f"after {sum(len(part['diverging']) for part in kept)} of {num_samples} draws (warm-up done)"
    finally:
        bar.close()
    run_s = time.perf_counter() - start
    merged = {k: np.concatenate([part[k] for part in kept]) for k in kept[0] if k != "z"}
    z = {site: np.concatenate([part["z"][site] for part in kept]) for site in kept[0]["z"]}
    post = kernel.postprocess_fn((pop,), {})
    if num_chains > 1:  # [draw, chain, ...] -> [chain, draw, ...]
        samples = jax.jit(jax.vmap(jax.vmap(post)))(z)
        samples = {k: np.swapaxes(np.asarray(v), 0, 1) for k, v in samples.items()}
        merged = {k: np.swapaxes(v, 0, 1) for k, v in merged.items()}
    else:
        samples = {k: np.asarray(v)[None] for k, v in jax.jit(jax.vmap(post))(z).items()}
        merged = {k: v[None] for k, v in merged.items()}
    return Draws(samples, merged, compile_s, run_s, stopped)
