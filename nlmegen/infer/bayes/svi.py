"""SVI: variational Bayes of an nlmegen model, ELBO maximised with optax.

The model is used as written (priors on every population site). A guide ``q`` over all latent
sites is fitted by maximising the evidence lower bound ``E_q[log p(y, theta, eta) - log q]``
(NumPyro's ``Trace_ELBO``, reparameterised gradients) with Adam. Guides:

- ``"normal"``: mean-field Gaussian in the unconstrained space (``AutoNormal``);
- ``"mvn"``: full-rank Gaussian (``AutoMultivariateNormal``); ``"lowrank"``: low-rank plus diagonal;
- ``"iaf"`` / ``"bnaf"``: normalizing flows over all latents (``AutoIAFNormal``, ``AutoBNAFNormal``);
- ``"encoder"``: amortized: one network maps a subject's data to q(eta_i) (see
  :mod:`nlmegen.infer.bayes.encoder`), so that new subjects are encoded in one pass (`encode`).

Gaussian random effects are partially non-centred by default, with the centring learned with the
guide (``LocScaleReparam(centered=None)``; Gorinova, Moore & Hoffman 2020): the guide approximates
``eta_decentered = (eta - c * loc) / omega**c`` with ``c`` in [0, 1] per element, a parameter of
the model optimised with the ELBO, so each random effect gets the parameterisation in which its
posterior is least funnel-shaped (well-identified effects centred, weakly identified ones
non-centred); ``eta`` is recovered as a deterministic site. ``noncentered=True`` fixes ``c = 0``
(as in NUTS), ``False`` keeps the model as written. The encoder guide works on the model as written
(it maps data to q(eta) on the original scale).

The default (a 4-flow IAF, 16 particles, 20000 steps at 0.005, learned centring) is the best of
those measured on theo_sd: it passes the Pareto k-hat diagnostic for most keys (not all), the
Gaussian guides for none (see `SVI`).

Summaries in the returned `FitResult` are those of NUTS, computed from ``num_draws`` draws of the
fitted guide stored as one chain ``[1, num_draws, ...]``: ``params`` posterior medians, ``se``
posterior SDs, ``ebes`` posterior medians of the random effects, ``ebe_cov`` their covariance.
``history`` holds the ELBO of every step. The trained guide and its parameters are kept in memory
with the result and returned by `svi_guide`.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from numpyro import handlers
from numpyro.infer import SVI as _NumPyroSVI
from numpyro.infer import Trace_ELBO, autoguide
from numpyro.infer.reparam import LocScaleReparam
from numpyro.infer.util import log_density
from numpyro.optim import optax_to_numpyro

from ..._errors import ModelError
from ...model import discover
from ..laplace.backend import check_population
from ..shared import checkpoint
from ..shared.checks import check_fit
from ..shared.draws import summarise_draws
from ..shared.progress import compiling
from ..shared.result import FitResult
from ..shared.shard import shard_count, single_process
from ..shared.start import bayesian_inputs
from .encoder import EncoderGuide, encoder_config, encoder_forward
from .nuts import _init_strategy, _is_param, _normal_random_effects
from .shard import ShardedTraceELBO
from .svi_flows import LocatedBNAF, LocatedIAF

__all__ = ["SVI", "Encoding", "TrainedGuide", "encode", "svi_guide"]

GUIDES = ("normal", "mvn", "lowrank", "iaf", "bnaf", "encoder")
_ALIASES = {"meanfield": "normal", "mean_field": "normal", "diagonal": "normal", "full_rank": "mvn",
            "fullrank": "mvn", "multivariate_normal": "mvn", "low_rank": "lowrank", "flow": "iaf"}
SCHEDULES = ("constant", "cosine", "exponential")
#: consecutive steps with a non-finite gradient that are skipped before the fit stops (`optax.apply_if_finite`)
MAX_SKIPPED = 20


def _guide_name(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in GUIDES:
        raise ValueError(f"unknown SVI guide {name!r}; available: {list(GUIDES)} (aliases {sorted(_ALIASES)})")
    return key


@dataclass(frozen=True)
class SVI:
    """Variational Bayes: a guide fitted by maximising the ELBO with optax's Adam.

    Parameters
    ----------
    guide
        ``"normal"`` (mean-field), ``"mvn"`` (full-rank), ``"lowrank"``, ``"iaf"`` (inverse
        autoregressive flow), ``"bnaf"`` (block neural autoregressive flow) or ``"encoder"``
        (amortized; see `encode`).
    num_steps
        Optimisation steps.
    learning_rate
        Peak learning rate of Adam.
    schedule
        ``"cosine"`` (linear warm-up over the first 5% of steps, then cosine decay to
        ``learning_rate * final_lr``), ``"exponential"`` (decay to ``learning_rate * final_lr``)
        or ``"constant"``.
    final_lr
        Final learning rate as a fraction of ``learning_rate``.
    clip_norm
        Clip the global gradient norm to this (None: no clipping); protects against the rare
        huge gradient of a flow early in training.
    num_particles
        Monte Carlo samples of the ELBO per step.
    num_draws
        Draws from the fitted guide stored in ``FitResult.draws`` (as one chain).
    noncentered
        Reparameterisation of Normal random effects (ignored by the encoder guide): ``"learned"``
        (partial centring learned with the guide; Gorinova et al. 2020), ``True`` (non-centred)
        or ``False`` (as written).
    init_scale
        Initial scale of the Gaussian guides (unconstrained space).
    rank
        Rank of ``"lowrank"`` (None: NumPyro's default, about the square root of the dimension).
    num_flows, hidden_dims, hidden_factors
        Flow guides: number of flows; IAF hidden layer widths (None: NumPyro's default);
        BNAF hidden factors.
    encoder_hidden
        Widths of the encoder's hidden layers (both the per-observation and the subject network).
    population_guide
        Guide of the population sites with ``guide="encoder"``: ``"normal"`` or ``"mvn"``.
    chunk_size
        Steps per compiled chunk (the progress bar and the NaN check run between chunks).
    progress
        Show a progress bar.
    devices
        Devices the subjects are split over in the model's log density (`shard`: ``shard_map``
        with a ``psum`` of the subjects' terms; the guide is evaluated whole). ``None`` (default):
        all of them (one CPU device unless ``XLA_FLAGS=--xla_force_host_platform_device_count=N``),
        or a number.

    Notes
    -----
    ``fit(..., key=...)`` needs a PRNG key. ``init`` gives the starting location of population
    sites (elsewhere the prior median); ``fixed`` conditions the model on population values.
    ``numpyro.param`` sites must be fixed (SVI here is full Bayes over sites with priors).
    The status is ``"converged"`` when the mean ELBO of the last 10% of steps differs from that of
    the 10% before by less than three standard errors of the difference (or 0.1 nats) *and* the
    guide passes the Pareto k-hat diagnostic of the importance weights ``p/q`` of its
    ``num_draws`` draws (k-hat <= ``min(1 - 1/log10(num_draws), 0.7)``; Yao et al. 2018): a flat
    ELBO alone says the optimiser stopped, not that the guide approximates the posterior (on
    theo_sd the mean-field guide stops with k-hat 3.3 and posterior SDs 3-5x too narrow; the
    full-rank Gaussian with learned centring k-hat 1.0-1.2; the default IAF 0.25-0.74 over four
    keys, passing on three, with posterior SDs 0.86-1.01 times those of NUTS; over eight keys it
    passes on six, and no cheap change passes on all: 32 particles 7 of 8 at 2.5x the time, 8 flows
    6, 40000 steps 5). The learned centring of each random-effect site is in
    ``settings["centering"]``.
    Timings: ``compile_s`` (the optimisation step, compiled once), ``run_s`` (the optimisation),
    ``draws_s`` (drawing from the guide and the summaries).

    Examples
    --------
    >>> import jax, nlmegen
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> fit = nlmegen.fit(nlmegen.examples.theo_model, pop, method="svi", guide="normal", num_steps=1000,
    ...                   num_draws=200, progress=False, key=jax.random.key(0))
    >>> fit.draws["tcl"].shape, round(float(fit.params["tcl"]), 1)
    ((1, 200), 1.0)
    >>> nlmegen.infer.svi_guide(fit).kind
    'normal'

    References
    ----------
    Kucukelbir A, Tran D, Ranganath R, Gelman A, Blei DM. Automatic differentiation variational
    inference. JMLR 2017;18:1-45.
    Yao Y, Vehtari A, Simpson D, Gelman A. Yes, but did it work?: Evaluating variational inference.
    ICML 2018.
    Kingma DP, Salimans T, Jozefowicz R, Chen X, Sutskever I, Welling M. Improved variational
    inference with inverse autoregressive flow. NeurIPS 2016.
    De Cao N, Titov I, Aziz W. Block neural autoregressive flow. UAI 2019.
    """

    method: ClassVar[str] = "svi"
    guide: str = "iaf"
    num_steps: int = 20000
    learning_rate: float = 0.005
    schedule: str = "cosine"
    final_lr: float = 0.05
    clip_norm: float | None = 10.0
    num_particles: int = 16
    num_draws: int = 1000
    noncentered: bool | str = "learned"
    init_scale: float = 0.1
    rank: int | None = None
    num_flows: int = 4
    hidden_dims: tuple[int, ...] | None = None
    hidden_factors: tuple[int, ...] = (8, 8)
    encoder_hidden: tuple[int, ...] = (32, 32)
    population_guide: str = "normal"
    chunk_size: int = 500
    progress: bool = True
    devices: int | None = None

    def __post_init__(self):
        _guide_name(self.guide)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; available: {list(SCHEDULES)}")
        if self.population_guide not in ("normal", "mvn"):
            raise ValueError(f"population_guide must be 'normal' or 'mvn', not {self.population_guide!r}")
        for name in ("num_steps", "num_particles", "num_draws", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SVI: {name} must be at least 1")
        if not self.learning_rate > 0:
            raise ValueError("SVI: learning_rate must be positive")
        if self.noncentered not in (True, False, "learned"):
            raise ValueError(f"SVI: noncentered must be 'learned', True or False, not {self.noncentered!r}")

    # ------------------------------------------------------------------ pieces
    def optimizer(self) -> optax.GradientTransformation:
        """Adam with the learning-rate schedule (and gradient clipping) of these settings."""
        lr, n, end = float(self.learning_rate), int(self.num_steps), float(self.learning_rate * self.final_lr)
        if self.schedule == "constant":
            rate = lr
        elif self.schedule == "exponential":
            rate = optax.exponential_decay(lr, transition_steps=n, decay_rate=self.final_lr)
        else:
            warm = max(1, n // 20) if n > 20 else 0
            rate = optax.warmup_cosine_decay_schedule(lr * 0.1 if warm else lr, lr, warm, max(n, warm + 1), end)
        chain = [optax.clip_by_global_norm(float(self.clip_norm))] if self.clip_norm is not None else []
        # a step whose gradient is not finite (a particle drawn in the guide's far tail) is skipped, not applied;
        # after MAX_SKIPPED in a row the state turns non-finite and `_optimise` stops with an error
        return optax.apply_if_finite(optax.chain(*chain, optax.adam(rate)), max_consecutive_errors=MAX_SKIPPED)

    def _make_guide(self, model, pop, sites, init: dict, random: list[str], key):
        kind = _guide_name(self.guide)
        strategy = _init_strategy(init)
        common = {"init_loc_fn": strategy}
        if kind == "encoder":
            if not random:
                raise ModelError("guide='encoder' maps a subject's data to its random effects; this model has none "
                                 "(use another guide)")
            auto = autoguide.AutoNormal if self.population_guide == "normal" else autoguide.AutoMultivariateNormal
            pop_guide = auto(handlers.block(model, hide=random), init_scale=self.init_scale,
                             **common) if sites.population else None
            cfg = encoder_config(pop, sites.n_eta, self.encoder_hidden, init_sd=max(self.init_scale, 0.3))
            return EncoderGuide(pop_guide, cfg, sites.random_effects, key)
        if kind == "normal":
            return autoguide.AutoNormal(model, init_scale=self.init_scale, **common)
        if kind == "mvn":
            return autoguide.AutoMultivariateNormal(model, init_scale=self.init_scale, **common)
        if kind == "lowrank":
            return autoguide.AutoLowRankMultivariateNormal(model, init_scale=self.init_scale, rank=self.rank, **common)
        if kind == "iaf":
            hidden = list(self.hidden_dims) if self.hidden_dims is not None else None
            return LocatedIAF(model, num_flows=self.num_flows, hidden_dims=hidden, init_scale=self.init_scale,
                              **common)
        return LocatedBNAF(model, num_flows=self.num_flows, hidden_factors=list(self.hidden_factors),
                           init_scale=self.init_scale, **common)

    # ------------------------------------------------------------------ fit
    def fit(self, model, pop, *, init: Mapping | None = None, fixed: Mapping | None = None, key=None) -> FitResult:
        """Fit the guide to the posterior of ``model`` on ``pop``; a `FitResult` with ``draws``."""
        if key is None:
            raise ValueError("SVI needs key=jax.random.key(...)")
        from ..shared.mixture import fit_mixture, has_mixture

        if has_mixture(model, pop):  # nlmegen.mixture: the class summed out (shared.mixture)
            return fit_mixture(self.fit, model, pop, init=init, fixed=fixed, key=key)
        check_population(pop)
        kind = _guide_name(self.guide)
        sites = discover(model, pop)
        check_fit(sites, pop)
        random = [s.name for s in sites.random_effects]
        init, fixed = bayesian_inputs("SVI", "fits a guide to sites with priors", sites, init, fixed)
        target, reparam_sites = self._target(model, pop, sites, fixed, random, kind)
        k_guide, k_init, k_run, k_draw = jax.random.split(key, 4)
        guide = self._make_guide(target, pop, sites, init, random, k_guide)
        svi = _NumPyroSVI(target, guide, optax_to_numpyro(self.optimizer()), self.elbo(target, pop))
        state, losses, compile_s, run_s, stopped = self._optimise(svi, pop, k_init, k_run)
        params = svi.get_params(state)
        centering = {k: params[f"{k}_centered"] for k in reparam_sites if f"{k}_centered" in params}
        if centering:  # the learned centring is a parameter of the model: hold it at its fitted value
            target = handlers.substitute(target, data={f"{k}_centered": v for k, v in centering.items()})
        trained = TrainedGuide(kind=kind, guide=guide, params=params, model=target, sites=sites,
                               free=tuple(s.name for s in sites.population if s.name not in fixed))
        start = time.perf_counter()
        samples, log_w = trained.sample(k_draw, pop, self.num_draws)
        timings = {"compile_s": compile_s, "run_s": run_s, "draws_s": time.perf_counter() - start}
        result = _result(self, model, pop, sites, samples, log_w, losses, fixed, reparam_sites, kind, timings,
                         centering)
        if stopped:  # Ctrl-C: the guide as it was after the last completed chunk of steps
            result = checkpoint.mark_interrupted(result, f"after {losses.size} of {self.num_steps} SVI steps")
        _remember(result, trained)
        return result

    def elbo(self, target, pop):
        """NumPyro's ``Trace_ELBO``; with several devices, its model term split by subjects (`shard`)."""
        n_devices = shard_count(self.devices, pop.n_subjects)
        single_process("SVI", n_devices)
        if n_devices > 1:
            return ShardedTraceELBO(target, n_devices, pop, num_particles=self.num_particles)
        return Trace_ELBO(num_particles=self.num_particles)

    def _target(self, model, pop, sites, fixed: dict, random: list[str], kind: str):
        """The model as the guide sees it: fixed sites held, Normal random effects (partially) non-centred."""
        target = model
        held_params = {k: v for k, v in fixed.items() if _is_param(sites, k)}
        if held_params:
            target = handlers.substitute(target, data=held_params)
        if len(held_params) < len(fixed):
            target = handlers.condition(target, data={k: v for k, v in fixed.items() if k not in held_params})
        reparam = _normal_random_effects(model, pop, random) if self.noncentered and kind != "encoder" else []
        if reparam:
            centered = None if self.noncentered == "learned" else 0.0  # None: learned (Gorinova et al. 2020)
            target = handlers.reparam(target, config={k: LocScaleReparam(centered=centered) for k in reparam})
        return target, reparam

    def _optimise(self, svi, pop, k_init, k_run):
        """Run ``num_steps`` steps in compiled chunks; returns (state, losses, compile_s, run_s)."""
        chunk = min(int(self.chunk_size), int(self.num_steps))
        start = time.perf_counter()
        with compiling("the SVI initialisation", self.progress):
            state = svi.init(k_init, pop)
        init_s = time.perf_counter() - start
        state = state._replace(rng_key=k_run)

        def run_chunk(state, n, pop):
            def body(i, carry):
                st, buf = carry
                st, loss = svi.update(st, pop)
                return st, buf.at[i].set(loss)

            return jax.lax.fori_loop(0, n, body, (state, jnp.full(chunk, jnp.nan)))

        start = time.perf_counter()
        with compiling(f"the SVI step ({chunk} per call)", self.progress):
            compiled = jax.jit(run_chunk).lower(state, jnp.int32(chunk), pop).compile()
        compile_s = time.perf_counter() - start + init_s
        losses = np.full(int(self.num_steps), np.nan)
        bar = _progress(self.progress, int(self.num_steps))
        start, done, stopped = time.perf_counter(), 0, False
        saved = checkpoint.restored("svi")
        if saved is not None:  # resume: the state, losses and step count of the checkpoint
            state, done = saved["state"], int(saved["done"])
            losses[:done] = saved["losses"][:done]
        try:
            while done < self.num_steps:
                n = min(chunk, int(self.num_steps) - done)
                new_state, buf = compiled(state, jnp.int32(n), pop)
                buf = np.asarray(buf)[:n]
                trace = np.concatenate([losses[:done], buf])
                last = done + n == self.num_steps  # the fit must not end where the ELBO is not finite
                if (_longest_nonfinite_run(trace[max(0, done - MAX_SKIPPED):]) > MAX_SKIPPED
                        or not _finite_tree(new_state) or (last and not np.isfinite(trace[-1]))):
                    raise FloatingPointError(
                        f"SVI: the ELBO is not finite from step {_final_run_start(trace) + 1} of {self.num_steps} on "
                        f"(guide {self.guide!r}; such steps are skipped, at most {MAX_SKIPPED} in a row, and the "
                        f"fit must not end on one); try a smaller learning_rate (now {self.learning_rate:g}, e.g. "
                        f"{self.learning_rate / 10:g}), gradient clipping (clip_norm) or init= values closer to "
                        "the data")
                losses[done:done + n] = buf
                state, done = new_state, done + n
                snapshot = {"state": state, "losses": losses[:done], "done": done}
                checkpoint.save("svi", n, chunk, lambda: snapshot)  # noqa: B023
                if bar is not None:
                    bar.update(n)
                    bar.set_postfix_str(f"ELBO {-np.nanmean(buf[-max(1, n // 10):]):.4g}")
        except KeyboardInterrupt:  # keep the state of the last completed chunk (see `fit`)
            stopped = True
            losses = losses[:done]
        finally:
            if bar is not None:
                bar.close()
        jax.block_until_ready(state)
        return state, losses, compile_s, time.perf_counter() - start, stopped


def _progress(show: bool, total: int):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="SVI", leave=True)


# ---------------------------------------------------------------------- the trained guide
@dataclass(frozen=True, eq=False)
class TrainedGuide:
    """A fitted guide: the NumPyro guide, its trained parameters and the model it approximates.

    Attributes
    ----------
    kind : str
        The guide's name (``"normal"``, ``"mvn"``, ``"lowrank"``, ``"iaf"``, ``"bnaf"``, ``"encoder"``).
    guide
        The NumPyro guide, called as ``guide(pop)``.
    params : dict
        Its trained parameters (``SVI.get_params``), to substitute into the guide.
    model
        The model the guide was fitted to (fixed sites held, random effects possibly non-centred).
    sites
        The sites of the user's model.
    free : tuple of str
        The population sites the guide covers.
    """

    kind: str
    guide: Any
    params: dict
    model: Any
    sites: Any
    free: tuple[str, ...]

    def sample(self, key, pop, n: int) -> tuple[dict, np.ndarray]:
        """``n`` draws of the free population and random-effect sites (user scale), and log p - log q.

        The draws come from the guide with the trained parameters; each is also scored by the model,
        so the second output is the log importance weight ``log p(y, z) - log q(z)`` of every draw.
        ``pop`` must be the population of the fit (only the encoder guide can draw for other
        subjects; `encode` gives its q(eta) directly).
        """
        names = list(self.free) + [s.name for s in self.sites.random_effects]

        def one(k):
            k_guide, k_model = jax.random.split(k)
            log_q, guide_tr = log_density(handlers.seed(self.guide, k_guide), (pop,), {}, self.params)
            latent = {name: site["value"] for name, site in guide_tr.items() if site["type"] == "sample"}
            log_p, model_tr = log_density(handlers.seed(self.model, k_model), (pop,), {}, latent)
            return {name: model_tr[name]["value"] for name in names}, log_p - log_q

        keys = jax.random.split(key, int(n))
        values, log_w = jax.jit(lambda ks: jax.lax.map(one, ks, batch_size=min(int(n), 100)))(keys)
        return {k: np.asarray(v) for k, v in values.items()}, np.asarray(log_w)


_GUIDES: dict[int, TrainedGuide] = {}


def _remember(result: FitResult, trained: TrainedGuide) -> None:
    """Keep ``trained`` with ``result`` for as long as the result lives (not saved, not pickled)."""
    _GUIDES[id(result)] = trained
    weakref.finalize(result, _GUIDES.pop, id(result), None)


def svi_guide(fit: FitResult) -> TrainedGuide:
    """The trained guide of an SVI fit.

    The guide lives in memory with the `FitResult` that `SVI.fit` returned; a result that was saved
    and loaded (or pickled) has no guide: fit again.

    Parameters
    ----------
    fit
        A result of ``SVI.fit`` / ``nlmegen.fit(..., method="svi")``.

    Returns
    -------
    TrainedGuide

    Examples
    --------
    See `SVI`; with ``fit`` an SVI result, ``svi_guide(fit).sample(key, pop, 100)`` draws again from
    the fitted guide.
    """
    if getattr(fit, "method", None) != "svi":
        raise ValueError(f"svi_guide needs the result of an SVI fit, not method={getattr(fit, 'method', None)!r}")
    trained = _GUIDES.get(id(fit))
    if trained is None:
        raise ValueError("this SVI result carries no trained guide (guides are kept in memory only, with the "
                         "result that SVI.fit returned; a saved/loaded or pickled result has none): fit again")
    return trained


@dataclass(frozen=True, eq=False)
class Encoding:
    """q(eta_i) of each subject from the amortized encoder.

    Attributes
    ----------
    ids : tuple
        Subject IDs.
    mean : ndarray ``[n_subjects, n_eta]``
        Mean of q(eta_i) in the unconstrained random-effect space.
    scale_tril : ndarray ``[n_subjects, n_eta, n_eta]``
        Its Cholesky factor.
    ebes : pandas.DataFrame
        The mean mapped to the user's scale, one row per subject (index ``"ID"``), columns as
        ``FitResult.ebes``.
    """

    ids: tuple
    mean: np.ndarray
    scale_tril: np.ndarray
    ebes: pd.DataFrame

    @property
    def cov(self) -> np.ndarray:
        """Covariance of q(eta_i), ``[n_subjects, n_eta, n_eta]``."""
        return self.scale_tril @ np.swapaxes(self.scale_tril, -1, -2)

    @property
    def sd(self) -> np.ndarray:
        """Posterior SDs (unconstrained), ``[n_subjects, n_eta]``."""
        return np.sqrt(np.diagonal(self.cov, axis1=-2, axis2=-1))


def encode(fit_or_guide: FitResult | TrainedGuide, pop) -> Encoding:
    """q(eta) of the subjects of ``pop`` from a fitted amortized encoder: one forward pass.

    No optimisation: the encoder trained by ``SVI(guide="encoder")`` maps each subject's record
    (observation times and values, doses, baseline covariates) to a Gaussian over its random
    effects. ``pop`` may hold subjects never seen in the fit, with any number of observations and
    doses; it needs the covariates and outputs of the training data.

    Parameters
    ----------
    fit_or_guide
        The `FitResult` of an encoder fit, or its `TrainedGuide` (`svi_guide`).
    pop
        The subjects to encode.

    Returns
    -------
    Encoding

    Examples
    --------
    >>> import jax, nlmegen
    >>> pop = nlmegen.read_nonmem(nlmegen.datasets.load("theo_sd"))
    >>> fit = nlmegen.SVI(guide="encoder", num_steps=200, num_draws=50, progress=False).fit(
    ...     nlmegen.examples.theo_model, pop, key=jax.random.key(0))
    >>> enc = nlmegen.infer.encode(fit, pop.subset([1, 2]))
    >>> enc.mean.shape
    (2, 3)
    """
    trained = fit_or_guide if isinstance(fit_or_guide, TrainedGuide) else svi_guide(fit_or_guide)
    if trained.kind != "encoder":
        raise ValueError(f"encode needs an amortized encoder (SVI(guide='encoder')), not guide {trained.kind!r}")
    from ...model import Density
    from ..laplace.finish import _ebe_table
    from .encoder import ENCODER_PARAM

    guide: EncoderGuide = trained.guide
    if len(pop.outputs) != guide.cfg.n_outputs:
        raise ModelError(f"encode: the population has outputs {list(pop.outputs)}; the encoder was trained with "
                         f"{guide.cfg.n_outputs}")
    mu, tril = encoder_forward(guide.cfg, trained.params[ENCODER_PARAM], pop)
    mu = np.asarray(mu)
    holder = type("_Holder", (), {})()
    holder.density, holder.pop = Density(trained.model, trained.sites), pop
    return Encoding(ids=tuple(pop.ids), mean=mu, scale_tril=np.asarray(tril), ebes=_ebe_table(holder, mu))


# ---------------------------------------------------------------------- result
def _longest_nonfinite_run(values: np.ndarray) -> int:
    """Length of the longest run of consecutive non-finite values."""
    longest = current = 0
    for ok in np.isfinite(values):
        current = 0 if ok else current + 1
        longest = max(longest, current)
    return longest


def _final_run_start(values: np.ndarray) -> int:
    """Index where the trailing run of non-finite values begins (the first non-finite one if none trails)."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return values.size
    if not bad[-1]:
        return int(np.flatnonzero(bad)[0])
    good = np.flatnonzero(~bad)
    return int(good[-1]) + 1 if good.size else 0


def _finite_tree(state) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(state)
               if jnp.issubdtype(jnp.result_type(x), jnp.floating))


def _elbo_status(elbo: np.ndarray) -> tuple[str, float, float]:
    """Converged when the last 10% of the ELBO trace is flat (see `SVI`); (status, last mean, change).
    Skipped steps (non-finite ELBO) are left out."""
    elbo = elbo[np.isfinite(elbo)]
    n = elbo.size
    w = max(1, n // 10)
    last, prev = elbo[-w:], elbo[-2 * w:-w] if n >= 2 * w else elbo[:0]
    final = float(np.mean(last))
    if prev.size < 2 or last.size < 2:
        return "not_converged", final, float("nan")
    change = final - float(np.mean(prev))
    se = math.sqrt(np.var(last, ddof=1) / last.size + np.var(prev, ddof=1) / prev.size)
    ok = abs(change) <= max(3.0 * se, 0.1)
    return ("converged" if ok else "not_converged"), final, change


def good_k(n_draws: int) -> float:
    """The Pareto k-hat threshold for ``n_draws`` importance draws: ``min(1 - 1/log10(S), 0.7)``
    (Vehtari et al. 2024, Pareto smoothed importance sampling, JMLR 25(72); ArviZ's ``good_k``)."""
    return min(1.0 - 1.0 / math.log10(n_draws), 0.7) if n_draws > 10 else 0.0


def _pareto_k(log_w: np.ndarray) -> float:
    """Pareto k-hat of the importance weights p/q (Yao et al. 2018): above 0.7 q is a poor fit."""
    try:
        from arviz_stats.base import array_stats

        _, k = array_stats.psislw(np.asarray(log_w, float))
        return float(np.asarray(k))
    except Exception:  # noqa: BLE001 - a diagnostic only; an ArviZ API change must not break a fit
        return float("nan")


def _result(backend: SVI, model, pop, sites, samples, log_w, losses, fixed, reparam_sites, kind,
            timings, centering: dict | None = None) -> FitResult:
    lead = (1, int(backend.num_draws))
    draws = {k: v[None] for k, v in samples.items()}
    fields = summarise_draws(model, pop, sites, draws, fixed, lead)
    elbo = -losses
    status, final, change = _elbo_status(elbo)
    khat = _pareto_k(log_w)
    notes = [f"guide {kind}, {backend.num_steps} steps, {backend.num_particles} particle(s)",
             f"final ELBO {final:.4f} (mean of the last 10% of steps; change {change:+.3g} over the 10% before)",
             f"Pareto k-hat {khat:.2f} ({backend.num_draws} draws)",
             "OFV/loglik/AIC/BIC are not defined for a posterior (NaN)"]
    warnings = []
    skipped = int(np.sum(~np.isfinite(losses)))
    if skipped:
        warnings.append(f"{skipped} of {losses.size} SVI steps had a non-finite ELBO (a particle in the guide's far "
                        "tail) and were skipped")
    if status != "converged":
        warnings.append(f"the ELBO was still changing at the end ({change:+.3g} over the last 10% of steps): "
                        "run more steps or raise the learning rate")
    good = good_k(backend.num_draws)
    if not (np.isfinite(khat) and khat <= good):
        # the ELBO can be flat while q is far from the posterior: the status must say so (issue 18)
        status = "not_converged"
        notes.insert(0, f"the guide is not a reliable approximation of the posterior: Pareto k-hat {khat:.2f} > "
                        f"{good:.2f}")
        warnings.append(f"Pareto k-hat {khat:.2f} > {good:.2f}: the guide is a poor approximation of the posterior "
                        "(posterior SDs, tails and correlations may be wrong); use NUTS, or try a richer guide "
                        "(mvn, iaf, bnaf)")
    history = pd.DataFrame({"iteration": np.arange(1, elbo.size + 1, dtype=np.int64), "elbo": elbo})
    from ..laplace.finish import _settings

    settings = {**_settings(backend), "guide": kind, "noncentered_sites": list(reparam_sites),
                "final_elbo": final, "pareto_k": khat, "skipped_steps": skipped,
                "centering": {k: np.asarray(v).tolist() for k, v in (centering or {}).items()}}
    return FitResult(method=backend.method, status=status, message="; ".join(notes), warnings=tuple(warnings),
                     history=history, settings=settings, draws=draws, timings=timings, covariance=None,
                     covariance_kind="none", se_unconstrained=None, shrinkage={}, **fields)
