"""The subject axis sharded over 8 (forced host) CPU devices gives the unsharded fit.

Runs in a subprocess: the device count is fixed when JAX starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, jax, numpy as np, nlmegen
    from nlmegen.infer.laplace import backend
    assert jax.local_device_count() == 8, jax.devices()
    table = nlmegen.datasets.load("theo_sd")
    obs = table[table["EVID"] == 0]
    drop = [i for sid, rows in obs.groupby("ID") for i in rows.index[len(rows) - sid % 5:]]
    # 12 subjects with 7 to 11 observations: 2 per device, 4 padded, reordered by the cost layout
    pop = nlmegen.read_nonmem(table.drop(index=drop))
    out = {}
    for engine in sys.argv[1:]:
        one = nlmegen.fit(nlmegen.examples.theo_model, pop, nlmegen.FOCEI(devices=1, engine=engine, progress=False))
        many = nlmegen.fit(nlmegen.examples.theo_model, pop, nlmegen.FOCEI(engine=engine, progress=False))
        key = [k for k in backend._CACHE if k[5] == engine and k[-1] == 8]
        out[engine] = {"ofv": [one.ofv, many.ofv], "theta": [one.theta.tolist(), many.theta.tolist()],
                       "se": [one.se_unconstrained.tolist(), many.se_unconstrained.tolist()],
                       "ebe": [one.ebes.to_numpy().tolist(), many.ebes.to_numpy().tolist()],
                       "sharded_programs": len(key), "status": [one.status, many.status]}
        theta = {k: np.asarray(v) for k, v in one.params.items()}
        problem = backend._Problem.build(nlmegen.FOCEI(engine=engine), nlmegen.examples.theo_model, pop, theta, None)
        problem.compile()
        ofv8, grad8, _ = problem.evaluate(problem.theta0[problem.free])
        problem1 = backend._Problem.build(nlmegen.FOCEI(engine=engine, devices=1), nlmegen.examples.theo_model, pop,
                                          theta, None)
        problem1.compile()
        ofv1, grad1, _ = problem1.evaluate(problem1.theta0[problem1.free])
        out[engine]["point"] = [ofv1, ofv8, float(np.max(np.abs(grad1 - grad8)))]
    print("RESULT" + json.dumps(out))
    print(json.dumps({e: {"ofv": r["ofv"], "point": r["point"]} for e, r in out.items()}), file=sys.stderr)
""")


def _run(engine: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "NLMEGEN_CACHE_DIR": "0"}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", SCRIPT, engine], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT")]
    assert done.returncode == 0 and line, done.stderr[-3000:]
    return json.loads(line[0][len("RESULT"):])[engine]


@pytest.mark.parametrize("engine", ["forward", pytest.param("reverse", marks=pytest.mark.slow)])
def test_sharded_fit_equals_unsharded(engine):
    r = _run(engine)
    assert r["sharded_programs"] == 1, engine  # the 8-device program was the one used
    assert r["status"] == ["converged", "converged"]
    one, many = r["point"][:2]
    assert abs(one - many) < 1e-8, (engine, one, many)  # one evaluation: the same OFV
    assert r["point"][2] < 1e-8, engine  # and the same gradient
    assert abs(r["ofv"][0] - r["ofv"][1]) < 1e-8, (engine, r["ofv"])  # the same fit
    assert max(abs(a - b) for a, b in zip(*r["theta"], strict=True)) < 1e-6
    assert max(abs(a - b) for a, b in zip(*r["se"], strict=True)) < 1e-5
    assert max(abs(a - b) for x, y in zip(*r["ebe"], strict=True) for a, b in zip(x, y, strict=True)) < 1e-6


def test_devices_setting_is_checked():
    import jax

    from nlmegen.infer.laplace.shard import shard_count

    assert shard_count(None, 12) == min(jax.local_device_count(), 12)
    with pytest.raises(ValueError, match=r"device\(s\) are visible"):
        shard_count(jax.local_device_count() + 1, 12)
    with pytest.raises(ValueError, match="positive integer"):
        shard_count(0, 12)


def test_layout_balances_costs_and_restores_the_order():
    import numpy as np

    from nlmegen.infer.shared.shard import Layout

    cost = np.array([3, 9, 1, 7, 7, 2, 8, 5, 4, 6, 10])  # 11 subjects over 4 devices: 3 slots each, 1 padded
    layout = Layout.build(cost.size, 4, cost)
    slots, real = np.asarray(layout.slots).reshape(4, 3), np.asarray(layout.real).reshape(4, 3)
    assert layout.per == 3 and real.sum() == 11
    assert sorted(slots[real].tolist()) == list(range(11))  # every subject once
    # heaviest first, dealt in turn: device d holds ranks d, d + 4, d + 8
    ranked = np.argsort(-cost, kind="stable")
    assert slots[:, 0].tolist() == ranked[:4].tolist() and slots[:3, 2].tolist() == ranked[8:].tolist()
    loads = np.where(real, cost[slots], 0).sum(axis=1)
    assert loads.max() - loads.min() <= cost.max() - cost.min()  # no device holds all the heavy subjects
    x = np.arange(11.0) * 10
    assert np.array_equal(np.asarray(layout.restore(layout.take(x))), x)  # back in subject order
    assert np.array_equal(np.asarray(Layout.build(5, 2).slots), [0, 2, 4, 1, 3, 0])  # no cost: dealt in subject order
