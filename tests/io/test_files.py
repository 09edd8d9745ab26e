"""Result files: ArviZ reads them, `nlmegen.load` gives everything back, and no user data is lost
(unique temporary file, atomic rename, checksum, format version) (issues 18 and 19)."""

import json
import os

import arviz as az
import h5py
import jax
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import xarray as xr

import nlmegen
from nlmegen.io import FileFormatError
from nlmegen.io._file import checksum

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def pop():
    return nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))


@pytest.fixture(scope="module")
def focei(pop):
    return nlmegen.fit(nlmegen.examples.theo_model, pop, progress=False)


@pytest.fixture(scope="module")
def saved(focei, tmp_path_factory):
    path = tmp_path_factory.mktemp("files") / "theo.nc"
    focei.save(path)
    return path


@pytest.fixture(scope="module")
def loaded(saved):
    return nlmegen.load(saved)


# ---------------------------------------------------------------------- ArviZ reads it, load gives it back
def test_arviz_reads_the_file(saved):
    dt = az.from_netcdf(saved)
    for group in ("posterior", "log_likelihood", "posterior_predictive", "observed_data"):
        assert group in dt.children
    table = az.summary(dt, var_names=["tka", "tcl", "tv"])
    assert list(table.index) == ["tka", "tcl", "tv"]
    loo = az.loo(dt, var_name="subject_marginal")
    assert loo.n_data_points == 12


def test_load_gives_everything_back(focei, loaded):
    assert loaded == focei
    tree, original = loaded.to_arviz(), focei.to_arviz(n_draws=400)  # what save stores
    for group in ("posterior", "log_likelihood", "posterior_predictive"):
        for name, var in original[group].data_vars.items():
            np.testing.assert_array_equal(tree[group][name].values, var.values)
    natural = loaded.tables["natural"]
    assert list(natural.index) == list(focei.table().index)
    np.testing.assert_allclose(natural["estimate"].to_numpy(float), focei.table()["estimate"].to_numpy(float))
    assert natural.attrs["condition_number"] == pytest.approx(focei.condition_number)
    assert loaded.model is nlmegen.examples.theo_model  # importable by name: re-imported
    assert loaded.pop.n_subjects == 12 and np.array_equal(np.asarray(loaded.pop.dv), np.asarray(focei.pop.dv))
    assert dict(loaded.pop.units) == {"AMT": "mg", "DV": "mg/L", "TIME": "h", "WT": "kg"}  # the axes' units


def test_loaded_fit_runs_the_diagnostics(loaded, tmp_path):
    import matplotlib.pyplot as plt

    assert len(loaded.residuals(n_sim=50)) == 132
    assert not nlmegen.vpc(loaded, n_sim=20).table.empty
    for name, fig in (("gof", nlmegen.gof(loaded, n_sim=50)), ("ind", nlmegen.plot_individuals(loaded, ids=[1, 2]))):
        fig.savefig(tmp_path / f"{name}.png")
        plt.close(fig)
        assert (tmp_path / f"{name}.png").stat().st_size > 5000


def _local_model_fit(pop):
    def local(pop):  # defined inside a function: the file cannot name it
        tcl = numpyro.sample("tcl", dist.Normal(1.0, 1.0))
        omega = numpyro.sample("omega", dist.HalfNormal(1.0))
        sd = numpyro.sample("sd", dist.HalfNormal(1.0))
        with nlmegen.subjects(pop):
            eta = numpyro.sample("eta", dist.Normal(0.0, omega))
            conc = nlmegen.pk.one_cmt(pop, cl=jax.numpy.exp(tcl + eta), v=32.0, ka=1.5)
            nlmegen.observe("conc", nlmegen.additive(conc, sd), pop)

    return local, nlmegen.fit(local, pop, progress=False)


def test_model_that_cannot_be_imported_gives_one_clear_message(pop, tmp_path):
    local, fit = _local_model_fit(pop)
    fit.save(tmp_path / "local.nc")
    back = nlmegen.load(tmp_path / "local.nc")
    assert back.model is None and back.pop is not None and back == fit
    assert "OMEGA(eta)" in repr(back)  # the stored natural-scale table
    message = "needs the fit's model: the file names no importable model.*nlmegen.load\\(path, model=\\.\\.\\."
    for call in (lambda: nlmegen.plot_individuals(back), lambda: nlmegen.vpc(back), lambda: back.residuals(),
                 lambda: nlmegen.gof(back)):
        with pytest.raises(ValueError, match=message):
            call()
    again = nlmegen.load(tmp_path / "local.nc", model=local)
    assert len(again.residuals(n_sim=20)) == 132


