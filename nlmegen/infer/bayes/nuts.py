"""NUTS: full Bayesian inference of an nlmegen model with NumPyro's No-U-Turn sampler.

The model is sampled as written (priors on every population site), jointly over the population
parameters and every subject's random effects. Gaussian random effects are non-centred by
default (`numpyro.infer.reparam.LocScaleReparam` with ``centered=0``): the sampler moves in
``eta_decentered ~ N(0, 1)`` and ``eta = loc + scale * eta_decentered`` is recorded as a
deterministic site, which removes the funnel between ``omega`` and ``eta`` that defeats NUTS
when the data say little about a subject.

Summaries in the returned `FitResult`: ``params`` are posterior medians, ``se`` posterior standard
deviations, ``ebes`` posterior medians of the random effects, ``ebe_cov`` their posterior
covariance (unconstrained scale), and ``draws`` all the draws ``[chain, draw, ...]`` with the
sampler statistics. The OFV, log-likelihood, AIC and BIC are not defined for a posterior and are NaN.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer import MCMC
from numpyro.infer import NUTS as _NumPyroNUTS
from numpyro.infer.initialization import init_to_sample, init_to_uniform, init_to_value
from numpyro.infer.reparam import LocScaleReparam

from ...model import discover
from ..laplace.backend import check_population
from ..shared import checkpoint
from ..shared.checks import check_fit
from ..shared.result import FitResult
from ..shared.shard import shard_count, single_process
from ..shared.start import bayesian_inputs
from . import nuts_loop
from .shard import ShardedNUTS

__all__ = ["NUTS"]

#: Sampler statistics collected with the draws (NumPyro name -> name in ``FitResult.draws``).
#: ArviZ's names (``n_steps``, ``acceptance_rate``, ``tree_depth``) so its plots find them.
_EXTRA_FIELDS = {"diverging": "diverging", "num_steps": "n_steps", "accept_prob": "acceptance_rate",
                 "adapt_state.step_size": "step_size", "energy": "energy", "potential_energy": "lp"}
RHAT_OK = 1.01


@dataclass(frozen=True)
class NUTS:
    """Full Bayes: NumPyro's No-U-Turn sampler on the model's joint posterior.

    Parameters
    ----------
    num_warmup, num_samples
        Warm-up (adaptation, discarded) and kept iterations per chain.
    num_chains
        Independent chains (at least 2 for a meaningful R-hat).
    target_accept_prob
        Target acceptance probability of the step-size adaptation (raise it, e.g. 0.95, when there
        are divergences).
    max_tree_depth
        Largest tree depth (at most ``2**max_tree_depth`` leapfrog steps per iteration).
    chain_method
        ``"auto"`` (``"parallel"`` when there are at least ``num_chains`` JAX devices, else
        ``"vectorized"``), ``"parallel"``, ``"vectorized"`` or ``"sequential"``.
    progress
        Show NumPyro's progress bar.
    noncentered
        Non-centre random effects with a Normal distribution (``Normal`` or ``Normal(...).to_event``):
        ``LocScaleReparam(centered=0)``. Other random-effect distributions (e.g.
        ``MultivariateNormal``) are sampled as written.
    devices
        Devices the subjects are split over in every evaluation of the log density (`shard`:
        ``shard_map`` with a ``psum`` of the subjects' terms; the chains then run vectorised).
        ``1`` (default): one device per chain program (``chain_method="parallel"`` uses several
        devices for several chains instead); ``None``: all devices; or a number.

    Notes
    -----
    ``fit(..., key=...)`` needs a PRNG key. ``init`` gives starting values of population sites
    (the rest start at their prior median, NumPyro's ``init_to_median``); ``fixed`` conditions the
    model on the given population values (`numpyro.handlers.condition`). The status is
    ``"converged"`` when the largest split R-hat over population parameters and random effects is
    below 1.01 and no transition diverged (rank-normalised split R-hat and bulk ESS of ArviZ, the
    numbers ``az.summary`` shows). Timings: ``run_s``, compilation, warm-up and sampling together
    (one compiled program; ``compile_s``, ``warmup_s`` and ``sample_s`` are NaN).

    References
    ----------
    Hoffman MD, Gelman A. The No-U-Turn sampler. JMLR 2014;15:1593-1623.
    Gorinova M, Moore D, Hoffman M. Automatic reparameterisation of probabilistic programs. ICML 2020.
    Vehtari A, Gelman A, Simpson D, Carpenter B, Buerkner PC. Rank-normalization, folding, and
    localization: an improved R-hat. Bayesian Analysis 2021;16:667-718.
    """

    method: ClassVar[str] = "nuts"
    num_warmup: int = 500
    num_samples: int = 1000
    num_chains: int = 4
    target_accept_prob: float = 0.8
    max_tree_depth: int = 10
    chain_method: str = "auto"
    progress: bool = True
    noncentered: bool = True
    devices: int | None = 1

    def resolved_chain_method(self) -> str:
        if self.devices != 1:  # the devices hold the subjects: the chains are vectorised
            if self.chain_method not in ("auto", "vectorized"):
                raise ValueError(f"devices={self.devices!r} splits the subjects over the devices: the chains run "
                                 f"vectorised, not {self.chain_method!r} (set devices=1 for that)")
            return "vectorized"
        if self.chain_method != "auto":
            return self.chain_method
        return "parallel" if jax.local_device_count() >= self.num_chains else "vectorized"

    def fit(self, model, pop, *, init: Mapping | None = None, fixed: Mapping | None = None, key=None):
        """Sample the posterior of ``model`` on ``pop``; returns a `FitResult` with ``draws``."""
        if key is None:
            raise ValueError("NUTS needs key=jax.random.key(...)")
        from ..shared.mixture import fit_mixture, has_mixture

        if has_mixture(model, pop):  # nlmegen.mixture: NUTS needs the class summed out (shared.mixture)
            return fit_mixture(self.fit, model, pop, init=init, fixed=fixed, key=key)
        check_population(pop)
        sites = discover(model, pop)
        check_fit(sites, pop)
        random = [s.name for s in sites.random_effects]
        init, fixed = bayesian_inputs("NUTS", "samples sites with priors", sites, init, fixed)

        sampled = model
        held_params = {k: v for k, v in fixed.items() if _is_param(sites, k)}
        if held_params:  # numpyro.param sites are not conditioned, but substituted
            sampled = handlers.substitute(sampled, data=held_params)
        if len(held_params) < len(fixed):
            sampled = handlers.condition(sampled, data={k: v for k, v in fixed.items() if k not in held_params})
        reparam_sites = _normal_random_effects(model, pop, random) if self.noncentered else []
        if reparam_sites:
            sampled = handlers.reparam(sampled, config={k: LocScaleReparam(centered=0) for k in reparam_sites})
        strategy = _init_strategy(init)
        chain_method = self.resolved_chain_method()
        settings = {"target_accept_prob": self.target_accept_prob, "max_tree_depth": self.max_tree_depth,
                    "init_strategy": strategy}
        n_devices = shard_count(self.devices, pop.n_subjects)
        single_process("NUTS", n_devices)
        if n_devices > 1:  # the subjects over the devices, one psum of the log density (shard)
            kernel = ShardedNUTS(sampled, n_devices, pop, **settings)
        else:
            kernel = _NumPyroNUTS(sampled, **settings)
        stopped, compile_s = None, float("nan")
        start = time.perf_counter()
        if chain_method == "vectorized" or self.num_chains == 1:
            # short compiled calls: Ctrl-C within about a second, checkpoints between calls (nuts_loop)
            run = nuts_loop.sample(kernel, key, pop, num_warmup=self.num_warmup, num_samples=self.num_samples,
                                   num_chains=self.num_chains, extra=_EXTRA_FIELDS, progress=self.progress)
            samples, stopped, compile_s = run.samples, run.interrupted, run.compile_s
            stats = {_EXTRA_FIELDS[k]: v for k, v in run.stats.items() if k in _EXTRA_FIELDS}
        else:  # chains on several devices: NumPyro's MCMC, one program (not interruptible)
            mcmc = MCMC(kernel, num_warmup=self.num_warmup, num_samples=self.num_samples,
                        num_chains=self.num_chains, chain_method=chain_method, progress_bar=self.progress)
            mcmc.run(key, pop, extra_fields=tuple(_EXTRA_FIELDS))
            samples = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
            stats = {_EXTRA_FIELDS[k]: np.asarray(v) for k, v in mcmc.get_extra_fields(group_by_chain=True).items()}
        run_s = time.perf_counter() - start
        if "lp" in stats:
            stats["lp"] = -stats["lp"]  # potential energy is -log density (unconstrained, up to a constant)
        if "n_steps" in stats:  # a tree of depth d takes up to 2**d - 1 leapfrog steps (ArviZ's from_numpyro)
            stats["tree_depth"] = np.floor(np.log2(np.maximum(stats["n_steps"], 1))).astype(np.int64) + 1
        timings = {"compile_s": compile_s, "warmup_s": float("nan"), "sample_s": float("nan"), "run_s": run_s}
        result = _result(self, model, pop, sites, samples, stats, fixed, reparam_sites, chain_method, timings)
        return result if stopped is None else checkpoint.mark_interrupted(result, stopped)


# --------------------------------------------------------------------------------------------
def _is_param(sites, name: str) -> bool:
    return any(s.name == name and s.kind == "param" for s in sites.population)


def _init_strategy(init: dict):
    """``init`` values where given, prior medians elsewhere (random effects included)."""
    if not init:
        return init_to_median()
    return functools.partial(_init_to_value_or_median, values=init)  # NumPyro wants a partial


def init_to_median(site=None, num_samples: int = 15):
    """NumPyro's ``init_to_median`` (the median of ``num_samples`` prior draws, on the unconstrained
    scale), with the median as the middle of the sorted draws instead of ``jnp.median``: the same
    values (``num_samples`` odd), without a quantile program compiled op by op for every site and
    chain, which made NumPyro's strategy 1.3-3 s of a theo_sd NUTS run (`benchmarks/nuts_overhead.py`)."""
    if site is None:
        return functools.partial(init_to_median, num_samples=num_samples)
    if site["type"] != "sample" or site["is_observed"] or site["fn"].support.is_discrete:
        return None
    if site["value"] is not None:
        return site["value"]
    try:
        draws = site["fn"](sample_shape=(num_samples,) + site["kwargs"].get("sample_shape"),
                           rng_key=site["kwargs"].get("rng_key"))
        transform = biject_to(site["fn"].support)
        u = jnp.sort(transform.inv(draws), axis=0)
        return transform(0.5 * (u[(num_samples - 1) // 2] + u[num_samples // 2]))
    except NotImplementedError:
        return init_to_uniform(site)


def _init_to_value_or_median(site=None, values=None):
    if site is None:
        return functools.partial(_init_to_value_or_median, values=values)
    if site["type"] == "sample" and not site["is_observed"] and site["name"] in values:
        return init_to_value(site, values=values)
    return init_to_median(site)


def _base_distribution(fn):
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def _normal_random_effects(model, pop, random: list[str]) -> list[str]:
    """Random-effect sites whose distribution is a Normal (possibly expanded / made an event)."""
    found: list[str] = []

    def run():
        traced = handlers.trace(handlers.substitute(handlers.seed(model, 0), substitute_fn=init_to_sample))
        tr = traced.get_trace(pop)
        found.extend(name for name in random if type(_base_distribution(tr[name]["fn"])) is dist.Normal)
        return ()

    jax.eval_shape(run)
    return found


def _labels(name: str, shape: tuple, ids: tuple | None) -> list[str]:
    """``name``, ``name[i]`` (population) or ``name[ID, i]`` (random effects, by subject ID)."""
    if ids is None:
        return [name] if shape == () else [f"{name}[{i}]" for i in range(int(np.prod(shape)))]
    inner = int(np.prod(shape[1:]))
    return [f"{name}[{sid}]" if shape[1:] == () else f"{name}[{sid}, {i}]" for sid in ids for i in range(inner)]


def _diagnostics(samples: dict, names: list[str], random: list[str], ids: tuple) -> tuple[dict, dict]:
    """Rank-normalised split R-hat and bulk ESS per scalar element (ArviZ's, as in ``az.summary``)."""
    import arviz as az

    rhat, ess = {}, {}
    for name in names:
        x = samples[name]
        flat = x.reshape(x.shape[:2] + (-1,))
        r = np.atleast_1d(np.asarray(az.rhat(flat, chain_axis=0, draw_axis=1), dtype=float))
        e = np.atleast_1d(np.asarray(az.ess(flat, chain_axis=0, draw_axis=1), dtype=float))
        labels = _labels(name, x.shape[2:], ids if name in random else None)
        rhat.update(zip(labels, r.tolist(), strict=True))
        ess.update(zip(labels, e.tolist(), strict=True))
    return rhat, ess


def _result(backend, model, pop, sites, samples, stats, fixed, reparam_sites, chain_method, timings) -> FitResult:
    from ..laplace.finish import _settings
    from ..shared.draws import summarise_draws

    n_chains, n_draws = next(iter(stats.values())).shape[:2] if stats else (backend.num_chains, backend.num_samples)
    free_names = [s.name for s in sites.population if s.name not in fixed]
    random = [s.name for s in sites.random_effects]
    summary = summarise_draws(model, pop, sites, samples, fixed, (n_chains, n_draws))

    # diagnostics -> status
    rhat, ess = _diagnostics(samples, free_names + random, random, tuple(pop.ids))
    n_div = int(np.sum(stats["diverging"])) if "diverging" in stats else 0
    finite = {k: v for k, v in rhat.items() if np.isfinite(v)}
    worst = max(finite, key=finite.get) if finite else None
    max_rhat = finite[worst] if worst else float("nan")
    min_ess_label = min(ess, key=ess.get) if ess else None
    ok = worst is not None and max_rhat < RHAT_OK and n_div == 0 and len(finite) == len(rhat)
    status = "converged" if ok else "not_converged"
    notes = [f"{n_chains} chains x {n_draws} draws ({chain_method})",
             f"max R-hat {max_rhat:.4f} ({worst})" if worst else "R-hat not available",
             f"{n_div} divergent transition(s)"]
    if min_ess_label is not None:
        notes.append(f"min ESS {ess[min_ess_label]:.0f} ({min_ess_label})")
    if len(finite) < len(rhat):
        notes.append(f"non-finite R-hat for {[k for k in rhat if k not in finite][:10]}")
    notes.append("OFV/loglik/AIC/BIC are not defined for a posterior (NaN)")
    warnings = []
    if n_div:
        warnings.append(f"{n_div} divergent transition(s) after warm-up: the posterior may be biased; raise "
                        "target_accept_prob or reparameterise")
    if worst is not None and max_rhat >= RHAT_OK:
        warnings.append(f"R-hat {max_rhat:.3f} for {worst} (>= {RHAT_OK}): chains have not mixed; run longer")
    max_steps = 2 ** backend.max_tree_depth - 1
    if "n_steps" in stats and np.any(stats["n_steps"] >= max_steps):
        hits = int(np.sum(stats["n_steps"] >= max_steps))
        warnings.append(f"{hits} transition(s) hit max_tree_depth={backend.max_tree_depth}")

    draws = {k: samples[k] for k in free_names + random}
    draws.update(stats)
    settings = {**_settings(backend), "chain_method_used": chain_method, "noncentered_sites": list(reparam_sites)}
    return FitResult(method=backend.method, status=status, message="; ".join(notes), covariance=None,
                     covariance_kind="none", se_unconstrained=None, shrinkage={}, timings=timings,
                     settings=settings, warnings=tuple(warnings), draws=draws, **summary)
