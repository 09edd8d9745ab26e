"""Fit result files: `save` and `load` (netCDF-4 through h5netcdf).

A file is an ArviZ file first: its groups are those of `FitResult.to_arviz` (``posterior``,
``log_likelihood``, ``posterior_predictive``, ``observed_data``, ...), so ``arviz.from_netcdf``
reads it and ``arviz.summary`` / ``arviz.loo`` work on it. Everything nlmegen needs to rebuild the
`FitResult` sits in one extra group ``nlmegen`` (groups ``arrays`` for the NumPy fields,
``params``, ``se``, ``shrinkage``, ``draws``, and one group per table: ``ebes``, ``history``,
``classes`` (mixture models),
``natural`` (the natural-scale table), ``omega``, ``event_table``, one variable per column).

Root attributes: ``nlmegen_format = "FitResult"``, ``nlmegen_format_version`` (this module writes
2 and reads 1 and 2), ``nlmegen_meta`` (JSON: scalars, tuples, dicts, the support name of every
transform, the layout of the tables, and ``model_ref``, ``"module:qualname"`` of a model that can
be imported by name) and ``nlmegen_checksum``, the SHA-256 of every variable (name, dims, values)
of every group and of the metadata, checked by `load`.

Writing is safe: the file is written under a unique temporary name in the target's folder and
moved into place by one atomic rename, so an interrupted save leaves any earlier file intact and
never touches other files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..infer.shared.result import _json_default
from ._arviz import _dims, support_name, transform_from_name

if TYPE_CHECKING:
    from ..infer.shared.result import FitResult

__all__ = ["FileFormatError", "load", "save"]

FORMAT, FORMAT_VERSION, READABLE_VERSIONS = "FitResult", 2, (1, 2)
GROUP = "nlmegen"  # the group that holds nlmegen's own fields (version 2)
USER_MODEL_PREFIX = "nlmegen_user_model_"  # module names of model files loaded by `nlmegen fit`
SAVE_DRAWS = 400  # asymptotic-normal draws stored for a maximum-likelihood fit
_ARRAYS = ("times", "dv", "mask", "dvid", "pred", "ipred", "theta", "free", "ebe_cov", "ebe_converged",
           "covariance", "se_unconstrained")
_SCALARS = ("method", "ofv", "loglik", "aic", "bic", "n_obs", "n_params", "n_subjects", "status", "message",
            "covariance_kind", "timings", "settings")
_TUPLES = ("ids", "outputs", "theta_names", "warnings", "fixed")


class FileFormatError(ValueError):
    """A file that is not a readable nlmegen result: damaged, changed, or of an unknown format version."""


# ---------------------------------------------------------------------- tables as datasets
def _values(values: Any) -> np.ndarray:
    """Column / index values as a NumPy array netCDF can hold (text as fixed-width unicode)."""
    arr = np.asarray(values)
    if arr.dtype.kind in "OUS" or str(getattr(values, "dtype", "")) in ("str", "string"):
        return np.asarray([str(v) for v in arr], dtype=str) if arr.size else np.zeros(0, dtype="<U1")
    return arr


def _frame_dataset(frame: pd.DataFrame) -> tuple[Any, dict]:
    import xarray as xr

    data = {f"c{i}": ("row", _values(frame.iloc[:, i])) for i in range(frame.shape[1])}
    index = frame.index
    meta = {"columns": [str(c) for c in frame.columns], "columns_dtype": str(frame.columns.dtype),
            "dtypes": [str(d) for d in frame.dtypes], "index_name": index.name, "index_dtype": str(index.dtype)}
    if isinstance(index, pd.RangeIndex):
        meta["range"] = [index.start, index.stop, index.step]
    else:
        data["index"] = ("row", _values(index))
    return xr.Dataset(data), meta


def _frame_from(ds: Any, meta: dict) -> pd.DataFrame:
    if "range" in meta:
        index = pd.RangeIndex(*meta["range"], name=meta["index_name"])
    else:
        index = pd.Index(ds["index"].values, dtype=meta["index_dtype"], name=meta["index_name"])
    columns = {i: pd.Series(ds[f"c{i}"].values, index=index).astype(dtype)
               for i, dtype in enumerate(meta["dtypes"])}
    frame = pd.DataFrame(columns, index=index)
    frame.columns = pd.Index(meta["columns"], dtype=meta["columns_dtype"])
    return frame


def _dict_dataset(values: dict[str, np.ndarray]) -> Any:
    import xarray as xr

    bad = [k for k in values if "/" in k]
    if bad:
        raise ValueError(f"cannot save names containing '/': {bad}")
    return xr.Dataset({k: (_dims(k, np.ndim(v), False), np.asarray(v)) for k, v in values.items()})


def _dict_from(ds: Any, keys: list[str]) -> dict[str, np.ndarray]:
    return {k: np.asarray(ds[k].values) for k in keys}


# ---------------------------------------------------------------------- checksum
def _canonical(values: Any) -> bytes:
    """Bytes of an array that survive the netCDF round trip (text, bool and widths normalised)."""
    arr = np.asarray(values)
    if arr.dtype.kind in "OUS":
        return "\x1f".join(str(v) for v in arr.ravel()).encode()
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8).tobytes()
    if arr.dtype.kind in "iu":
        return np.ascontiguousarray(arr, dtype=np.int64).tobytes()
    if arr.dtype.kind in "mM":
        return np.ascontiguousarray(arr).view(np.int64).tobytes()
    return np.ascontiguousarray(arr, dtype=np.float64 if arr.dtype.kind == "f" else arr.dtype).tobytes()


def checksum(tree: Any, meta: str) -> str:
    """SHA-256 over every variable of every group of ``tree`` (sorted by path) and ``meta``."""
    h = hashlib.sha256(meta.encode())
    for node in sorted(tree.subtree, key=lambda n: n.path):
        ds = node.to_dataset(inherit=False)
        for name in sorted(ds.variables, key=str):
            var = ds.variables[name]
            h.update(f"{node.path}/{name}{tuple(var.dims)}{tuple(var.shape)}".encode())
            h.update(_canonical(var.values))
    return h.hexdigest()


# ---------------------------------------------------------------------- save
def _model_ref(model: Any) -> str | None:
    """``"module:qualname"`` of a model importable by name, ``"/path/file.py:qualname"`` of one loaded
    from a file (``nlmegen fit``); None for one defined in ``__main__`` or inside a function."""
    import sys

    module, qualname = getattr(model, "__module__", None), getattr(model, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        return None
    if module.startswith(USER_MODEL_PREFIX):  # loaded from a file by nlmegen fit: name the file
        path = getattr(sys.modules.get(module), "__file__", None)
        return f"{Path(path).resolve()}:{qualname}" if path else None
    return f"{module}:{qualname}"


def _meta(fit: FitResult, frames: dict, natural_attrs: dict | None) -> dict:
    from .. import __version__

    meta = {k: getattr(fit, k) for k in _SCALARS}
    meta.update({k: list(getattr(fit, k)) for k in _TUPLES})
    meta["supports"] = {k: support_name(t) for k, t in fit.transforms.items()}
    meta["keys"] = {k: list(getattr(fit, k)) for k in ("params", "se", "shrinkage")}
    meta["keys"]["draws"] = None if fit.draws is None else list(fit.draws)
    meta["optional"] = {k: getattr(fit, k) is not None for k in ("covariance", "se_unconstrained")}
    meta["frames"] = frames
    meta["natural_attrs"] = natural_attrs
    meta["model_ref"] = _model_ref(fit.model) if fit.model is not None else fit.tables.get("model_ref")
    meta["nlmegen_version"] = __version__
    meta["units"] = dict(fit.pop.units) if fit.pop is not None else {}
    return meta


def _tables(fit: FitResult) -> tuple[dict[str, pd.DataFrame], dict | None]:
    """The tables saved besides ``ebes`` and ``history``: natural-scale table, OMEGA, event table."""
    frames = {"ebes": fit.ebes, "history": fit.history}
    natural_attrs = None
    try:
        natural = fit.table("natural")
    except Exception:  # noqa: BLE001 - a model whose table cannot be built still saves
        natural = None
    if natural is not None:
        frames["natural"] = natural
        omega = natural.attrs.get("omega")
        if isinstance(omega, pd.DataFrame) and not omega.empty:
            frames["omega"] = omega
        natural_attrs = {"condition_number": natural.attrs.get("condition_number"),
                         "notes": list(natural.attrs.get("notes", []))}
    event_table = fit.tables.get("event_table")
    if fit.pop is not None:
        event_table = fit.pop.to_pandas()
    if event_table is not None:
        frames["event_table"] = event_table
    if fit.classes is not None:  # a mixture model's posterior class probabilities
        frames["classes"] = fit.classes
    return frames, natural_attrs


def save(fit: FitResult, path: str | os.PathLike, *, overwrite: bool = False, n_draws: int = SAVE_DRAWS) -> None:
    """Write ``fit`` to a netCDF file that ArviZ reads; read it back with `load`.

    Stored: the ArviZ groups of `FitResult.to_arviz` (with ``log_likelihood`` and
    ``posterior_predictive`` while the fit holds its model and data), every field of the result,
    the natural-scale table, the event table, and a reference to the model when it is importable
    by name (e.g. ``nlmegen.examples.theo_model``); a checksum covers all of it. Transforms are
    kept as support names (see `support_name`).

    Parameters
    ----------
    fit
        The result to save.
    path
        File to write. Written under a unique temporary name in the same folder, then renamed
        into place atomically.
    overwrite
        Replace an existing file. Without it an existing ``path`` raises `FileExistsError`.
    n_draws
        Draws of the ArviZ groups of a maximum-likelihood fit (`FitResult.to_arviz`; each costs
        one EBE search per subject for the ``subject_marginal`` log-likelihood). The loaded fit's
        `FitResult.to_arviz` returns these groups.
    """
    import xarray as xr

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    frames_data, natural_attrs = _tables(fit)
    frames, nodes = {}, {}
    for name, frame in frames_data.items():
        nodes[f"{GROUP}/{name}"], frames[name] = _frame_dataset(frame)
    arrays = {k: getattr(fit, k) for k in _ARRAYS if getattr(fit, k) is not None}
    nodes[f"{GROUP}/arrays"] = _dict_dataset(arrays)
    for name in ("params", "se", "shrinkage", "draws"):
        if getattr(fit, name) is not None:
            nodes[f"{GROUP}/{name}"] = _dict_dataset(getattr(fit, name))
    arviz_tree = fit.tables["arviz"] if "arviz" in fit.tables else fit.to_arviz(n_draws=n_draws)
    for node in arviz_tree.subtree:
        if node.path != "/" and node.has_data:
            nodes[node.path.lstrip("/")] = node.to_dataset(inherit=False)
    meta = json.dumps(_meta(fit, frames, natural_attrs), default=_json_default)
    root_attrs = {k: v for k, v in arviz_tree.attrs.items() if isinstance(v, (str, int, float))}
    tree = xr.DataTree.from_dict({"/": xr.Dataset(attrs=root_attrs), **nodes})
    tree.attrs.update({"nlmegen_format": FORMAT, "nlmegen_format_version": FORMAT_VERSION, "nlmegen_meta": meta,
                       "nlmegen_checksum": checksum(tree, meta)})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tree.to_netcdf(tmp, engine="h5netcdf")
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600: give the file the mode a plain open would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _file_mode(path: Path) -> int:
    """The replaced file's permission bits, or those the umask gives a new file."""
    if path.exists():
        return path.stat().st_mode & 0o777
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# ---------------------------------------------------------------------- load
def _read(path: Path) -> Any:
    import xarray as xr

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return xr.load_datatree(path, engine="h5netcdf")
    except Exception as err:  # noqa: BLE001 - h5py/h5netcdf raise many types for damaged files
        raise FileFormatError(f"{path} cannot be read as a netCDF-4 file (damaged or not written by "
                              f"FitResult.save): {type(err).__name__}: {err}") from err