# ---------------------------------------------------------------------- files that never lose data
def test_save_never_touches_other_files(focei, tmp_path):
    target = tmp_path / "mine.nc"
    partial = tmp_path / "mine.nc.partial"
    partial.write_text("a user's file")
    focei.save(target)
    assert partial.read_text() == "a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.nc", "mine.nc.partial"]  # no temporary left
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not the temporary file's 0600
    with pytest.raises(FileExistsError):
        focei.save(target)


def test_interrupted_save_keeps_the_old_file(focei, tmp_path, monkeypatch):
    import xarray as xr

    target = tmp_path / "fit.nc"
    focei.save(target)
    before = target.read_bytes()

    def broken(self, path, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.DataTree, "to_netcdf", broken)
    with pytest.raises(KeyboardInterrupt):
        focei.save(target, overwrite=True)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["fit.nc"]


def _copy(saved, tmp_path, name="copy.nc"):
    out = tmp_path / name
    out.write_bytes(saved.read_bytes())
    return out


def test_changed_estimate_fails_the_checksum(saved, tmp_path):
    path = _copy(saved, tmp_path)
    with h5py.File(path, "r+") as f:
        f["nlmegen/params/tcl"][()] = 1.5
    with pytest.raises(FileFormatError, match="checksum mismatch"):
        nlmegen.load(path)


def test_unknown_format_version_is_refused(saved, tmp_path):
    path = _copy(saved, tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["nlmegen_format_version"] = 99
    with pytest.raises(FileFormatError, match="format version 99 cannot be read.*newer nlmegen"):
        nlmegen.load(path)


def test_damaged_metadata_is_named(saved, tmp_path):
    path = _copy(saved, tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["nlmegen_meta"] = f.attrs["nlmegen_meta"][:-40]
    with pytest.raises(FileFormatError, match="metadata .*damaged"):
        nlmegen.load(path)
    path = _copy(saved, tmp_path, "keys.nc")
    with h5py.File(path, "r+") as f:  # valid JSON with a key missing: the checksum catches it
        meta = json.loads(f.attrs["nlmegen_meta"])
        del meta["supports"]
        f.attrs["nlmegen_meta"] = json.dumps(meta)
    with pytest.raises(FileFormatError, match="checksum mismatch"):
        nlmegen.load(path)
    tree = xr.load_datatree(path, engine="h5netcdf")
    with h5py.File(path, "r+") as f:  # ... and with the checksum recomputed, the missing key is named
        f.attrs["nlmegen_checksum"] = checksum(tree, f.attrs["nlmegen_meta"])
    with pytest.raises(FileFormatError, match="do not make a FitResult.*KeyError: 'supports'"):
        nlmegen.load(path)


def test_corrupted_bytes_give_a_clear_error(saved, tmp_path):
    path = _copy(saved, tmp_path)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.integers(0, len(data), 400):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError):
        nlmegen.load(path)
    truncated = _copy(saved, tmp_path, "short.nc")
    truncated.write_bytes(saved.read_bytes()[: os.path.getsize(saved) // 2])
    with pytest.raises(FileFormatError, match="cannot be read"):
        nlmegen.load(truncated)


def test_reloaded_bayesian_fit_keeps_its_groups(pop, tmp_path):
    fit = nlmegen.fit(nlmegen.examples.theo_model, pop, "nuts", key=jax.random.key(1), num_warmup=100,
                      num_samples=60, num_chains=1, progress=False)
    fit.save(tmp_path / "nuts.nc")
    back = nlmegen.load(tmp_path / "nuts.nc")
    tree = back.to_arviz()
    assert {"log_likelihood", "posterior_predictive", "sample_stats"} <= set(tree.children)
    np.testing.assert_array_equal(tree["log_likelihood"]["DV"].values,
                                  az.from_netcdf(tmp_path / "nuts.nc")["log_likelihood"]["DV"].values)
    assert back.loo().n_data_points == 12
