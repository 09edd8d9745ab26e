"""nlmegen next to its peers, measured side by side in one run on the same machine and data files.

Usage::

    python benchmarks/run.py [--quick] [--only NAME ...] [--out DIR]

Cases (names for ``--only``):

- ``theo_sd``: theo_sd one-compartment FOCEI (12 subjects), nlmegen vs R nlme (and pynlme LME).
- ``theo_N``: simulated Theoph-design populations (``benchmarks/_design.py``) at 100, 1,000 and
  10,000 subjects (``--quick``: 100 and 1,000): nlmegen FOCEI and SAEM vs R nlme (Lindstrom-Bates
  FOCE, ML) and pynlme (``nlmefit`` LME, ``nlmefitsa`` SAEM).
- ``idr``: the seeds' indirect-response ODE model at 60 and 1,000 subjects (``--quick``: FOCEI
  only, 4 subjects, a timing probe): nlmegen FOCEI and SAEM (no peer on this machine: absolute
  figures and cost per subject), one process each; a size whose projected fit time exceeds 30
  minutes is reported as not run, with the projection.
- ``nuts``: NUTS on theo_sd, nlmegen vs the hand-written NumPyro model
  (``benchmarks/peers/numpyro_nuts.py``): ESS per second.
- Memory: the peak resident memory of each nlmegen process is recorded (case 2 at 10,000 subjects
  is the figure the issue asks for).

Every tool runs in its own fresh process on the same CSV file. Compile time (first call) and warm
run time (median of ``--repeats`` further fits in the same process) are reported separately, and
end to end (process start to printed estimates) twice for nlmegen: with an empty compilation
cache and with the cache the first process filled. Peers are skipped with a message when absent
(``benchmarks/setup_peers.sh`` installs R nlme from Debian and pynlme into its own venv).

Output: ``<out>/benchmarks-<timestamp>.json`` (machine, versions, every figure) plus
``<out>/latest.json`` and ``<out>/latest.md`` (the markdown table printed at the end).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _design  # noqa: E402

PYNLME_PYTHON = Path(os.environ.get("PYNLME_PYTHON", HERE / ".peers" / "pynlme" / "bin" / "python"))
TIMEOUT_S = int(os.environ.get("NLMEGEN_BENCH_TIMEOUT", "1200"))


# ---------------------------------------------------------------------------------- processes
def _run(cmd: list[str], env: dict | None = None, timeout: int = TIMEOUT_S) -> dict:
    """Run ``cmd``; its last stdout line is JSON. Adds ``wall_s`` (process start to exit)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"ok": False, "error": " | ".join(tail) or f"exit {proc.returncode}", "wall_s": wall}
    out = json.loads(lines[-1])
    out["wall_s"] = wall
    return out


def _nlmegen(model: str, csv: Path, method: str, repeats: int, cache: Path, cached_run: bool = True,
             **extra) -> dict:
    """nlmegen in two fresh processes: empty cache (compile + warm repeats), then cache filled
    (``cached_run=False``: the first only)."""
    cmd = [sys.executable, str(HERE / "nlmegen_fit.py"), "--model", model, "--csv", str(csv), "--method", method]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    shutil.rmtree(cache, ignore_errors=True)
    env = {"NLMEGEN_CACHE_DIR": str(cache)}
    cold = _run(cmd + ["--repeats", str(repeats)], env)
    if not cold.get("ok") or not cached_run:
        cold["end_to_end_cold_cache_s"] = cold.get("process_to_estimates_s")
        return cold
    warm = _run(cmd + ["--repeats", "0"], env)
    cold["end_to_end_cold_cache_s"] = cold["process_to_estimates_s"]
    cold["end_to_end_warm_cache_s"] = warm.get("process_to_estimates_s")
    cold["compile_s_warm_cache"] = warm.get("timings", {}).get("compile_s")
    return cold


def _nlme(csv: Path, repeats: int) -> dict:
    if shutil.which("Rscript") is None:
        return {"ok": False, "error": "R is not installed (benchmarks/setup_peers.sh installs r-base-core and "
                                      "r-cran-nlme)"}
    script = str(HERE / "peers" / "nlme_fit.R")
    out = _run(["Rscript", script, str(csv), str(repeats)])
    if out.get("ok"):
        out["warm_fit_median_s"] = statistics.median(out["fit_s"][1:] or out["fit_s"])
        single = _run(["Rscript", script, str(csv), "1"])
        out["end_to_end_s"] = single.get("wall_s")
    return out