def _header(tree: Any, path: Path) -> tuple[int, dict, str]:
    attrs = tree.attrs
    if attrs.get("nlmegen_format") != FORMAT:
        raise FileFormatError(f"{path} is not a file written by FitResult.save (no nlmegen_format attribute)")
    version = attrs.get("nlmegen_format_version")
    try:
        version = int(version)
    except (TypeError, ValueError):
        raise FileFormatError(f"{path}: format version {version!r} is not a number (damaged file)") from None
    if version not in READABLE_VERSIONS:
        newer = " (written by a newer nlmegen: upgrade to read it)" if version > FORMAT_VERSION else ""
        raise FileFormatError(f"{path}: format version {version} cannot be read; this nlmegen reads versions "
                              f"{list(READABLE_VERSIONS)}{newer}")
    raw = attrs.get("nlmegen_meta")
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise TypeError("not a JSON object")
    except (TypeError, ValueError) as err:
        raise FileFormatError(f"{path}: the metadata (nlmegen_meta) is damaged: {err}") from None
    if version >= 2:
        stored = attrs.get("nlmegen_checksum")
        if not stored:
            raise FileFormatError(f"{path}: the checksum (nlmegen_checksum) is missing")
        if checksum(tree, raw) != stored:
            raise FileFormatError(f"{path}: checksum mismatch: the file was changed or damaged after it was written "
                                  "(its contents are not what FitResult.save wrote)")
    return version, meta, raw


