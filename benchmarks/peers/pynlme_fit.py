"""pynlme (PyPI) on a Theoph-design CSV: nlmefit (LME or FOCE approximation, R nlme conventions) or
nlmefitsa (SAEM). Runs in its own virtual environment (benchmarks/setup_peers.sh), so it only
uses NumPy and the standard library besides pynlme.

Usage: python pynlme_fit.py data.csv {lme,foce,saem} repeats
Prints one JSON line: estimates (log ka, log CL, log V; IIV SDs; residual SD), -2LL, fit times.
"""

import csv
import json
import statistics
import sys
import time

import numpy as np
import pynlme


def load(path):
    ids, t, y, dose = [], [], [], []
    with open(path) as fh:
        for row in csv.DictReader(fh):
            if row["EVID"] != "0":
                continue
            ids.append(int(float(row["ID"])))
            t.append(float(row["TIME"]))
            y.append(float(row["DV"]))
            dose.append(float(row["DOSE"]))
    ids = np.asarray(ids)
    subjects = np.unique(ids)
    first_dose = {i: d for i, d in zip(ids, dose, strict=True)}
    return np.asarray(t)[:, None], np.asarray(y), ids, np.asarray([[first_dose[i]] for i in subjects])


def model(phi, x, v):
    ka, ke, vol = np.exp(phi[0]), np.exp(phi[1] - phi[2]), np.exp(phi[2])
    t = x[:, 0]
    return v[0] * ka / (vol * (ka - ke)) * (np.exp(-ke * t) - np.exp(-ka * t))


def main():
    path, method, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3
    x, y, group, v = load(path)
    beta0 = np.array([0.5, 1.0, 3.5])
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        if method in ("lme", "foce"):
            beta, psi, stats, _ = pynlme.nlmefit(x, y, group, v, model, beta0, compat="r",
                                                 ApproximationType=method.upper())
        else:
            beta, psi, stats, _ = pynlme.nlmefitsa(x, y, group, v, model, beta0, LogLikMethod="is", random_state=r)
        times.append(time.perf_counter() - start)
    logl = getattr(stats, "logl", None)
    out = {"ok": True, "tka": float(beta[0]), "tcl": float(beta[1]), "tv": float(beta[2]),
           "omega": np.sqrt(np.diag(psi)).tolist(), "add_sd": float(np.ravel(stats.errorparam)[0]),
           "m2ll": None if logl is None else -2.0 * float(logl), "fit_s": times,
           "fit_median_s": statistics.median(times), "n_subjects": int(v.shape[0]), "version": pynlme.__version__}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