def _pynlme(csv: Path, method: str, repeats: int) -> dict:
    if not PYNLME_PYTHON.exists():
        return {"ok": False, "error": f"pynlme venv not found at {PYNLME_PYTHON} (run benchmarks/setup_peers.sh)"}
    script = str(HERE / "peers" / "pynlme_fit.py")
    out = _run([str(PYNLME_PYTHON), script, str(csv), method, str(repeats)])
    if out.get("ok"):  # one fit per process: that process is the end-to-end figure (pynlme SAEM at 10,000: 15 min)
        single = _run([str(PYNLME_PYTHON), script, str(csv), method, "1"]) if repeats > 1 else out
        out["end_to_end_s"] = single.get("wall_s")
    return out


def _saemix() -> dict:
    probe = subprocess.run(["Rscript", "-e", "library(saemix)"], capture_output=True, text=True) \
        if shutil.which("Rscript") else None
    if probe is None or probe.returncode != 0:
        return {"ok": False, "error": "saemix is not installed (not a Debian package; CRAN is out of reach here)"}
    return {"ok": False, "error": "saemix found but not wired into this runner"}


# ---------------------------------------------------------------------------------- cases
def _theo_row(tool: str, method: str, n: int, res: dict) -> dict:
    """One table row from a tool's JSON (estimates on nlmegen's scale: log ka/CL/V, SDs)."""
    row = {"tool": tool, "method": method, "n": n, "ok": bool(res.get("ok")), "raw": res}
    if not res.get("ok"):
        row["error"] = res.get("error")
        return row
    est = res.get("estimates") or {k: res.get(k) for k in ("tka", "tcl", "tv", "omega", "add_sd")}
    row.update({
        "compile_s": res.get("timings", {}).get("compile_s"),
        "warm_s": res.get("warm_fit_median_s") or (res.get("fit_median_s")),
        "end_to_end_s": res.get("end_to_end_cold_cache_s") or res.get("end_to_end_s"),
        "end_to_end_cached_s": res.get("end_to_end_warm_cache_s"),
        "m2ll": res.get("m2ll"), "peak_rss_mb": res.get("peak_rss_mb"),
        "estimates": {k: est.get(k) for k in ("tka", "tcl", "tv", "omega", "add_sd") if k in est},
    })
    return row