def _rebuild(tree: Any, meta: dict, prefix: str) -> dict:
    kwargs = {k: meta[k] for k in _SCALARS} | {k: tuple(meta[k]) for k in _TUPLES}
    present = [k for k in _ARRAYS if meta["optional"].get(k, True)]
    kwargs.update(_dict_from(tree[f"{prefix}arrays"].to_dataset(), present))
    kwargs.update({k: None for k, on in meta["optional"].items() if not on})
    for name, keys in meta["keys"].items():
        kwargs[name] = None if keys is None else _dict_from(tree[f"{prefix}{name}"].to_dataset() if keys else {},
                                                             keys)
    for name in ("ebes", "history"):
        kwargs[name] = _frame_from(tree[f"{prefix}{name}"].to_dataset(), meta["frames"][name])
    if "classes" in meta["frames"]:
        kwargs["classes"] = _frame_from(tree[f"{prefix}classes"].to_dataset(), meta["frames"]["classes"])
    transforms = {k: transform_from_name(v) for k, v in meta["supports"].items()}
    kwargs["transforms"] = {k: t for k, t in transforms.items() if t is not None}
    return kwargs


def _import_model(ref: str | None) -> Any:
    if not ref:
        return None
    import importlib
    import sys

    module, _, qualname = ref.rpartition(":")
    if module.endswith(".py"):  # a model file (nlmegen fit): never executed by load, only found if loaded
        loaded = [m for m in list(sys.modules.values())
                  if getattr(m, "__file__", None) and str(Path(m.__file__).resolve()) == module]
        obj = loaded[0] if loaded else None
        for part in qualname.split(".") if obj is not None else ():
            obj = getattr(obj, part, None)
        return obj
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj


