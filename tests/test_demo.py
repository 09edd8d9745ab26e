"""The main job: `nlmegen demo` fits, prints and writes its figures, and never overwrites silently."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nlmegen
from nlmegen.__main__ import FIGURES, figures, main

WARFARIN = {"tka": 0.0, "tlag": np.log(0.8), "tcl": -2.0, "tv": 2.05, "tec50": 0.14, "tkout": -2.95, "te0": 4.57,
            "omega": np.array([0.8, 0.28, 0.22, 0.45, 0.1, 0.05]), "prop_cp": 0.1, "add_cp": 0.5, "add_pca": 3.7}


def test_demo_writes_figures_and_refuses_to_overwrite(tmp_path, capfd):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n-sim", "50"]) == 0
    captured = capfd.readouterr()
    printed = captured.out
    assert "OFV 116.80" in printed and "converged" in printed
    # progress on stderr from the first second: compilation, then each stage with its elapsed time
    # (stderr is captured, not a terminal: whole lines, no counting seconds)
    for line in ("compiling the FOCEI objective and gradient ...\n", "VPC: simulating 50 replicates ...\n",
                 "VPC: 50 replicates simulated and drawn in ", "GOF panels drawn in ", "individual fits drawn in "):
        assert line in captured.err, (line, captured.err[-800:])
    for name in FIGURES:
        assert (out / name).stat().st_size > 20_000, name
    before = (out / FIGURES[0]).stat().st_mtime_ns
    with pytest.raises(SystemExit, match="--force"):
        main(["demo", "--out", str(out)])
    assert (out / FIGURES[0]).stat().st_mtime_ns == before


def test_warfarin_model_matches_the_full_ode_system():
    """The demo's warfarin model (closed-form PK driving a one-state PD ODE) = depot/central/PCA ODE."""
    pop = nlmegen.read_nonmem(nlmegen.datasets.load("warfarin")).subset([1, 2, 3, 4])
    assert pop.outputs == ("cp", "pca")
    eta = np.random.default_rng(0).normal(0.0, 0.3, (pop.n_subjects, 6))
    values = {**WARFARIN, "eta": eta}
    sims = nlmegen.simulate_arrays(nlmegen.examples.warfarin_model, values, pop, key=jax.random.key(0),
                                   noise=False)[0]
    p = {name: np.exp(WARFARIN["t" + name] + eta[:, k]) for k, name in enumerate(nlmegen.examples.WARFARIN_ETAS)}
    states = np.asarray(nlmegen.ode.solve(nlmegen.examples.warfarin_rhs, pop, p, lag=0.8,
                                          y0=lambda q: jnp.stack([0.0 * q["e0"], 0.0 * q["e0"], q["e0"]])))
    full = np.where(np.asarray(pop.dvid) == 0, states[..., 1] / p["v"][:, None], states[..., 2])
    mask = np.asarray(pop.mask)
    np.testing.assert_allclose(sims[mask], full[mask], rtol=1e-5, atol=1e-6)
    assert np.all(full[mask & (np.asarray(pop.dvid) == 1)] < 100.0 * np.exp(4.57 + 0.9))  # PCA falls from E0


def _estimate(printed: str, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)}\s+(-?[0-9.e+-]+)", printed, re.MULTILINE).group(1))


@pytest.mark.slow
def test_warfarin_demo(tmp_path, capsys):
    out = tmp_path / "warfarin"
    assert main(["demo", "--dataset", "warfarin", "--out", str(out), "--n-sim", "100"]) == 0
    printed = capsys.readouterr().out
    assert "status='converged'" in printed
    # babelmixr2's NONMEM FOCEI fit of nlmixr2's warfarin PK/PD model (transit absorption, Emax
    # estimated at 0.998): CL 0.1348 L/h, V 7.783 L, EC50 1.151 mg/L, kout 0.05216 /h, E0 96.59 %
    reference = {"tcl": 0.1348, "tv": 7.783, "tec50": 1.151, "tkout": 0.05216, "te0": 96.59}
    for name, value in reference.items():
        assert np.exp(_estimate(printed, name)) == pytest.approx(value, rel=0.05), name
    assert _estimate(printed, "add_pca") == pytest.approx(3.717, rel=0.1)
    for name in figures("warfarin"):
        assert (out / name).stat().st_size > 20_000, name
