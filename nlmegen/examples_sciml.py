"""The seeds' one-subject SciML experiments: neural ODE vs UDE, and the learned drug effect.

One subject of the IDR model (:func:`nlmegen.examples.idr_model` at :data:`nlmegen.examples.IDR_TRUTH`,
no between-subject variability) is dosed with many regimens; each regimen is a pseudo-subject of a
population without random effects (naive pooling: the seeds' "train on 36 dosing regimens for one
subject"). The models, from least to most prior knowledge (the talk's "increasing levels of a
priori knowledge"):

- :func:`node_model`: a neural ODE, ``d(Depot, Central, R)/dt = NN(Depot, Central, R)``;
- :func:`middle_model`: ``dDepot/dt = -NN1(Depot)``, ``dCentral/dt = NN1(Depot) - NN2(Central)``
  (conservation of drug between the two), ``dR/dt = NN3(Central, R)``;
- :func:`ude_model`: the IDR model with the Hill term replaced by a network ``h(C)``
  (``effect="mlp"``), by a network of a saturating transform of ``C`` (``effect="saturating"``),
  or by the Hill function itself (``effect="hill"``, the true structure); ``prior=`` puts a prior
  on the weights (a Bayesian UDE for NUTS or SVI).

Networks see states divided by fixed scales taken from the training data (:func:`data_scales`), so
that their inputs and outputs are of order one whatever the units.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
from flax import nnx

from .data import Population, read_nonmem
from .dynamics import ode
from .examples import IDR_TRUTH, MLP, idr_model, idr_population
from .model import additive, combined, nn, observe, proportional, subjects

__all__ = ["SUBJECT_TRUTH", "TEST_FREQUENT", "TEST_OUTSIDE", "TEST_TIMES", "TRAIN_REGIMENS", "TRAIN_TIMES",
           "data_scales", "effect_curve", "first_dose_mask", "hill", "middle_model", "node_model", "regimen_table",
           "simulate_regimens", "start_values", "true_predictions", "ude_model", "weights_at"]

#: The 36 training regimens ``(dose mg, interval h, number of doses)``.
TRAIN_REGIMENS = tuple((d, i, m) for d in (25.0, 50.0, 100.0, 200.0) for i in (8.0, 12.0, 24.0) for m in (1, 2, 3))
#: Test: the training doses at a higher frequency (every 4 or 6 h, six doses).
TEST_FREQUENT = tuple((d, i, 6) for d in (25.0, 50.0, 100.0, 200.0) for i in (4.0, 6.0))
#: Test: doses outside the training range (below and above), once or three times.
TEST_OUTSIDE = tuple((d, i, m) for d in (10.0, 400.0, 800.0) for i in (12.0, 24.0) for m in (1, 3))
TRAIN_TIMES = (1.0, 2.0, 4.0, 8.0, 12.0, 24.0, 36.0, 48.0, 72.0)
TEST_TIMES = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 24.0, 36.0, 48.0, 72.0, 96.0)
#: Log-scale truth of the one subject: :data:`IDR_TRUTH` without between-subject variability.
SUBJECT_TRUTH = {**IDR_TRUTH, "omega": np.full(4, 1e-8)}


def hill(c, smax: float = 2.0, sc50: float = 1.0, n: float = 1.5):
    """The true drug effect ``Smax c^n / (SC50^n + c^n)`` (defaults: :data:`IDR_TRUTH`)."""
    c = jnp.maximum(jnp.asarray(c, dtype=float), 0.0)
    return smax * c**n / (sc50**n + c**n)


def regimen_table(regimens, times=TRAIN_TIMES) -> pd.DataFrame:
    """A NONMEM-style table with one pseudo-subject per regimen ``(dose, interval, n_doses)``.

    Oral doses into CMT 1, both outputs (``conc``, ``resp``) at ``times``; DV missing. The columns
    ``DOSE``, ``II`` (interval) and ``NDOSE`` describe the regimen (constant covariates).
    """
    tables = []
    for k, (dose, interval, n_doses) in enumerate(regimens):
        t = idr_population(1, dose=float(dose), n_doses=int(n_doses), interval=float(interval), times=tuple(times))
        tables.append(t.assign(ID=k + 1, DOSE=float(dose), INTERVAL=float(interval), NDOSE=int(n_doses)))
    return pd.concat(tables, ignore_index=True)


def simulate_regimens(regimens, times=TRAIN_TIMES, *, key: jax.Array, params=None) -> pd.DataFrame:
    """:func:`regimen_table` filled with observations simulated from the one subject (with noise)."""
    from ._simulate import simulate

    table = regimen_table(regimens, times)
    sims = simulate(idr_model, params or SUBJECT_TRUTH, read_nonmem(table, allow_missing_dv=True), key=key)
    table.loc[table["EVID"] == 0, "DV"] = sims["value"].to_numpy()
    return table


def true_predictions(pop: Population, params=None) -> np.ndarray:
    """``[subj, obs]`` noise-free truth (NaN at padding) of the one subject on ``pop``'s regimens."""
    from ._simulate import simulate_arrays

    return simulate_arrays(idr_model, params or SUBJECT_TRUTH, pop, key=jax.random.key(0), noise=False)[0]


