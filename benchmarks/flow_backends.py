"""Every backend x random-effect distribution on the bimodal test problem (tests/infer/_bimodal.py):
recovered mode masses and wall times, written to benchmarks/results/flow-backends.json.

Run: python benchmarks/flow_backends.py (about 10-15 minutes on 2 busy CPU cores).
"""

import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "infer"))

import _bimodal as B  # noqa: E402
import test_flow_backends as T  # noqa: E402


def main():
    rows = []
    for backend, kind, n in T.DEFAULT + T.SLOW:
        start = time.perf_counter()
        fit, weights, _, _ = T._fit(backend, kind, n)
        wall = time.perf_counter() - start
        row = {"backend": backend, "distribution": kind, "n_subjects": n, "low_mode": float(weights[0]),
               "high_mode": float(weights[1]), "truth": [B.WEIGHT_LOW, 1 - B.WEIGHT_LOW],
               "sigma": float(fit.params["sigma"]), "status": fit.status, "wall_s": round(wall, 1),
               "within_0.1": bool(abs(weights[0] - B.WEIGHT_LOW) < 0.1 and abs(weights[1] - 1 + B.WEIGHT_LOW) < 0.1)}
        print(row, flush=True)
        rows.append(row)
    out = ROOT / "benchmarks" / "results" / "flow-backends.json"
    out.write_text(json.dumps({"rows": rows, "note": "wall_s includes compilation; 2 shared CPU cores"}, indent=1))


if __name__ == "__main__":
    main()