def case_theo(csv: Path, n: int, repeats: int, cache: Path, saem: bool, pynlme_foce: bool = False) -> list[dict]:
    rows = [_theo_row("nlmegen", "FOCEI", n, _nlmegen("theo", csv, "focei", repeats, cache))]
    if saem:  # at 10,000 subjects (repeats 1) the SAEM figure is the first fit's run time, without compile
        saem_repeats = max(1, repeats // 2) if repeats > 1 else 0
        rows.append(_theo_row("nlmegen", "SAEM", n, _nlmegen("theo", csv, "saem", saem_repeats, cache)))
    rows.append(_theo_row("R nlme", "FOCE (LB)", n, _nlme(csv, repeats)))
    rows.append(_theo_row("pynlme", "LME", n, _pynlme(csv, "lme", repeats)))
    if pynlme_foce:
        rows.append(_theo_row("pynlme", "FOCE", n, _pynlme(csv, "foce", 1)))
    if saem:
        rows.append(_theo_row("pynlme", "SAEM", n, _pynlme(csv, "saem", max(1, repeats // 2))))
        rows.append({"tool": "saemix", "method": "SAEM", "n": n, "ok": False, "error": _saemix()["error"]})
    return rows


def case_idr(n: int, cache: Path, budget_s: float | None = None, measured: list[dict] | None = None,
             methods: tuple[str, ...] = ("focei", "saem")) -> list[dict]:
    """The IDR ODE model: one process per method (first fit; its run time without compile is the
    warm figure). With ``budget_s``, a size whose projected fit time, from the per-subject cost
    ``measured`` at a smaller size, exceeds the budget is reported as skipped with the projection."""
    rows = []
    for method in methods:  # FOCEI without the covariance step (timed separately in theo cases)
        ref = next((r for r in (measured or []) if r["method"] == method.upper() and r.get("per_subject_ms")), None)
        projected = ref["per_subject_ms"] * n / 1000.0 if ref is not None else None
        if budget_s is not None and projected is not None and projected > budget_s:
            rows.append({"tool": "nlmegen", "method": method.upper(), "n": n, "ok": False,
                         "error": f"not run: projected {projected / 60:.0f} min on this machine from the "
                                  f"{ref['n']}-subject cost ({ref['per_subject_ms']:.0f} ms per subject), over the "
                                  f"run's {budget_s / 60:.0f} min budget per fit"})
            continue
        res = _nlmegen("idr", _design.idr_design(n), method, 0, cache, cached_run=False, covariance="none")
        row = _theo_row("nlmegen", method.upper(), n, res)
        if res.get("ok"):
            row["estimates"] = res["estimates"]
            row["per_subject_ms"] = 1000.0 * (row["warm_s"] or float("nan")) / n
            row["n_evaluations"] = res.get("timings", {}).get("n_evaluations")
        rows.append(row)
    return rows


def case_nuts(warmup: int, samples: int, chains: int, cache: Path) -> list[dict]:
    csv = _design.theo_sd()
    ours = _nlmegen("theo", csv, "nuts", 0, cache, warmup=warmup, samples=samples, chains=chains)
    ref = _run([sys.executable, str(HERE / "peers" / "numpyro_nuts.py"), str(csv), str(warmup), str(samples),
                str(chains)])
    rows = []
    if ours.get("ok"):
        t = ours["timings"]["run_s"]
        rows.append({"tool": "nlmegen", "method": "NUTS", "n": 12, "ok": True, "run_s": t,
                     "ess_bulk_min": ours["ess_bulk_min"], "ess_per_s": ours["ess_bulk_min"] / t,
                     "divergences": ours["divergences"], "r_hat_max": ours["r_hat_max"], "raw": ours})
    else:
        rows.append({"tool": "nlmegen", "method": "NUTS", "n": 12, "ok": False, "error": ours.get("error")})
    if ref.get("ok"):
        rows.append({"tool": "hand-written NumPyro", "method": "NUTS", "n": 12, "ok": True, "run_s": ref["run_s"],
                     "ess_bulk_min": ref["ess_bulk_min"], "ess_per_s": ref["ess_per_s"],
                     "divergences": ref["divergences"], "raw": ref})
    else:
        rows.append({"tool": "hand-written NumPyro", "method": "NUTS", "n": 12, "ok": False, "error": ref.get("error")})
    return rows


# ---------------------------------------------------------------------------------- report
def _fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def _est(row: dict) -> str:
    import math

    e = row.get("estimates") or {}
    if not all(k in e for k in ("tka", "tcl", "tv")):
        return "-"
    om = e.get("omega") or []
    return (f"ka {math.exp(e['tka']):.3g}, CL {math.exp(e['tcl']):.3g}, V {math.exp(e['tv']):.3g}; "
            f"ω {', '.join(f'{w:.2f}' for w in om)}; σ {_fmt(e.get('add_sd'))}")


def table(results: dict) -> str:
    lines = ["| case | tool | method | N | compile s | warm fit s | end-to-end s (cold / cached) | "
             "nlme warm ÷ this | -2LL | estimates |", "|" + "---|" * 10]
    for case, rows in results["cases"].items():
        if case in ("nuts", "idr"):
            continue
        nlme = {r["n"]: r.get("warm_s") for r in rows if r["tool"] == "R nlme" and r.get("ok")}
        for r in rows:
            if not r.get("ok"):
                lines.append(f"| {case} | {r['tool']} | {r['method']} | {r['n']} | skipped: {r.get('error')} "
                             "| | | | | |")
                continue
            ratio = (nlme.get(r["n"]) / r["warm_s"]) if nlme.get(r["n"]) and r.get("warm_s") else None
            e2e = _fmt(r.get("end_to_end_s"))
            if r.get("end_to_end_cached_s") is not None:
                e2e += f" / {_fmt(r['end_to_end_cached_s'])}"
            warm = _fmt(r.get("warm_s")) + ("*" if (r.get("raw") or {}).get("warm_fit_from_first") else "")
            lines.append(f"| {case} | {r['tool']} | {r['method']} | {r['n']} | {_fmt(r.get('compile_s'))} | "
                         f"{warm} | {e2e} | {_fmt(ratio)} | {_fmt(r.get('m2ll'), 7)} | {_est(r)} |")
    if "idr" in results["cases"]:
        lines += ["", "| IDR ODE model | method | N | compile s | fit s (run, no compile) | ms per subject | "
                  "OFV evaluations | -2LL |", "|---|---|---|---|---|---|---|---|"]
        for r in results["cases"]["idr"]:
            if not r.get("ok"):
                lines.append(f"| nlmegen | {r['method']} | {r['n']} | {r.get('error')} | | | | |")
                continue
            cells = [_fmt(r.get(k)) for k in ("compile_s", "warm_s", "per_subject_ms", "n_evaluations")]
            lines.append(f"| nlmegen | {r['method']} | {r['n']} | {' | '.join(cells)} | {_fmt(r.get('m2ll'), 7)} |")
    if "nuts" in results["cases"]:
        lines += ["", "| NUTS on theo_sd | run s | min bulk ESS | ESS/s | divergences | ratio to hand-written |",
                  "|---|---|---|---|---|---|"]
        rows = results["cases"]["nuts"]
        ref = next((r["ess_per_s"] for r in rows if r["tool"] != "nlmegen" and r.get("ok")), None)
        for r in rows:
            if not r.get("ok"):
                lines.append(f"| {r['tool']} | skipped: {r.get('error')} | | | | |")
                continue
            ratio = r["ess_per_s"] / ref if ref else None
            lines.append(f"| {r['tool']} | {_fmt(r['run_s'])} | {_fmt(r['ess_bulk_min'])} | {_fmt(r['ess_per_s'])} | "
                         f"{r['divergences']} | {_fmt(ratio)} |")
    mem = [(c, r["n"], r.get("peak_rss_mb")) for c, rows in results["cases"].items() for r in rows
           if r.get("tool") == "nlmegen" and r.get("peak_rss_mb")]
    if mem:
        lines += ["", "Peak resident memory of the nlmegen process (MB): " +
                  "; ".join(f"{c} N={n}: {m:.0f}" for c, n, m in mem)]
    lines += ["", "\\* first fit's run time without its compile time (no repeat at this size)."]
    lines += ["", "-2LL: nlmegen FOCEI = FOCE-linearised Laplace -2LL with the N log 2π constant (NONMEM OFV + "
              "N log 2π); nlmegen SAEM = importance-sampling -2LL; R nlme = Lindstrom-Bates linearised ML -2LL; "
              "pynlme LME = its linear mixed-effects approximation (R conventions); pynlme SAEM = its "
              "importance-sampling -2LL. Different approximations give different -2LLs."]
    return "\n".join(lines)


def _machine() -> dict:
    import jax

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}
    for mod in ("numpyro", "diffrax", "scipy", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    if shutil.which("Rscript"):
        r = subprocess.run(["Rscript", "-e", 'cat(R.version.string, as.character(packageVersion("nlme")))'],
                           capture_output=True, text=True)
        info["R_nlme"] = r.stdout.strip()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (under 10 min)")
    parser.add_argument("--only", nargs="*", default=None, help="cases: theo_sd theo_N idr nuts")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    quick = args.quick
    repeats = args.repeats or (3 if quick else 5)
    wanted = set(args.only or ("theo_sd", "theo_N", "idr", "nuts"))
    sizes = (100, 1000) if quick else (100, 1000, 10000)
    import nlmegen.infer._fit as fitmod

    saem = "saem" in fitmod.BACKENDS
    cache = Path(tempfile.mkdtemp(prefix="nlmegen-bench-cache-"))
    results = {"started": _dt.datetime.now(_dt.UTC).isoformat(), "quick": quick, "repeats": repeats,
               "machine": _machine(), "cases": {}}
    t0 = time.perf_counter()
    try:
        if "theo_sd" in wanted:
            print("case 1: theo_sd", flush=True)
            results["cases"]["theo_sd"] = case_theo(_design.theo_sd(), 12, repeats, cache, saem=False,
                                                    pynlme_foce=not quick)
            _write(results, Path(args.out), quick)
        if "theo_N" in wanted:
            rows = []
            for n in sizes:
                print(f"case 2: Theoph design, {n} subjects", flush=True)
                rows += case_theo(_design.theo_design(n), n, repeats if n < 10000 else 1, cache, saem=saem)
            results["cases"]["theo_N"] = rows
            _write(results, Path(args.out), quick)
        if "idr" in wanted:
            rows = []
            for n in ((4,) if quick else (60, 1000)):
                print(f"case 3: IDR ODE, {n} subjects", flush=True)
                # --quick: FOCEI only (SAEM's 500 iterations through the ODE take minutes at any size)
                rows += case_idr(n, cache, budget_s=None if n <= 60 else 1800.0, measured=rows,
                                 methods=("focei",) if quick else ("focei", "saem"))
            results["cases"]["idr"] = rows
            _write(results, Path(args.out), quick)
        if "nuts" in wanted:
            print("case 4: NUTS on theo_sd", flush=True)
            results["cases"]["nuts"] = case_nuts(*((300, 300, 2) if quick else (500, 500, 4)), cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    results["total_s"] = time.perf_counter() - t0
    md = table(results)
    print(md)
    out = _write(results, Path(args.out), quick)
    print(f"wrote {out} ({results['total_s']:.0f} s)")


def _write(results: dict, out: Path, quick: bool) -> Path:
    """The run's JSON (timestamped and ``latest``) and markdown table; called after every case."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = results["started"].replace(":", "").replace("-", "")[:15]
    text = json.dumps(results, indent=1, default=str)
    (out / f"benchmarks-{stamp}{'-quick' if quick else ''}.json").write_text(text)
    (out / ("latest-quick.json" if quick else "latest.json")).write_text(text)
    (out / ("latest-quick.md" if quick else "latest.md")).write_text(table(results) + "\n")
    return out


if __name__ == "__main__":
    main()