def first_dose_mask(pop: Population) -> np.ndarray:
    """``[subj, obs]`` True for observations before a regimen's second dose (at most 24 h after the first)."""
    times, doses, on = np.asarray(pop.times), np.asarray(pop.dose_times), np.asarray(pop.dose_mask)
    ordered = np.sort(np.where(on, doses, np.inf), axis=1)
    second = ordered[:, 1] if ordered.shape[1] > 1 else np.full(len(ordered), np.inf)
    return np.asarray(pop.mask) & (times < np.minimum(second, 24.0)[:, None])


def data_scales(table: pd.DataFrame) -> dict:
    """Fixed input/output scales of the networks from a training table: the largest dose (mg), the
    largest observed concentration and the mean observed response."""
    obs = table[table["EVID"] == 0]
    return {"amount": float(table["AMT"].max()),
            "conc": float(obs.loc[obs["DVID"] == "conc", "DV"].max()),
            "resp": float(obs.loc[obs["DVID"] == "resp", "DV"].mean())}


def _mlp_sizes(n_in: int, hidden, n_out: int) -> tuple[int, ...]:
    return (n_in, *tuple(hidden), n_out)


def _quiet(net, factor: float = 0.1):
    """Shrink the output layers of ``net``'s MLPs by ``factor``: a randomly initialised right-hand side
    then starts as slow dynamics (nearly constant states) instead of exploding ones, which the ODE
    solver would need very many steps for."""
    for _, module in nnx.iter_graph(net):
        if isinstance(module, MLP):
            last = module.layers[-1]
            last.kernel[...] = factor * last.kernel[...]
    return net


def _sigmas(combined_error: bool = False):
    """Residual error sites (outside the subject plate): proportional (or combined additive and
    proportional, ``add_conc``) on conc, additive on resp."""
    add = numpyro.sample("add_conc", dist.HalfNormal(1.0)) if combined_error else None
    return numpyro.sample("sigma_conc", dist.HalfNormal(1.0)), numpyro.sample("sigma_resp", dist.HalfNormal(5.0)), add


def _observe_both(conc, resp, sigmas, pop: Population) -> None:
    sigma_conc, sigma_resp, add = sigmas
    error = proportional(conc, sigma_conc) if add is None else combined(conc, add, sigma_conc)
    observe("conc", error, pop, output="conc")
    observe("resp", additive(resp, sigma_resp), pop, output="resp")


_PK = ("ka", "cl", "vc", "kin", "kout")
_PK_CENTRES = (0.0, 0.7, 3.0, 2.3, -0.7)