def load(path: str | os.PathLike, *, model: Any = None, pop: Any = None) -> FitResult:
    """Read a `FitResult` written by `save`.

    The checksum and the format version are checked first. The result comes back with its
    ArviZ groups (`FitResult.to_arviz` returns them, ``log_likelihood`` and
    ``posterior_predictive`` included), its natural-scale table, and, so that `nlmegen.vpc`,
    `nlmegen.gof`, `FitResult.residuals` and `nlmegen.plot_individuals` work, its data
    (rebuilt from the stored event table) and its model (imported by the stored reference).

    Parameters
    ----------
    path
        The netCDF file.
    model, pop
        The model and the data, for a model the file could not name (one defined in ``__main__``
        or inside a function), or to replace the stored ones.

    Returns
    -------
    FitResult

    Raises
    ------
    FileFormatError
        (a `ValueError`) for a file that is damaged, was changed after it was written (checksum),
        has damaged metadata, or has a format version this nlmegen cannot read.
    """
    from ..infer.shared.result import FitResult

    path = Path(path)
    tree = _read(path)
    version, meta, _ = _header(tree, path)
    prefix = f"{GROUP}/" if version >= 2 else ""
    try:
        kwargs = _rebuild(tree, meta, prefix)
        fit = FitResult(**kwargs)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise FileFormatError(f"{path}: the file's contents do not make a FitResult (damaged metadata or "
                              f"group): {type(err).__name__}: {err}") from None
    if version >= 2:
        _attach(fit, tree, meta, model, pop)
    elif model is not None or pop is not None:
        object.__setattr__(fit, "model", model)
        object.__setattr__(fit, "pop", pop)
    return fit


def _attach(fit: FitResult, tree: Any, meta: dict, model: Any, pop: Any) -> None:
    """Stored ArviZ groups and tables, then the model and the data, onto a loaded result."""
    import xarray as xr

    frames = meta["frames"]
    arviz_nodes = {node.path: node.to_dataset(inherit=False) for node in tree.subtree
                   if node.path != "/" and not node.path.startswith(f"/{GROUP}") and node.has_data}
    root_attrs = {k: v for k, v in tree.attrs.items() if not k.startswith("nlmegen_")}
    fit.tables["arviz"] = xr.DataTree.from_dict({"/": xr.Dataset(attrs=root_attrs), **arviz_nodes})
    if "natural" in frames:
        natural = _frame_from(tree[f"{GROUP}/natural"].to_dataset(), frames["natural"])
        attrs = meta.get("natural_attrs") or {}
        omega = _frame_from(tree[f"{GROUP}/omega"].to_dataset(), frames["omega"]) if "omega" in frames else \
            pd.DataFrame()
        natural.attrs.update(condition_number=attrs.get("condition_number", float("nan")), omega=omega,
                             notes=list(attrs.get("notes", [])))
        fit.tables["natural"] = natural
    if "event_table" in frames:
        fit.tables["event_table"] = _frame_from(tree[f"{GROUP}/event_table"].to_dataset(), frames["event_table"])
    fit.tables["model_ref"] = meta.get("model_ref")
    if pop is None and "event_table" in fit.tables:
        from ..data import read_nonmem

        try:
            pop = read_nonmem(fit.tables["event_table"], units=meta.get("units") or None)
        except Exception:  # noqa: BLE001 - the stored result stays usable without its data
            pop = None
    object.__setattr__(fit, "model", model if model is not None else _import_model(meta.get("model_ref")))
    object.__setattr__(fit, "pop", pop)
