"""`Population`: the padded, masked, JAX-ready form of a NONMEM event table.

Every per-subject array leads with the subject axis and is padded to a common length, with a boolean
mask beside it. Padding is chosen so that padded entries are harmless to the dynamics:

- padded observations repeat the subject's last real observation time, with ``mask`` False;
- padded doses sit at the subject's last event time with amount 0 and ``dose_mask`` False;
- padded resets sit at time 0 with ``reset_mask`` False.

Records at the same time keep their order from the input table: ``obs_index`` / ``dose_index`` /
``reset_index`` give each record's position within its subject, and a dose affects an observation at
the same time only if its record came first (NONMEM processes records in order). The index is
twice the record's position, and the reset half of an EVID 4 record gets one less than its dose
half, so every comparison is strict.

Host-side metadata (original IDs, output labels, covariate names, categorical codes) rides along as
static fields, so `jax.jit` and `jax.vmap` see only the arrays. ``jax.vmap(f)(pop)`` hands ``f`` one
subject at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._covariates import Covariates

__all__ = ["ALL_FEATURES", "Population"]

ALL_FEATURES = frozenset({"infusion", "steady_state", "reset", "censoring"})


class Population(eqx.Module):
    """A population of subjects: observations, doses, resets and covariates, padded and masked.

    Build one with :func:`nlmegen.read_nonmem`; edit it with :meth:`subset` and :meth:`with_regimen`;
    get the event table back with :meth:`to_pandas`.

    Attributes
    ----------
    times, dv, mask : ``[subj, obs]``
        Observation times, observed values (0 where padded or censored without a value) and the mask
        that is True on real observations.
    dvid : ``[subj, obs]`` int
        Index of each observation's output into :attr:`outputs` (DVID; 0 for a single output).
    obs_cmt : ``[subj, obs]`` int
        The CMT of each observation record (0 if the table has no CMT column).
    cens, limit : ``[subj, obs]``
        Censoring: 0 observed; 1 left-censored (below ``limit``, the LLOQ); -1 right-censored
        (above ``limit``, the ULOQ). ``limit`` is ``-inf`` where there is no lower limit and the
        record is not censored.
    obs_index : ``[subj, obs]`` int
        Position of the observation record within its subject (to order same-time events).
    dose_times, dose_amts : ``[subj, dose]``
        Dose record times and amounts (after ADDL/II expansion).
    dose_cmts : ``[subj, dose]`` int
        NONMEM compartment numbers (1-based) the doses go into.
    dose_rates : ``[subj, dose]``
        0 for a bolus, > 0 for a zero-order infusion at that rate, -1 when the rate is modelled,
        -2 when the duration is modelled (NONMEM's RATE coding).
    dose_ii, dose_ss : ``[subj, dose]``
        Interdose interval and steady-state flag (0 none, 1 steady state with reset, 2 steady state
        added to what is there) of each dose.
    dose_mask, dose_index : ``[subj, dose]``
        True on real doses; position of the dose record within its subject.
    reset_times, reset_mask, reset_index : ``[subj, reset]``
        EVID 3/4 resets of all compartments (EVID 4 is stored as a reset and a dose).
    covariates : dict of name -> ``[subj]`` or ``[subj, obs]``
        Constant covariates as one value per subject; time-varying ones at the observation times.
    cov_times, cov_mask : ``[subj, rec]``
        Times of every record of each subject (for time-varying covariates between observations).
    cov_values : dict of name -> ``[subj, rec]``
        Every covariate's value on every record (after filling missing values by its interpolation).
    ids : tuple
        Original subject IDs (static).
    outputs : tuple of str
        Output labels: DVID values as text, in the order their indices use (static).
    interpolation : tuple of (name, "nocb" | "locf")
        How each covariate is interpolated between records (static).
    categories : tuple of (name, tuple of labels)
        Text covariates are coded 0, 1, ... in this label order (static).
    columns : tuple of str
        Original column names of the input table, in order (static).
    features : frozenset of str
        Dose-event kinds present: ``"infusion"``, ``"steady_state"``, ``"reset"``, and
        ``"censoring"`` when some observation is censored (static). The dynamics and the
        observation model leave out the code for kinds that never occur, which keeps compiled
        programs small and fast even when the population is a `jax.jit` argument. Defaults to all.
    dv_missing : ``[subj, obs]`` bool or None
        True on observation records read without a DV (``read_nonmem(..., allow_missing_dv=True)``,
        for simulation designs); their ``dv`` is 0. None when every observation has its value.
        Fitting refuses a population with missing DVs (see :func:`nlmegen.data.check_observed`).
    units : tuple of (name, unit)
        Units of roles (``TIME``, ``DV``, ``AMT``), outputs and covariates (static), for plot axes;
        from ``read_nonmem(..., units=)`` or the table's ``attrs["units"]``.
    occasions : tuple
        Occasion labels (static; empty without occasions). Set by an ``OCC`` column or by
        :meth:`with_occasions`; see ``nlmegen.occasions`` for inter-occasion variability.
    occ, dose_occ : ``[subj, obs]``, ``[subj, dose]`` int or None
        Index into :attr:`occasions` of each observation's and each dose's occasion.
    occ_start : ``[subj, occ]`` or None
        Time of the first record of each occasion (``inf`` where the subject lacks it).
    """

    times: Float[Array, "subj obs"]
    dv: Float[Array, "subj obs"]
    mask: Bool[Array, "subj obs"]
    dvid: Int[Array, "subj obs"]
    obs_cmt: Int[Array, "subj obs"]
    cens: Int[Array, "subj obs"]
    limit: Float[Array, "subj obs"]
    obs_index: Int[Array, "subj obs"]

    dose_times: Float[Array, "subj dose"]
    dose_amts: Float[Array, "subj dose"]
    dose_cmts: Int[Array, "subj dose"]
    dose_rates: Float[Array, "subj dose"]
    dose_ii: Float[Array, "subj dose"]
    dose_ss: Int[Array, "subj dose"]
    dose_mask: Bool[Array, "subj dose"]
    dose_index: Int[Array, "subj dose"]

    reset_times: Float[Array, "subj reset"]
    reset_mask: Bool[Array, "subj reset"]
    reset_index: Int[Array, "subj reset"]

    covariates: dict[str, Array] = eqx.field(converter=Covariates)  # a dict whose KeyError lists the names
    cov_times: Float[Array, "subj rec"]
    cov_mask: Bool[Array, "subj rec"]
    cov_values: dict[str, Array]

    ids: tuple = eqx.field(static=True)
    outputs: tuple = eqx.field(static=True, default=("DV",))
    interpolation: tuple = eqx.field(static=True, default=())
    categories: tuple = eqx.field(static=True, default=())
    columns: tuple = eqx.field(static=True, default=())
    features: frozenset = eqx.field(static=True, default=ALL_FEATURES)
    dv_missing: Bool[Array, "subj obs"] | None = None
    units: tuple = eqx.field(static=True, default=())
    occ: Int[Array, "subj obs"] | None = None
    dose_occ: Int[Array, "subj dose"] | None = None
    occ_start: Float[Array, "subj occ"] | None = None
    occasions: tuple = eqx.field(static=True, default=())

    # ------------------------------------------------------------------ sizes and look-ups
    @property
    def n_subjects(self) -> int:
        """Number of subjects (length of the leading axis)."""
        return len(self.ids)

    @property
    def n_obs(self) -> int:
        """Padded number of observations per subject."""
        return int(self.times.shape[-1])

    @property
    def n_doses(self) -> int:
        """Padded number of doses per subject."""
        return int(self.dose_times.shape[-1])

    @property
    def n_observations(self) -> int:
        """Total number of real (unpadded) observation records."""
        return int(np.asarray(self.mask).sum())

    @property
    def dose_compartments(self) -> tuple[int, ...]:
        """Sorted compartment numbers that receive at least one real dose (host-side)."""
        cmts = np.asarray(self.dose_cmts)[np.asarray(self.dose_mask)]
        return tuple(sorted({int(c) for c in cmts}))

    @property
    def n_occasions(self) -> int:
        """Number of occasions (0 without occasions)."""
        return len(self.occasions)

    def occasion_at(self, t: Array) -> Array:
        """Index of the occasion in force at time(s) ``t``: the last occasion started at or before ``t``.

        Works on the population (``t`` scalar or ``[subj, ...]``) and on one subject's slice inside
        ``jax.vmap``, e.g. in an ODE right-hand side that switches parameters at occasion boundaries.
        """
        if self.occ_start is None:
            raise ValueError("this population has no occasions; read an OCC column or use pop.with_occasions(...)")
        from ..model._occasions import occasion_index

        return occasion_index(t, self.occ_start)

    def with_occasions(self, by: Any = "OCC") -> Population:
        """The population with occasions taken from a column (``"OCC"``), from EVID 3/4 resets
        (``"resets"``) or from a rule (a function of :meth:`to_pandas`'s table giving one label per row)."""
        from ._occasions import with_occasions

        return with_occasions(self, by)

    def output_index(self, output: str | int) -> int:
        """Index of an output label (DVID) in :attr:`outputs`; raises ``KeyError`` naming the choices."""
        key = str(output)
        if key not in self.outputs:
            raise KeyError(f"unknown output {output!r}; this population has outputs {list(self.outputs)}")
        return self.outputs.index(key)

    def interpolation_of(self, name: str) -> str:
        """The interpolation ("nocb" or "locf") used for covariate ``name``."""
        return dict(self.interpolation)[name]

    def covariate_at(self, name: str, t: Array) -> Array:
        """Value of covariate ``name`` at time(s) ``t``, by the covariate's interpolation.

        Works inside `jit`/`vmap`, so an ODE right-hand side can read time-varying covariates. On a
        whole population ``t`` is a scalar (result ``[subj]``) or broadcasts against ``[subj, ...]``;
        on one subject's slice (inside ``jax.vmap`` over the population) ``t`` is any shape. LOCF
        takes the last record at or before ``t``; NOCB (NONMEM's rule) the first record at or after
        ``t``; beyond the records the nearest record's value holds.
        """
        values = self.cov_values[name]
        t = jnp.asarray(t)
        per_subject = self.cov_times.ndim == 1
        if values.ndim == self.cov_times.ndim - 1:  # constant covariate: one value per subject
            if per_subject:
                return jnp.broadcast_to(values, t.shape)
            lead = values.reshape((-1,) + (1,) * max(t.ndim - 1, 0))
            return jnp.broadcast_to(lead, jnp.broadcast_shapes(lead.shape, t.shape))
        rule = self.interpolation_of(name)
        if per_subject:
            return _step(self.cov_times, self.cov_mask, values, t, rule)
        t = jnp.broadcast_to(t, (self.n_subjects,) + t.shape[1:]) if t.ndim else jnp.full(self.n_subjects, t)
        return jax.vmap(lambda a, m, v, x: _step(a, m, v, x, rule))(self.cov_times, self.cov_mask, values, t)

    # ------------------------------------------------------------------ conversions and edits
    @classmethod
    def from_pandas(cls, table: Any, **options: Any) -> Population:
        """Same as :func:`nlmegen.read_nonmem` on a DataFrame."""
        from ._read import read_nonmem

        return read_nonmem(table, **options)

    def to_pandas(self) -> Any:
        """The event table (one row per record, ADDL already expanded), NONMEM column names."""
        from ._write import population_to_pandas

        return population_to_pandas(self)

    def subset(self, ids: Iterable[Any]) -> Population:
        """The subjects with these original IDs, in the order given (unknown IDs raise ``KeyError``)."""
        from ._edit import subset

        return subset(self, list(ids))

    def with_regimen(
        self,
        doses: Any,
        *,
        ids: Sequence[Any] | None = None,
    ) -> Population:
        """Replace the dosing of some (``ids``) or all subjects: a counterfactual regimen.

        ``doses`` is a NONMEM-style dose table (DataFrame or list of dicts with TIME, AMT and
        optionally CMT, RATE, II, ADDL, SS; an ID column applies rows to that subject only).
        Observations and covariates are kept.
        """
        from ._edit import with_regimen

        return with_regimen(self, doses, ids=ids)

    def with_dv(self, values: Any) -> Population:
        """This population with ``values`` (``[subj, obs]``) as the DV of its observation records
        (below an LLOQ: left-censored); what ``nlmegen.simulate(..., as_population=True)`` returns."""
        from ._edit import with_dv

        return with_dv(self, values)

    def check_observed(self) -> None:
        """Raise `DataError` naming observation records without a DV (read with ``allow_missing_dv``):
        fitting them would fit zeros as measurements. Every fitting backend calls this."""
        from ._checks import check_observed

        check_observed(self)

    def __repr__(self) -> str:  # short: the arrays can be large
        return (
            f"Population(n_subjects={self.n_subjects}, n_obs={self.n_obs} (padded), "
            f"n_doses={self.n_doses} (padded), outputs={list(self.outputs)}, "
            f"covariates={sorted(self.covariates)})"
        )


def _step(rec_times: Array, rec_mask: Array, values: Array, t: Array, rule: str) -> Array:
    """One subject's step function through its records (sorted; padding at the end, masked)."""
    n_valid = jnp.maximum(jnp.sum(rec_mask), 1)
    tt = t[..., None]
    if rule == "locf":
        idx = jnp.sum(rec_mask & (rec_times <= tt), axis=-1) - 1
    else:
        idx = jnp.sum(rec_mask & (rec_times < tt), axis=-1)
    return values[jnp.clip(idx, 0, n_valid - 1)]