def ude_model(effect: str = "mlp", *, hidden=(8, 8), seed: int = 0, c_scale: float = 1.0, prior=None,
              rtol: float = 1e-6, atol: float = 1e-9):
    """The seeds' UDE on one subject: the IDR model with a learned drug effect ``h(C)``, no random effects.

    ``dR/dt = kin (1 + h(C)) - kout R``, ``C = Central / Vc``; PK (ka, CL, Vc) and kin, kout are
    estimated with the network (``log_<name>`` sites).

    Parameters
    ----------
    effect
        ``"mlp"``: ``h(C) = MLP(C)`` (tanh hidden layers, linear output: the talk's network).
        ``"saturating"``: ``h(C) = MLP(u) - MLP(0)`` with ``u = C / (C + c_scale)``: the network sees
        a concentration squashed into [0, 1), so ``h`` is bounded on the whole concentration axis,
        zero without drug and flat for ``C >> c_scale`` (saturation by architecture).
        ``"hill"``: the true structure (``log_smax``, ``log_sc50``, ``log_n`` estimated).
    hidden, seed
        Hidden layer widths and the seed of the weights' initialisation.
    c_scale
        Concentration scale of the saturating transform (a fixed design choice, e.g. the median
        observed concentration; not estimated).
    prior
        A distribution for every weight (e.g. ``dist.Normal(0, 1)``): a Bayesian UDE
        (`nlmegen.nn`'s ``prior``) for NUTS and SVI.

    Returns
    -------
    callable
        The model ``model(pop)``; ``model.net`` is the initial network (None for ``"hill"``) and
        ``model.effect(weights, c)`` evaluates ``h`` at concentrations ``c`` for given weights.
    """
    if effect not in ("mlp", "saturating", "hill"):
        raise ValueError(f"effect must be 'mlp', 'saturating' or 'hill', not {effect!r}")
    make_net = lambda k: MLP(_mlp_sizes(1, hidden, 1), rngs=nnx.Rngs(k))  # noqa: E731
    net = None if effect == "hill" else make_net(seed)

    def h_of(f):
        if effect == "mlp":
            return lambda c: f(c[None])[0]
        return lambda c: f((c / (c + c_scale))[None])[0] - f(jnp.zeros(1))[0]

    def model(pop: Population) -> None:
        logs = {k: numpyro.sample(f"log_{k}", dist.Normal(c, 2.0)) for k, c in zip(_PK, _PK_CENTRES, strict=True)}
        if effect == "hill":
            hill_logs = {k: numpyro.sample(f"log_{k}", dist.Normal(c, 2.0))
                         for k, c in (("smax", 0.7), ("sc50", 0.0), ("n", 0.4))}
            smax, sc50, n = (jnp.exp(hill_logs[k]) for k in ("smax", "sc50", "n"))
            h = lambda c: hill(c, smax, sc50, n)  # noqa: E731
        else:
            h = h_of(nn("effect", net, prior=prior))
        p = {k: jnp.broadcast_to(jnp.exp(v), (pop.n_subjects,)) for k, v in logs.items()}

        def rhs(t, y, q):
            c = y[1] / q["vc"]
            return jnp.stack([-q["ka"] * y[0], q["ka"] * y[0] - q["cl"] / q["vc"] * y[1],
                              q["kin"] * (1.0 + h(c)) - q["kout"] * y[2]])

        sigmas = _sigmas()
        with subjects(pop):
            y0 = lambda q: jnp.stack([0.0 * q["kin"], 0.0 * q["kin"], q["kin"] / q["kout"]])  # noqa: E731
            states = ode.solve(rhs, pop, p, y0=y0, rtol=rtol, atol=atol)
            _observe_both(states[..., 1] / p["vc"][:, None], states[..., 2], sigmas, pop)

    def effect_fn(weights, c):
        c = jnp.asarray(c, dtype=float)
        if effect == "hill":
            return hill(c, *(jnp.exp(weights[f"log_{k}"]) for k in ("smax", "sc50", "n")))
        return jax.vmap(h_of(_with_weights(net, weights)))(c)

    model.net, model.make_net, model.effect, model.kind, model.site = net, make_net, effect_fn, effect, "effect"
    return model


def _with_weights(net, weights):
    """The network ``net`` with its parameters replaced by ``weights`` (a pure dict of arrays)."""
    graphdef, state = nnx.split(net)
    state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, weights))
    return nnx.merge(graphdef, state)


def node_model(scales: dict, *, hidden=(16, 16), seed: int = 0, rtol: float = 1e-6, atol: float = 1e-9,
               max_steps: int = 1000, combined_error: bool = False):
    """A neural ODE for all three states: ``d(Depot, Central, R)/dt = S NN(Depot/A, Central/Cs, R/Rs)``.

    ``S = diag(A, Cs, Rs)`` with ``A, Cs, Rs`` the amount, concentration and response scales of
    :func:`data_scales`; the second state is the concentration itself (no volume: nothing links the
    two PK states' units), the baseline response ``R(0) = exp(log_r0)`` is estimated. Doses add to
    Depot (mg). The output layer starts small (weights x 0.1: slow initial dynamics); an ODE solve
    that needs more than ``max_steps`` steps in a dosing interval fails (NaN: the optimiser steps
    back) instead of running for minutes. Returns ``model(pop)`` with ``model.net``.
    """
    make_net = lambda k: _quiet(MLP(_mlp_sizes(3, hidden, 3), rngs=nnx.Rngs(k)))  # noqa: E731
    net = make_net(seed)
    scale = jnp.array([scales["amount"], scales["conc"], scales["resp"]])

    def model(pop: Population) -> None:
        log_r0 = numpyro.sample("log_r0", dist.Normal(np.log(scales["resp"]), 2.0))
        f = nn("rates", net)

        def rhs(t, y, q):
            return scale * f(y / scale)

        sigmas = _sigmas(combined_error)
        with subjects(pop):
            r0 = jnp.broadcast_to(jnp.exp(log_r0), (pop.n_subjects,))
            y0 = lambda q: jnp.stack([0.0 * q["r0"], 0.0 * q["r0"], q["r0"]])  # noqa: E731
            states = ode.solve(rhs, pop, {"r0": r0}, y0=y0, rtol=rtol, atol=atol, max_steps=max_steps)
            _observe_both(states[..., 1], states[..., 2], sigmas, pop)

    model.net, model.make_net, model.site, model.combined_error = net, make_net, "rates", combined_error
    return model


