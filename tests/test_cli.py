"""``nlmegen fit DATA MODEL``: a user's CSV and a model in a Python file -> tables, result file, figures."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import nlmegen
from nlmegen.__main__ import FIT_FILES, load_model, main

MODEL_FILE = '''
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

import nlmegen


def model(pop):
    tka = numpyro.sample("tka", dist.Normal(0.5, 1.0))
    tcl = numpyro.sample("tcl", dist.Normal(1.0, 1.0))
    tv = numpyro.sample("tv", dist.Normal(3.5, 1.0))
    omega = numpyro.sample("omega", dist.HalfNormal(jnp.ones(3)).to_event(1))
    add_sd = numpyro.sample("add_sd", dist.HalfNormal(2.0))
    with nlmegen.subjects(pop):
        eta = numpyro.sample("eta", dist.Normal(0.0, omega).to_event(1))
        cl = numpyro.deterministic("cl", jnp.exp(tcl + eta[..., 1]))
        conc = nlmegen.pk.one_cmt(pop, cl=cl, v=jnp.exp(tv + eta[..., 2]), ka=jnp.exp(tka + eta[..., 0]))
        nlmegen.observe("conc", nlmegen.additive(conc, add_sd), pop)
'''


def test_fit_command_writes_tables_result_and_figures(tmp_path, capsys):
    data, model_py, out = tmp_path / "theo.csv", tmp_path / "mymodel.py", tmp_path / "out"
    nlmegen.datasets.load("theo_sd").to_csv(data, index=False)
    model_py.write_text(MODEL_FILE)
    assert main(["fit", str(data), f"{model_py}:model", "--out", str(out), "--n-sim", "30"]) == 0
    printed = capsys.readouterr().out
    assert "OFV 116.80" in printed and "OMEGA(eta[1]:cl)" in printed
    for name in FIT_FILES:
        assert (out / name).stat().st_size > 500, name
    table = pd.read_csv(out / "parameters.csv", index_col=0)
    assert table.loc["cl", "estimate"] == pytest.approx(2.75, abs=0.01)
    back = nlmegen.load(out / "fit.nc")
    assert back.ofv == pytest.approx(116.8034, abs=1e-3)
    assert back.tables["model_ref"] == f"{model_py.resolve()}:model"
    assert back.model is not None and back.model.__module__.startswith("nlmegen_user_model_")  # loaded by main
    with pytest.raises(SystemExit, match="--force"):
        main(["fit", str(data), f"{model_py}:model", "--out", str(out)])


def test_fit_command_names_bad_model_specs(tmp_path):
    with pytest.raises(SystemExit, match="path/to/model.py:function"):
        load_model("model.py")
    with pytest.raises(SystemExit, match="not found"):
        load_model(str(tmp_path / "none.py") + ":model")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(SystemExit, match="defines no 'model'"):
        load_model(f"{tmp_path / 'empty.py'}:model")


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"nlmegen {nlmegen.__version__}"


_NO_JAX = """
import runpy, sys, time
start = time.perf_counter()
sys.argv = ["nlmegen", sys.argv[1]]
try:
    runpy.run_module("nlmegen", run_name="__main__")
except SystemExit as stop:
    code = stop.code
print("EXIT", code, "JAX", "jax" in sys.modules, "NUMPYRO", "numpyro" in sys.modules,
      "SECONDS", time.perf_counter() - start)
"""


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_jax(flag):
    """``python -m nlmegen --help`` answers without importing JAX (lazy imports): 1.4 s of imports saved."""
    root = Path(nlmegen.__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _NO_JAX, flag], capture_output=True, text=True, cwd=root,
                          timeout=60)
    last = done.stdout.strip().splitlines()[-1].split()
    assert last[:6] == ["EXIT", "0", "JAX", "False", "NUMPYRO", "False"], done.stdout + done.stderr
    assert float(last[7]) < 0.5  # importing JAX alone takes over 1 s here
    assert ("usage: nlmegen" in done.stdout) if flag == "--help" else (nlmegen.__version__ in done.stdout)


def test_jax_settings_apply_when_jax_is_imported_after_nlmegen():
    """x64 (and the compilation cache) are set by the post-import hook, before any array exists."""
    code = ("import sys, nlmegen; assert 'jax' not in sys.modules; import jax.numpy as jnp; "
            "print(jnp.ones(2).dtype, nlmegen.simulate.__module__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(nlmegen.__file__).resolve().parents[1], env={**os.environ, "NLMEGEN_CACHE_DIR": "0"})
    assert done.stdout.split() == ["float64", "nlmegen._simulate"], done.stderr
