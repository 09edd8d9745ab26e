"""Long fits that survive interruption: checkpoints written during a fit, `resume` from one.

``nlmegen.fit(..., checkpoint="run.ckpt")`` opens a `session` around the backend's ``fit``; each
iterative backend calls `save` at the end of a unit of work (a BFGS iteration, a compiled chunk of
SAEM iterations, of SVI steps or of NUTS transitions) and `restored` once at its start. A saved
state holds everything the backend's loop carries (iterate, random key, optimiser or sampler
state, what was recorded so far), so `resume` continues the loop exactly where it stopped: the
same key gives the same result, bit for bit, as a run that was never stopped.

A checkpoint file is a pickle of plain NumPy arrays and Python containers, written to a unique
temporary file in the same folder and renamed over the old one (`os.replace`, atomic on POSIX and
Windows): a crash while writing leaves the previous checkpoint intact. The model is stored by
reference (a module-level function pickles as its import path); a model that cannot be pickled (a
lambda, a closure) must be passed to `resume` again.

Ctrl-C (``KeyboardInterrupt``) during a fit is caught by each iterative backend, which returns
the state it had reached as a `FitResult` with status ``"interrupted"`` (see `interrupted_note`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import jax
import numpy as np

__all__ = ["FORMAT", "Session", "load", "restored", "resume", "save", "session"]

FORMAT = "nlmegen-checkpoint-1"
INTERRUPTED = "interrupted"


@dataclass
class Session:
    """Checkpoint settings of one fit, and the state it resumes from (None for a fresh fit)."""

    path: str | None
    every: int | None
    meta: dict
    state: dict | None = None
    units: int = field(default=0)  # units of work done since the last write

    def wants(self, units: int, default: int) -> bool:
        """Count ``units`` of work done; True when a checkpoint is due (every ``every`` units)."""
        if self.path is None:
            return False
        self.units += units
        if self.units >= (self.every or default):
            self.units = 0
            return True
        return False


_SESSION: contextvars.ContextVar[Session | None] = contextvars.ContextVar("nlmegen_checkpoint", default=None)


@contextlib.contextmanager
def session(path, every: int | None, meta: dict, state: dict | None = None) -> Iterator[Session]:
    """Checkpoint the fit run inside the block to ``path`` (None: no file), resuming from ``state``."""
    if every is not None and int(every) < 1:
        raise ValueError(f"checkpoint_every must be a positive number of iterations, not {every!r}")
    current = Session(None if path is None else os.fspath(path), None if every is None else int(every), meta, state)
    token = _SESSION.set(current)
    try:
        yield current
    finally:
        _SESSION.reset(token)


def restored(method: str) -> dict | None:
    """The saved loop state a backend resumes from (None: start afresh); consumed by the first call."""
    current = _SESSION.get()
    if current is None or current.state is None:
        return None
    state, current.state = current.state, None
    if state.get("method") != method:
        raise ValueError(f"this checkpoint holds the state of a {state.get('method')!r} fit, not {method!r}")
    return state


def save(method: str, units: int, default_every: int, make_state) -> None:
    """After ``units`` units of work: write ``make_state()`` (a dict of arrays) when a checkpoint is due."""
    current = _SESSION.get()
    if current is None or not current.wants(units, default_every):
        return
    state = {"method": method, **make_state()}
    write(current.path, {"format": FORMAT, "meta": to_host(current.meta), "state": to_host(state)})


# ------------------------------------------------------------------------------- files
def write(path: str, payload: dict) -> None:
    """Pickle ``payload`` to ``path`` atomically (unique temporary file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            pickle.dump(payload, handle, protocol=pickle.HIGHEST_PROTOCOL)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load(path) -> dict:
    """The payload of a checkpoint file (``format``, ``meta``, ``state``); arrays back on the device."""
    with open(path, "rb") as handle:
        payload = pickle.load(handle)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not an nlmegen checkpoint (format {FORMAT!r})")
    payload["state"] = from_host(payload["state"])
    payload["meta"] = from_host(payload["meta"])
    return payload


@dataclass(frozen=True)
class _Key:
    """A typed PRNG key stored as its raw data and implementation name."""

    data: np.ndarray
    impl: str


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_host(tree):
    """Arrays of ``tree`` as NumPy (typed keys as `_Key`), for pickling."""
    def leaf(x):
        if _is_key(x):
            return _Key(np.asarray(jax.random.key_data(x)), str(jax.random.key_impl(x)))
        return np.asarray(x) if isinstance(x, jax.Array) else x
    return jax.tree_util.tree_map(leaf, tree)


def from_host(tree):
    """Inverse of `to_host`: `_Key` back to typed keys, NumPy arrays to JAX arrays of the same dtype."""
    def leaf(x):
        if isinstance(x, _Key):
            return jax.random.wrap_key_data(jax.numpy.asarray(x.data), impl=x.impl)
        return x
    return jax.tree_util.tree_map(leaf, tree, is_leaf=lambda x: isinstance(x, _Key))


def _picklable(obj) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # lambdas, closures, local classes
        return False
    return True


def meta_for(model, pop, backend, init, fixed, key) -> dict:
    """What `resume` needs to rebuild a fit; the model only when it pickles (by reference)."""
    return {"model": model if _picklable(model) else None, "pop": pop, "backend": backend,
            "init": None if init is None else dict(init), "fixed": None if fixed is None else dict(fixed),
            "key": key}


def resume(path, *, model=None, pop=None, checkpoint_every: int | None = None):
    """Continue the fit saved in the checkpoint ``path`` and return its `FitResult`.

    The fit goes on from the last checkpoint with the settings, data, starting values and key it
    was started with (and keeps writing checkpoints to ``path``), so the result equals, bit for bit,
    that of the same fit never interrupted. ``model`` must be given when the checkpoint could not
    store it (a lambda or closure); ``pop`` only to replace the stored population by an equal one.

    Examples
    --------
    >>> import jax, nlmegen, tempfile, os
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> path = os.path.join(tempfile.mkdtemp(), "run.ckpt")
    >>> svi = nlmegen.SVI(num_steps=100, num_draws=50, progress=False)
    >>> fit = nlmegen.fit(nlmegen.examples.theo_model, pop, svi, key=jax.random.key(0), checkpoint=path)
    >>> again = nlmegen.resume(path)  # the finished run's last checkpoint: nothing left to do
    >>> bool((again.draws["tcl"] == fit.draws["tcl"]).all())
    True
    """
    payload = load(path)
    meta = payload["meta"]
    model = meta["model"] if model is None else model
    if model is None:
        raise ValueError(f"the checkpoint {os.fspath(path)!r} does not hold the model (it could not be pickled: a "
                         "lambda or closure); pass it: nlmegen.resume(path, model=...)")
    pop = meta["pop"] if pop is None else pop
    backend = meta["backend"]
    with session(path, checkpoint_every, meta, payload["state"]):
        return backend.fit(model, pop, init=meta["init"], fixed=meta["fixed"], key=meta["key"])


def mark_interrupted(result, where: str):
    """``result`` with status ``"interrupted"`` and a message saying where the fit stopped."""
    import dataclasses

    return dataclasses.replace(result, status=INTERRUPTED, message=f"{interrupted_note(where)}; {result.message}")


def interrupted_note(where: str) -> str:
    """The message of an interrupted fit."""
    return (f"interrupted (KeyboardInterrupt) {where}; the result holds the state reached, not a converged "
            "estimate (resume from a checkpoint with nlmegen.resume, or fit again)")
