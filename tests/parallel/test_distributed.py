"""One fit across 2 JAX processes (`jax.distributed`, Gloo collectives on CPU) equals the one-process fit
(FOCEI: the fit; SAEM: the iterates for one key).

Launched as `python -m nlmegen.parallel.launch -n 2` would (coordinator on localhost, a free
port), each process with 2 CPU devices: the subjects are split over 4 devices in 2 processes.
The data have subjects with different numbers of records, so the balanced layout reorders them,
and the EBEs must still come back in subject order.
"""

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nlmegen.parallel import launch

SCRIPT = textwrap.dedent("""
    import json, sys
    from nlmegen.parallel import distributed
    k = distributed.initialize()
    import jax, numpy as np, nlmegen
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    table = nlmegen.datasets.load("theo_sd")
    obs = table[table["EVID"] == 0]
    drop = [i for sid, rows in obs.groupby("ID") for i in rows.index[len(rows) - sid % 5:]]
    pop = nlmegen.read_nonmem(table.drop(index=drop))     # 7 to 11 observations a subject
    many = nlmegen.fit(nlmegen.examples.theo_model, pop, nlmegen.FOCEI(progress=False))
    out = {"process": k, "ofv": many.ofv, "theta": many.theta.tolist(), "ebe": many.ebes.to_numpy().tolist(),
           "status": many.status}
    if k == 0:  # the same fit by this process alone, on one device
        one = nlmegen.fit(nlmegen.examples.theo_model, pop, nlmegen.FOCEI(devices=1, progress=False))
        out["one"] = {"ofv": one.ofv, "theta": one.theta.tolist(), "ebe": one.ebes.to_numpy().tolist(),
                      "status": one.status}
    from nlmegen.infer.saem.backend import _SAEMProblem  # SAEM's iterates: the same for one key
    def saem(devices):
        backend = nlmegen.SAEM(n_explore=8, n_smooth=10, n_conditional=5, chunk=23, joint_steps=0, progress=False,
                               devices=devices)
        problem = _SAEMProblem.build(backend, nlmegen.examples.theo_model, pop, None, None)
        return problem.n_devices, problem.run(jax.random.key(3))["records"]["theta"].tolist()
    if sys.argv[2:] == ["saem"]:
        out["saem"] = saem(None)
        if k == 0:
            out["one"]["saem"] = saem(1)
    with open(sys.argv[1] + f".{k}.json", "w") as f:
        json.dump(out, f)
""")


def _launch(tmp_path, *extra) -> tuple[dict, dict]:
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "NLMEGEN_CACHE_DIR": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    status = launch.launch([str(script), str(tmp_path / "out"), *extra], 2, env=env, timeout=500)
    assert status == 0, status
    return tuple(json.loads((tmp_path / f"out.{k}.json").read_text()) for k in (0, 1))


def test_two_processes_give_the_one_process_fit(tmp_path):
    r0, r1 = _launch(tmp_path)
    one = r0["one"]
    assert r0["status"] == r1["status"] == one["status"] == "converged"
    assert r0["ofv"] == r1["ofv"]  # both processes hold the same result
    assert abs(r0["ofv"] - one["ofv"]) < 1e-8, (r0["ofv"], one["ofv"])
    assert max(abs(a - b) for a, b in zip(r0["theta"], one["theta"], strict=True)) < 1e-6
    assert max(abs(a - b) for x, y in zip(r0["ebe"], one["ebe"], strict=True) for a, b in zip(x, y, strict=True)) < 1e-6


@pytest.mark.slow
def test_two_processes_give_the_one_process_saem_iterates(tmp_path):
    r0, r1 = _launch(tmp_path, "saem")
    (n4, theta4), (n1, theta1) = r0["saem"], r0["one"]["saem"]
    assert (n4, n1) == (4, 1) and r1["saem"] == r0["saem"]
    assert max(abs(a - b) for x, y in zip(theta4, theta1, strict=True) for a, b in zip(x, y, strict=True)) < 1e-8


def test_launcher_reports_a_failed_process(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os, sys, time\n"
                      "sys.exit(3) if os.environ['NLMEGEN_PROCESS_ID'] == '1' else time.sleep(60)\n")
    start = time.monotonic()
    assert launch.launch([str(script)], 2, timeout=50) == 3  # the failed process's status; the other stopped
    script.write_text("import time\ntime.sleep(60)\n")
    assert launch.launch([str(script)], 2, timeout=1) == 124  # past the deadline both are stopped
    assert time.monotonic() - start < 30


def test_initialize_wants_all_three_or_none():
    from nlmegen.parallel import distributed

    with pytest.raises(ValueError, match="together"):
        distributed.initialize("localhost:1234", None, 0)
    with pytest.raises(ValueError, match="not in 0..1"):
        distributed.initialize("localhost:1234", 2, 5)
    assert sys.executable  # the launcher runs the same interpreter