class _Middle(nnx.Module):
    """The talk's middle variant: NN1(Depot), NN2(Central) and NN3(Central, R) as one module."""

    def __init__(self, hidden, rngs: nnx.Rngs):
        self.nn1 = MLP(_mlp_sizes(1, hidden, 1), rngs=rngs)
        self.nn2 = MLP(_mlp_sizes(1, hidden, 1), rngs=rngs)
        self.nn3 = MLP(_mlp_sizes(2, hidden, 1), rngs=rngs)

    def __call__(self, x):
        return jnp.stack([self.nn1(x[0:1])[0], self.nn2(x[1:2])[0], self.nn3(x[1:3])[0]])


def middle_model(scales: dict, *, hidden=(8, 8), seed: int = 0, rtol: float = 1e-6, atol: float = 1e-9,
                 max_steps: int = 1000, combined_error: bool = False):
    """The talk's middle level of prior knowledge (states, relationships and conservation known).

    ``dDepot/dt = -A NN1(Depot/A)``, ``dCentral/dt = A NN1(Depot/A) - A NN2(Central/A)``,
    ``dR/dt = Rs NN3(Central/A, R/Rs)``; ``C = Central / Vc`` with ``Vc`` estimated (the transfer
    term conserves drug, so Central is an amount), ``R(0) = exp(log_r0)`` estimated. Scales as in
    :func:`node_model` (also the small output layers and ``max_steps``). Returns ``model(pop)`` with
    ``model.net``.
    """
    make_net = lambda k: _quiet(_Middle(hidden, rngs=nnx.Rngs(k)))  # noqa: E731
    net = make_net(seed)
    amount, resp = scales["amount"], scales["resp"]

    def model(pop: Population) -> None:
        log_vc = numpyro.sample("log_vc", dist.Normal(np.log(amount / scales["conc"]), 2.0))
        log_r0 = numpyro.sample("log_r0", dist.Normal(np.log(resp), 2.0))
        f = nn("rates", net)

        def rhs(t, y, q):
            g = f(jnp.stack([y[0] / amount, y[1] / amount, y[2] / resp]))
            return jnp.stack([-amount * g[0], amount * (g[0] - g[1]), resp * g[2]])

        sigmas = _sigmas(combined_error)
        with subjects(pop):
            r0 = jnp.broadcast_to(jnp.exp(log_r0), (pop.n_subjects,))
            y0 = lambda q: jnp.stack([0.0 * q["r0"], 0.0 * q["r0"], q["r0"]])  # noqa: E731
            states = ode.solve(rhs, pop, {"r0": r0}, y0=y0, rtol=rtol, atol=atol, max_steps=max_steps)
            _observe_both(states[..., 1] / jnp.exp(log_vc), states[..., 2], sigmas, pop)

    model.net, model.make_net, model.site, model.has_volume = net, make_net, "rates", True
    model.combined_error = combined_error
    return model


def effect_curve(model, params, c) -> np.ndarray:
    """The learned drug effect ``h(c)`` of a :func:`ude_model` at concentrations ``c``.

    ``params``: a fit's parameters as the model takes them (`nlmegen._simulate.model_values`) or a
    dict with ``effect$params`` (point weights) / the Hill sites.
    """
    weights = params if model.kind == "hill" else params["effect$params"]
    return np.asarray(model.effect(weights, jnp.asarray(c, dtype=float)))


def weights_at(model, seed: int) -> dict:
    """Fresh initial weights of ``model``'s network (same architecture, initialised with ``seed``)."""
    return nnx.to_pure_dict(nnx.state(model.make_net(seed), nnx.Param))


def start_values(model, scales: dict, *, seed: int = 0, jitter: float = 0.0) -> dict:
    """Starting values of a fit of :func:`ude_model`, :func:`node_model` or :func:`middle_model`.

    Network weights initialised with ``seed``; mechanistic log-parameters at their priors' medians
    plus ``jitter`` times a standard normal draw (seeded by ``seed`` too); residual SDs 0.2 and 2.
    """
    rng = np.random.default_rng(seed)
    kind = getattr(model, "kind", None)
    if kind is None:  # neural ODE / middle variant: a baseline response (and a volume)
        values = {"log_r0": float(np.log(scales["resp"]))}
        if getattr(model, "has_volume", False):
            values["log_vc"] = float(np.log(scales["amount"] / scales["conc"]))
    else:
        values = {f"log_{k}": c for k, c in zip(_PK, _PK_CENTRES, strict=True)}
        if kind == "hill":
            values.update({"log_smax": 0.7, "log_sc50": 0.0, "log_n": 0.4})
    values = {k: float(v + jitter * rng.standard_normal()) for k, v in values.items()}
    values.update({"sigma_conc": 0.2, "sigma_resp": 2.0})
    if getattr(model, "combined_error", False):
        values["add_conc"] = 0.5
    if model.net is not None:
        values[f"{model.site}$params"] = weights_at(model, seed)
    return values
