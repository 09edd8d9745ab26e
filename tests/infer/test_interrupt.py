"""Long fits that survive interruption (issue 19): Ctrl-C returns the state reached with status
"interrupted"; checkpoints resume to the result of the uninterrupted fit, bit for bit; NUTS reacts
to SIGINT within seconds; fits are deterministic across processes, with a cold or warm compilation
cache."""

import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from _small_fits import MODEL, backends, digest, population

import nlmegen
from nlmegen.infer.shared import checkpoint

METHODS = ["focei", "saem", "nuts", "svi"]
KEY = jax.random.key(5)


@pytest.fixture(scope="module")
def pop():
    return population(6)


@pytest.fixture(scope="module")
def uninterrupted(pop, tmp_path_factory):
    """One full fit per backend, written to a checkpoint as it goes (which must not change it)."""
    folder = tmp_path_factory.mktemp("full")
    return {m: nlmegen.fit(MODEL, pop, backends()[m], key=KEY, checkpoint=folder / f"{m}.ckpt",
                           checkpoint_every=1) for m in METHODS}


def interrupt_after(monkeypatch, calls: int):
    """Ctrl-C (KeyboardInterrupt) right after the backend's ``calls``-th unit of work (and its checkpoint).

    NUTS stops at its first call after warm-up (an interrupted warm-up has no draws to return; its calls
    grow to about half a second each, so a small run has few of them)."""
    real, seen = checkpoint.save, []

    def save(method, units, default_every, make_state):
        real(method, units, default_every, make_state)
        if method == "nuts" and make_state()["done"] <= backends()["nuts"].num_warmup:
            return
        seen.append(units)
        if len(seen) == (1 if method == "nuts" else calls):
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save)
    return seen


def _same(a, b):
    np.testing.assert_array_equal(a.theta, b.theta)
    assert a.ofv == b.ofv or (np.isnan(a.ofv) and np.isnan(b.ofv))
    assert a.status == b.status and a.message == b.message
    for name in a.draws or {}:
        np.testing.assert_array_equal(a.draws[name], b.draws[name])
    assert (a.draws is None) == (b.draws is None)


@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_returns_the_state_reached(pop, method, monkeypatch):
    seen = interrupt_after(monkeypatch, 2)
    fit = nlmegen.fit(MODEL, pop, backends()[method], key=KEY)
    assert fit.status == "interrupted" and "interrupted (KeyboardInterrupt)" in fit.message
    assert all(np.all(np.isfinite(v)) for v in fit.params.values())
    backend = backends()[method]
    if method == "focei":  # the last accepted BFGS iterate, as recorded in the history
        assert len(fit.history) == 2
        last = fit.history.iloc[-1]
        np.testing.assert_array_equal(fit.theta[fit.free], [last[k] for k in fit.theta_names if k in last])
    elif method == "saem":  # two chunks of iterations
        assert len(fit.history) == 2 * backend.chunk
    elif method == "svi":  # two chunks of steps; the guide's draws
        assert len(fit.history) == 2 * backend.chunk_size and fit.draws["tcl"].shape[1] == backend.num_draws
    else:  # the draws after warm-up so far
        n = fit.draws["tcl"].shape[1]
        assert 0 < n < backend.num_samples and seen
        assert fit.draws["eta"].shape[:2] == (backend.num_chains, n)


@pytest.mark.parametrize("method", METHODS)
def test_resume_equals_the_uninterrupted_fit(pop, method, uninterrupted, tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)
        stopped = nlmegen.fit(MODEL, pop, backends()[method], key=KEY, checkpoint=path, checkpoint_every=1)
    assert stopped.status == "interrupted"
    assert not [p for p in os.listdir(tmp_path) if p != "run.ckpt"]  # no temporary file left behind
    resumed = nlmegen.resume(path)
    _same(resumed, uninterrupted[method])


def test_checkpoint_is_replaced_atomically_and_keeps_the_last_good_state(pop, tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        nlmegen.fit(MODEL, pop, backends()["svi"], key=KEY, checkpoint=path, checkpoint_every=1)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:  # a failed write leaves the previous checkpoint as it was
        patch.setattr(pickle, "dump", crash)
        with pytest.raises(OSError, match="disk full"):
            checkpoint.write(str(path), {"format": checkpoint.FORMAT})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["run.ckpt"]
    payload = checkpoint.load(path)
    assert payload["state"]["method"] == "svi" and payload["state"]["done"] == 2 * backends()["svi"].chunk_size


def test_resume_needs_the_model_when_it_could_not_be_stored(pop, tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        nlmegen.fit(lambda p: MODEL(p), pop, backends()["svi"], key=KEY, checkpoint=path)
    with pytest.raises(ValueError, match="model="):
        nlmegen.resume(path)
    assert nlmegen.resume(path, model=MODEL).status != "interrupted"


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.ckpt"
    path.write_bytes(pickle.dumps({"something": 1}))
    with pytest.raises(ValueError, match="not an nlmegen checkpoint"):
        nlmegen.resume(path)


def test_nuts_reacts_to_sigint_within_seconds(pop, monkeypatch):
    """A real SIGINT during sampling: the fit returns the draws so far (one compiled program for the
    whole run used to wait for the end of it: 84 s on the issue's model)."""
    real, sent = checkpoint.save, {}

    def save(method, units, default_every, make_state):
        real(method, units, default_every, make_state)
        if "at" not in sent and make_state()["done"] > 40:  # sampling has begun: Ctrl-C in 0.2 s
            sent["at"] = time.perf_counter() + 0.2
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()

    monkeypatch.setattr(checkpoint, "save", save)
    # Python's Ctrl-C handler: a shell's background job (`cmd &`, nohup) starts with SIGINT ignored,
    # and this test would then sample for hours
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    backend = nlmegen.NUTS(num_warmup=40, num_samples=10**6, num_chains=2, progress=False)  # hours if not stopped
    try:
        fit = nlmegen.fit(MODEL, pop, backend, key=KEY)
    finally:
        signal.signal(signal.SIGINT, previous)
    waited = time.perf_counter() - sent["at"]
    assert fit.status == "interrupted" and 0 < fit.draws["tcl"].shape[1] < 10**6
    assert waited < 20.0, waited  # ~1 s per compiled call, plus the summaries (generous: shared CPUs)


@pytest.mark.parametrize("methods", [["saem", "nuts"], pytest.param(METHODS, marks=pytest.mark.slow)],
                         ids=["saem-nuts", "all"])
def test_same_key_same_result_across_processes_and_cache_states(tmp_path, methods):
    """Bit for bit: this process, a fresh process compiling into an empty cache, and one loading it (by default
    the two samplers, whose draws depend on every random number; all four backends in the slow run)."""
    here = {m: digest(nlmegen.fit(MODEL, population(4), backends()[m], key=jax.random.key(11))) for m in methods}
    script = os.path.join(os.path.dirname(__file__), "_small_fits.py")
    env = {**os.environ, "NLMEGEN_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    for run in ("cold cache", "warm cache"):
        out = subprocess.run([sys.executable, script, *methods], env=env, capture_output=True, text=True,
                             timeout=600, check=True).stdout
        there = dict(line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in methods)
        assert there == here, run
    assert os.listdir(tmp_path / "cache")  # the first process did write the cache
