"""`FitResult`: the one record every estimation backend returns (FOCEI/Laplace, SAEM, NUTS, SVI).

Everything inside is NumPy / pandas (no JAX arrays), so a result can be pickled, compared, saved to
netCDF (`FitResult.save`, `nlmegen.load`) and converted to an ArviZ `DataTree`
(`FitResult.to_arviz`). The ArviZ/xarray code lives in :mod:`nlmegen.io._arviz` and is imported
only when those methods are called.

Labels of array elements follow one rule everywhere (`element_labels`): a scalar site is labelled
by its name, any other site by ``name[i]`` with ``i`` the flat (C-order) index of the element.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["FitResult", "element_labels", "label_site", "STATUSES"]

STATUSES = ("converged", "not_converged", "failed", "interrupted")  # interrupted: Ctrl-C, state so far
Z95 = 1.959963984540054  # standard normal 97.5% quantile


def element_labels(name: str, shape: tuple) -> list[str]:
    """Labels of the elements of a site of ``shape``: ``[name]`` or ``name[0]``, ``name[1]``, ...

    Parameters
    ----------
    name
        Site name.
    shape
        Shape of the site's value; the labels use the flat (C-order) index.

    Returns
    -------
    list of str
    """
    shape = tuple(shape)
    if shape == ():
        return [name]
    return [f"{name}[{i}]" for i in range(int(np.prod(shape)))]


def label_site(label: str) -> str:
    """Site name of an element label (``"omega[1]"`` -> ``"omega"``, ``"tka"`` -> ``"tka"``)."""
    return str(label).split("[", 1)[0]


def _history_default() -> pd.DataFrame:
    return pd.DataFrame({"iteration": np.zeros(0, dtype=np.int64), "ofv": np.zeros(0),
                         "grad_norm": np.zeros(0)})


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return np.asarray(obj).tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    return repr(obj)


def _json_form(value: Any) -> Any:
    """``value`` as it comes back from JSON (tuples become lists, NumPy scalars Python scalars)."""
    return json.loads(json.dumps(value, default=_json_default))


@dataclass(frozen=True, kw_only=True)
class FitResult:
    """Result of one estimation, whatever the backend (maximum likelihood or Bayesian).

    All fields are keyword-only. Arrays given as JAX arrays or lists are converted to NumPy on
    construction; ``settings`` is stored in its JSON form (tuples become lists) so that a saved
    and reloaded result compares equal.

    Attributes
    ----------
    method : str
        ``"focei"``, ``"foce"``, ``"laplace"``, ``"fo"``, ``"saem"``, ``"nuts"``, ``"svi"``, ...
    params : dict of str -> ndarray
        Estimates on the user's (constrained) scale, one array per population site (0-d for
        scalar sites), fixed sites included.
    se : dict of str -> ndarray
        Standard errors of ``params`` (same keys and shapes; NaN where unavailable; may be empty).
    ofv : float
        NONMEM objective function value: -2 log-likelihood without ``n_obs * log(2 pi)``.
    loglik : float
        Log-likelihood with the constant, ``-(ofv + n_obs log(2 pi)) / 2``.
    aic, bic : float
        Information criteria (computed by the backend).
    n_obs, n_params, n_subjects : int
        Observations, estimated (free) population parameters, subjects.
    status : str
        One of ``"converged"``, ``"not_converged"``, ``"failed"``, ``"interrupted"`` (Ctrl-C during
        the fit: the estimates are the state reached, see `nlmegen.resume`).
    message : str
        The optimiser's / sampler's message.
    ebes : pandas.DataFrame
        Empirical Bayes estimates on the user's scale: index the subject IDs (named ``"ID"``),
        one column per random-effect element (``"eta[0]"``, ...; a scalar site by its name).
    ebe_cov : ndarray ``[n_subjects, n_eta, n_eta]``
        Conditional covariance of each subject's EBEs in the unconstrained random-effect space
        (columns in the order of ``ebes``).
    ebe_converged : ndarray ``[n_subjects]`` of bool
        Whether each subject's EBE search converged.
    ids : tuple
        Original subject IDs, in the order of the subject axis.
    times, dv : ndarray ``[n_subjects, n_slots]``
        Observation times and dependent variable (padded; see ``mask``).
    mask : ndarray ``[n_subjects, n_slots]`` of bool
        True on real observations.
    dvid : ndarray ``[n_subjects, n_slots]`` of int
        Output index of each observation (into ``outputs``).
    outputs : tuple of str
        Output labels.
    pred, ipred : ndarray ``[n_subjects, n_slots]``
        Population (random effects at zero) and individual (at the EBEs) predictions.
    theta : ndarray
        Unconstrained estimate of all population parameters, fixed ones included.
    theta_names : tuple of str
        One label per element of ``theta`` (``"tka"``, ``"omega[0]"``; see `element_labels`).
    free : ndarray of bool
        Which elements of ``theta`` were estimated.
    covariance : ndarray ``[n_free, n_free]`` or None
        Covariance of the estimated (free) unconstrained parameters.
    covariance_kind : str
        ``"sandwich"``, ``"R"``, ``"S"`` or ``"none"``.
    se_unconstrained : ndarray or None
        Standard errors of the free unconstrained parameters.
    shrinkage : dict of str -> ndarray
        Shrinkage in percent, e.g. ``{"eta": per component, "eps": per output}``.
    history : pandas.DataFrame
        Iteration log: ``"iteration"``, ``"ofv"``, ``"grad_norm"`` and one column per theta label.
    timings : dict of str -> float
        Seconds: ``"compile_s"``, ``"run_s"``, ``"covariance_s"``, ...
    settings : dict
        Backend settings, JSON form.
    warnings : tuple of str
        Warnings raised during the fit.
    draws : dict of str -> ndarray or None
        Posterior draws ``[chain, draw, ...]`` of Bayesian backends (None for maximum likelihood).
    fixed : tuple of str
        Names of the sites held fixed.
    transforms : dict of str -> numpyro Transform
        Site -> ``biject_to(support)`` (unconstrained -> user scale) for population and
        random-effect sites. Not compared; saved only as the support's name.
    model, pop
        The model function and the `Population` fitted (not compared; `save` keeps the event table
        and, for a model importable by name, a reference to it).
    tables : dict
        Tables computed once and kept (``"natural"``; restored by `nlmegen.load`). Not compared.
    classes : pandas.DataFrame or None
        Mixture models (`nlmegen.mixture`): each subject's posterior probability of each class
        (``p(<site>=k)``) and its most probable ``class``; the EBEs, IPRED and residuals are those
        of that class. Not compared; not saved by `save`.
    """

    method: str
    params: dict[str, np.ndarray]
    se: dict[str, np.ndarray] = field(default_factory=dict)
    ofv: float
    loglik: float
    aic: float
    bic: float
    n_obs: int
    n_params: int
    n_subjects: int
    status: str
    message: str = ""
    ebes: pd.DataFrame
    ebe_cov: np.ndarray
    ebe_converged: np.ndarray
    ids: tuple
    times: np.ndarray
    dv: np.ndarray
    mask: np.ndarray
    dvid: np.ndarray
    outputs: tuple[str, ...]
    pred: np.ndarray
    ipred: np.ndarray
    theta: np.ndarray
    theta_names: tuple[str, ...]
    free: np.ndarray
    covariance: np.ndarray | None = None
    covariance_kind: str = "none"
    se_unconstrained: np.ndarray | None = None
    shrinkage: dict[str, np.ndarray] = field(default_factory=dict)
    history: pd.DataFrame = field(default_factory=_history_default)
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    draws: dict[str, np.ndarray] | None = None
    fixed: tuple[str, ...] = ()
    transforms: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    model: Any = field(default=None, compare=False, repr=False)
    pop: Any = field(default=None, compare=False, repr=False)
    tables: dict = field(default_factory=dict, compare=False, repr=False)
    classes: pd.DataFrame | None = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        self._coerce()
        self._check()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _coerce(self) -> None:
        arrays = {"times": float, "dv": float, "mask": bool, "dvid": np.int64, "pred": float,
                  "ipred": float, "theta": float, "free": bool, "ebe_cov": float, "ebe_converged": bool}
        for name, dtype in arrays.items():
            self._set(name, np.asarray(getattr(self, name), dtype=dtype))
        for name in ("covariance", "se_unconstrained"):
            if getattr(self, name) is not None:
                self._set(name, np.asarray(getattr(self, name), dtype=float))
        for name in ("params", "se", "shrinkage"):
            self._set(name, {str(k): np.asarray(v) for k, v in getattr(self, name).items()})
        if self.draws is not None:
            self._set("draws", {str(k): np.asarray(v) for k, v in self.draws.items()})
        for name in ("ofv", "loglik", "aic", "bic"):
            self._set(name, float(getattr(self, name)))
        for name in ("n_obs", "n_params", "n_subjects"):
            self._set(name, int(getattr(self, name)))
        self._set("ids", tuple(i.item() if isinstance(i, np.generic) else i for i in self.ids))
        for name in ("outputs", "theta_names", "warnings", "fixed"):
            self._set(name, tuple(str(x) for x in getattr(self, name)))
        self._set("timings", {str(k): float(v) for k, v in self.timings.items()})
        self._set("settings", _json_form(dict(self.settings)))
        self._set("transforms", dict(self.transforms))
        self._set("tables", dict(self.tables))
        self._nan_fixed_elements()

    def _nan_fixed_elements(self) -> None:
        """Elements held fixed one by one (``fixed=("omega[2]",)``) have no standard error."""
        for label in self.fixed:
            site = label_site(label)
            if label != site and site in self.se:
                se = np.array(self.se[site], dtype=float)
                index = int(label[len(site) + 1:-1])
                if 0 <= index < se.size:
                    se.reshape(-1)[index] = np.nan
                    self.se[site] = se

    def _check(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"FitResult: {what}")

        need(self.status in STATUSES, f"status {self.status!r} is not one of {STATUSES}")
        need(len(self.ids) == self.n_subjects, f"{len(self.ids)} ids for n_subjects={self.n_subjects}")
        grid = self.times.shape
        need(len(grid) == 2 and grid[0] == self.n_subjects, f"times has shape {grid}, not [n_subjects, n_slots]")
        for name in ("dv", "mask", "dvid", "pred", "ipred"):
            need(getattr(self, name).shape == grid, f"{name} has shape {getattr(self, name).shape}, not {grid}")
        need(self.theta.ndim == 1 and len(self.theta_names) == self.theta.size == self.free.size,
             "theta, theta_names and free must be 1-D and of one length")
        n_free = int(self.free.sum())
        if self.covariance is not None:
            need(self.covariance.shape == (n_free, n_free), f"covariance must be [{n_free}, {n_free}]")
        need(isinstance(self.ebes, pd.DataFrame) and len(self.ebes) == self.n_subjects,
             "ebes must be a DataFrame with one row per subject")
        n_eta = self.ebes.shape[1]
        need(self.ebe_cov.shape == (self.n_subjects, n_eta, n_eta),
             f"ebe_cov has shape {self.ebe_cov.shape}, not {(self.n_subjects, n_eta, n_eta)}")
        need(self.ebe_converged.shape == (self.n_subjects,), "ebe_converged must be [n_subjects]")
        for key, value in self.se.items():
            need(key in self.params and value.shape == self.params[key].shape,
                 f"se[{key!r}] has no estimate of its shape in params")
        if self.draws is not None:
            need(all(v.ndim >= 2 for v in self.draws.values()), "draws must be [chain, draw, ...]")

    # ------------------------------------------------------------------ comparison
    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self) if f.compare)

    # ------------------------------------------------------------------ derived quantities
    @property
    def correlation(self) -> np.ndarray | None:
        """Correlation matrix of the free unconstrained parameters (None without a covariance)."""
        if self.covariance is None:
            return None
        sd = np.sqrt(np.diag(self.covariance))
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.covariance / np.outer(sd, sd)

    @property
    def estimates(self) -> dict[str, float]:
        """The user-scale estimates flattened: ``{label: value}`` (labels of `element_labels`)."""
        out = {}
        for name, value in self.params.items():
            out.update(zip(element_labels(name, value.shape), np.ravel(value).astype(float).tolist(), strict=True))
        return out

    @property
    def condition_number(self) -> float:
        """Largest over smallest eigenvalue of `correlation` (NaN without a covariance)."""
        from .table import condition_number

        return condition_number(self.correlation)

    def table(self, scale: str = "natural") -> pd.DataFrame:
        """The parameter table on the ``"natural"`` or the ``"estimation"`` scale.

        ``"natural"``: what a pharmacometrician reads: population sites on their own scale (sites
        that only parameterise the random effects left out), the model's ``numpyro.deterministic``
        sites (typical values), OMEGA as variances with CV% and shrinkage per random effect, a
        full block's correlations, delta-method SEs and intervals mapped from the estimation
        scale; ``table.attrs`` holds ``condition_number``, the ``omega`` matrix and ``notes``. See
        :mod:`nlmegen.infer.shared.table` for every formula. Computed once and kept.

        ``"estimation"``: `summary`, one row per element of every population site.

        Examples
        --------
        >>> import nlmegen
        >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
        >>> fit = nlmegen.fit(nlmegen.examples.theo_model, pop, progress=False)
        >>> table = fit.table()
        >>> [label for label in table.index if label.startswith("OMEGA")]
        ['OMEGA(eta[0])', 'OMEGA(eta[1])', 'OMEGA(eta[2])']
        """
        if scale == "estimation":
            return self.summary()
        if scale != "natural":
            raise ValueError(f"scale must be 'natural' or 'estimation', not {scale!r}")
        computed = "natural" in self.tables and self.tables.get("_natural_for") == id(self.model)
        if not computed and (self.model is not None or "natural" not in self.tables):
            from .table import natural_table

            self.tables["natural"] = natural_table(self)
            self.tables["_natural_for"] = id(self.model)
        table = self.tables["natural"]
        out = table.copy()
        out.attrs = dict(table.attrs)
        return out

    def summary(self) -> pd.DataFrame:
        """Parameter table on the estimation scale: one row per scalar element of every population site.

        Columns: ``estimate``, ``SE``, ``RSE%`` (``100 SE / |estimate|``, NaN at an estimate of
        0), ``CI95_lower``, ``CI95_upper`` and ``fixed``. The 95% intervals use the delta method:
        ``estimate +/- 1.96 SE``, except for positive-valued sites (support ``positive``,
        ``softplus_positive``, ``greater_than(0)``, ... as told by ``transforms``), where the
        interval is built on the log scale, ``exp(log estimate +/- 1.96 SE / estimate)``, so it
        stays positive and matches the usual log-normal asymptotics of such parameters. Fixed
        sites have NaN SE and intervals.

        Fits with posterior ``draws`` (NUTS, SVI) report the posterior instead: ``estimate`` is
        the median, ``SE`` the posterior SD, the interval the equal-tailed 95% credible interval
        (2.5% and 97.5% quantiles of the draws), and ArviZ's diagnostics are added: ``r_hat``
        (rank-normalised split R-hat), ``ess_bulk`` and ``ess_tail`` (Vehtari et al. 2021).

        Returns
        -------
        pandas.DataFrame
            Indexed by element label (index name ``"parameter"``).
        """
        if self.draws is not None:
            return self._posterior_summary()
        rows = []
        for name, value in self.params.items():
            est = np.ravel(np.asarray(value, dtype=float))
            site_fixed = name in self.fixed
            se = np.ravel(self.se[name]).astype(float) if name in self.se else np.full(est.shape, np.nan)
            se = np.full(est.shape, np.nan) if site_fixed else se
            positive = _positive_valued(self.transforms.get(name))
            for label, e, s in zip(element_labels(name, value.shape), est, se, strict=True):
                fixed = site_fixed or label in self.fixed
                s = math.nan if fixed else s
                lo, hi = _interval(e, s, positive)
                rse = 100.0 * s / abs(e) if e != 0 else math.nan
                rows.append((label, e, s, rse, lo, hi, fixed))
        table = pd.DataFrame(rows, columns=["parameter", "estimate", "SE", "RSE%", "CI95_lower", "CI95_upper",
                                            "fixed"])
        return table.set_index("parameter")

    def _posterior_summary(self) -> pd.DataFrame:
        import arviz as az

        rows = []
        for name, value in self.params.items():
            fixed = name in self.fixed
            labels = element_labels(name, value.shape)
            if fixed or name not in self.draws:
                pairs = zip(labels, np.ravel(value), strict=True)
                rows.extend((lab, float(e), *[math.nan] * 6, fixed) for lab, e in pairs)
                continue
            x = np.asarray(self.draws[name], dtype=float)
            flat = x.reshape(x.shape[:2] + (-1,))
            lo, hi = np.quantile(flat, [0.025, 0.975], axis=(0, 1))
            sd = np.std(flat, axis=(0, 1), ddof=1)
            diag = {}
            checks = (("r_hat", {}), ("ess_bulk", {"method": "bulk"}), ("ess_tail", {"method": "tail", "prob": 0.05}))
            for what, kw in checks:
                fn = az.rhat if what == "r_hat" else az.ess
                diag[what] = (np.atleast_1d(np.asarray(fn(flat, chain_axis=0, draw_axis=1, **kw), dtype=float))
                              if x.shape[0] * x.shape[1] >= 4 else np.full(flat.shape[-1], np.nan))
            for i, (label, e) in enumerate(zip(labels, np.ravel(value), strict=True)):
                rse = 100.0 * sd[i] / abs(e) if e != 0 else math.nan
                rows.append((label, float(e), sd[i], rse, lo[i], hi[i], diag["r_hat"][i], diag["ess_bulk"][i],
                             diag["ess_tail"][i], False))
        columns = ["parameter", "estimate", "SE", "RSE%", "CI95_lower", "CI95_upper", "r_hat", "ess_bulk",
                   "ess_tail", "fixed"]
        return pd.DataFrame(rows, columns=columns).set_index("parameter")

    def __repr__(self) -> str:
        lines = [f"FitResult: method={self.method!r}, status={self.status!r}"]
        if self.message:
            lines.append(f"  message: {self.message}")
        lines.append(f"  OFV {self.ofv:.4f}   -2LL {-2.0 * self.loglik:.4f}   AIC {self.aic:.4f}   "
                     f"BIC {self.bic:.4f}")
        lines.append(f"  {self.n_subjects} subjects, {self.n_obs} observations, {self.n_params} estimated "
                     f"parameters, covariance: {self.covariance_kind}")
        for name, value in self.shrinkage.items():
            lines.append(f"  {name} shrinkage (%): " + ", ".join(f"{v:.1f}" for v in np.ravel(value)))
        if self.params:
            lines.extend(["", self._table_text()])
        if self.warnings:
            lines.extend(["", "warnings:"] + [f"  - {w}" for w in self.warnings])
        return "\n".join(lines)

    def _table_text(self) -> str:
        """The natural-scale table when it can be had, else the estimation-scale one (repr never fails)."""
        fmt = {"float_format": lambda x: f"{x:.4g}"}
        try:
            table = self.table("natural")
        except Exception as err:  # noqa: BLE001 - a repr must print whatever the model does
            note = f"(estimation scale; natural-scale table unavailable: {err})"
            return note + "\n" + self.summary().to_string(**fmt)
        shown = table.drop(columns=[c for c in ("CV%", "shrinkage%") if table[c].isna().all()])
        text = shown.to_string(na_rep="", **fmt)
        cond = table.attrs.get("condition_number", math.nan)
        if np.isfinite(cond):
            text += f"\ncondition number of the correlation matrix of the estimates: {cond:.4g}"
        return text + "".join(f"\nnote: {n}" for n in table.attrs.get("notes", []))

    def require_model(self, what: str, *, model: Any = None, pop: Any = None) -> tuple[Any, Any]:
        """``(model, pop)`` for ``what`` (``model``/``pop`` given win over the fit's), or one clear
        `ValueError` saying what is missing and how to give it."""
        model = self.model if model is None else model
        pop = self.pop if pop is None else pop
        if model is not None and pop is not None:
            return model, pop
        missing = " and ".join(n for n, v in (("model", model), ("data (pop)", pop)) if v is None)
        ref = self.tables.get("model_ref")
        if "arviz" in self.tables:  # read from a file
            why = (f"its model {ref!r} is not loaded (a model file is never executed by load; "
                   "nlmegen.__main__.load_model(ref) loads it)" if ref and ".py:" in ref and model is None else
                   f"its model {ref!r} could not be imported" if ref and model is None else
                   "the file names no importable model (one defined in __main__ or inside a function)"
                   if model is None else "its event table could not be read back")
            how = "pass them when loading: nlmegen.load(path, model=..., pop=...)"
        else:
            why = "this result does not hold " + ("them" if " and " in missing else "it")
            how = "attach them with dataclasses.replace(fit, model=..., pop=...)"
        raise ValueError(f"{what} needs the fit's {missing}: {why}; {how}")

    # ------------------------------------------------------------------ I/O (delegated)
    def residuals(self, *, n_sim: int = 1000, key: Any = None) -> pd.DataFrame:
        """PRED, IPRED, RES, IWRES, CWRES and NPDE per observation (see `nlmegen.diagnostics.residuals`)."""
        from ...diagnostics import residuals

        return residuals(self, n_sim=n_sim, key=key)

    def to_arviz(self, n_draws: int = 1000, seed: int = 0, *, log_likelihood: bool = True,
                 posterior_predictive: bool | None = None) -> Any:
        """This result as an ArviZ `xarray.DataTree`; see :func:`nlmegen.io.to_arviz`.

        Parameters
        ----------
        n_draws
            Draws from the asymptotic normal for maximum-likelihood fits (ignored when ``draws``
            holds posterior draws).
        seed
            Seed of those draws.
        log_likelihood
            Add the ``log_likelihood`` group (every fit holding its model and data): variables
            ``subject_marginal`` (per subject, random effects integrated out: leave-one-subject-out)
            and ``DV`` (per observation, given each draw's random effects).
        posterior_predictive
            Add the ``posterior_predictive`` group (default: every fit holding its model and data).

        A fit read by `nlmegen.load` returns the groups stored in its file.
        """
        from ...io._arviz import to_arviz

        return to_arviz(self, n_draws=n_draws, seed=seed, log_likelihood=log_likelihood,
                        posterior_predictive=posterior_predictive)

    def save(self, path: Any, *, overwrite: bool = False, n_draws: int = 400) -> None:
        """Write this result to a netCDF file that ArviZ reads (see :func:`nlmegen.io.save`).

        Parameters
        ----------
        path
            File to write; read it back with :func:`nlmegen.load` (or ``arviz.from_netcdf``).
        overwrite
            Replace an existing file; otherwise an existing ``path`` raises `FileExistsError`.
        n_draws
            Draws stored in the ArviZ groups of a maximum-likelihood fit.
        """
        from ...io._file import save

        save(self, path, overwrite=overwrite, n_draws=n_draws)

    @staticmethod
    def load(path: Any, *, model: Any = None, pop: Any = None) -> FitResult:
        """Read a result written by `FitResult.save` (same as :func:`nlmegen.load`)."""
        from ...io._file import load

        return load(path, model=model, pop=pop)

    def loo(self, by: str = "subject", **kwargs: Any) -> Any:
        """PSIS leave-one-out cross-validation with ArviZ (``arviz.loo``) on `to_arviz`'s groups.

        Parameters
        ----------
        by
            ``"subject"`` (default): leave one *subject* out, on the marginal log-likelihood of
            each subject (random effects integrated out; log-likelihood variable
            ``subject_marginal``): the predictive accuracy for new subjects, comparable between
            maximum-likelihood and Bayesian fits (``arviz.compare(..., var_name="subject_marginal")``).
            ``"observation"``: leave one observation out, conditional on the random effects
            (variable ``DV``); with subject-level random effects this often gives high Pareto k.
        **kwargs
            Passed to ``arviz.loo``.
        """
        import arviz as az

        names = {"subject": "subject_marginal", "observation": "DV"}
        if by not in names:
            raise ValueError(f"by must be one of {list(names)}, not {by!r}")
        return az.loo(self.to_arviz(), var_name=names[by], **kwargs)


def _interval(est: float, se: float, positive: bool) -> tuple[float, float]:
    """95% interval: log-scale delta method for positive values, else ``est +/- 1.96 se``."""
    if not np.isfinite(se):
        return math.nan, math.nan
    if positive and est > 0:
        half = Z95 * se / est
        return est * math.exp(-half), est * math.exp(half)
    return est - Z95 * se, est + Z95 * se


def _positive_valued(transform: Any) -> bool:
    """Whether a transform maps onto the positive reals (its codomain is ``> 0`` or ``>= 0``)."""
    if transform is None:
        return False
    from numpyro.distributions import constraints

    codomain = getattr(transform, "codomain", None)
    while isinstance(codomain, constraints._IndependentConstraint):
        codomain = codomain.base_constraint
    if isinstance(codomain, constraints._Interval) or not isinstance(codomain, constraints._GreaterThan):
        return False
    return bool(np.all(np.asarray(codomain.lower_bound) == 0))


def _same(a: Any, b: Any) -> bool:
    """Equality that understands arrays (NaN == NaN), DataFrames and nested containers."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, pd.DataFrame) or isinstance(b, pd.DataFrame):
        if not (isinstance(a, pd.DataFrame) and isinstance(b, pd.DataFrame)):
            return False
        try:
            pd.testing.assert_frame_equal(a, b)
        except AssertionError:
            return False
        return True
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and list(a) == list(b)
                and all(_same(a[k], b[k]) for k in a))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype.kind != b.dtype.kind:
            return False
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)
