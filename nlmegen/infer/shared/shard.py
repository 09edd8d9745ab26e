"""The subject axis over several devices (and processes): the layout every sharded backend uses.

Subjects are independent given the population parameters, so a backend can split them over the
devices of a one-axis mesh (`jax.shard_map`), each device computing its own block, with a ``psum``
for what is summed over subjects (population parameters replicated). This module holds the parts
all backends share:

- `shard_count`: how many devices (``devices=None``: every device of every process, i.e.
  ``jax.device_count()``, which is the local count unless `jax.distributed` is initialised);
- `subject_mesh` and `replicated`: the mesh over the first ``n`` global devices and the
  replicated sharding of a jitted function's inputs and outputs. Every process passes the same
  (whole) population, each device takes its block inside the program, and per-subject outputs are
  gathered, so a multi-process fit needs no change in the backend's host code;
- `Layout`: which subject sits in which slot. Subjects are sorted by an estimated cost (records
  plus doses) and dealt to the devices in turn, heaviest first, so that every device gets an equal
  share of every cost bucket (the slowest subjects do not all land on one device, which would set
  every device's pace); the subject axis is padded to a multiple of the device count with copies
  of a real subject, masked out of the sums, and `Layout.restore` puts per-subject results back in
  the original order.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["AXIS", "Layout", "per_subject", "replicated", "shard_count", "single_process", "subject_cost",
           "subject_mesh"]

AXIS = "subjects"


def shard_count(setting, n_subjects: int) -> int:
    """Devices to split ``n_subjects`` over: ``setting`` None (all devices), or a number."""
    available = jax.device_count()
    if setting is None:
        if jax.process_count() > 1:  # every process's devices must take part in a multi-process program
            return available
        return max(1, min(available, n_subjects))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"devices must be None (all devices) or a positive integer, not {setting!r}")
    if setting > available:
        raise ValueError(f"devices={setting}, but only {available} device(s) are visible "
                         "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N before importing JAX)")
    if jax.process_count() > 1 and setting not in (1, available):
        raise ValueError(f"devices={setting}: with {jax.process_count()} processes use every device "
                         f"(devices=None, {available}) or one (devices=1, this process alone)")
    return setting


def single_process(method: str, n_devices: int) -> None:
    """Refuse a split over the devices of several processes where ``method`` does not support it."""
    if n_devices > 1 and jax.process_count() > 1:
        raise NotImplementedError(f"{method}: splitting the subjects over the devices of {jax.process_count()} "
                                  "processes is implemented for FOCEI/FOCE/FO/Laplace and SAEM; use devices=1 "
                                  "(each process on its own) or run this method in one process")


def subject_mesh(n_devices: int) -> jax.sharding.Mesh:
    """A one-axis mesh (``AXIS``) over the first ``n_devices`` devices of all processes."""
    return jax.make_mesh((n_devices,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n_devices])


def replicated(mesh) -> NamedSharding:
    """Every device holds the whole value (inputs and outputs of the sharded programs)."""
    return NamedSharding(mesh, P())


def subject_cost(pop):
    """Estimated cost of each subject: its observation records plus its dose records (traceable)."""
    return jnp.sum(pop.mask, axis=1) + jnp.sum(pop.dose_mask, axis=1)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Subjects in device slots: ``slots[d * per + j]`` is the subject in slot j of device d.

    ``real`` marks slots that hold a subject (the others repeat one and are masked out);
    ``position[i]`` is the slot of subject i (`restore` gathers per-subject outputs with it).
    Built from the data inside the jitted program (JAX arrays), so a new population of the same
    shapes (a bootstrap replicate) gets its own layout without a recompile.
    """

    slots: jax.Array
    real: jax.Array
    position: jax.Array
    per: int

    @classmethod
    def build(cls, n_subjects: int, n_devices: int, cost=None) -> Layout:
        """Balanced layout: subjects by decreasing ``cost`` (ties in subject order) dealt to the
        devices in turn, rank r to device ``r % n_devices``; without a cost the ranks are the subject order."""
        per = math.ceil(n_subjects / n_devices)
        order = jnp.arange(n_subjects) if cost is None else jnp.argsort(-jnp.asarray(cost), stable=True)
        rank = np.arange(n_subjects)
        slot_of_rank = jnp.asarray((rank % n_devices) * per + rank // n_devices)
        slots = jnp.full(per * n_devices, order[0]).at[slot_of_rank].set(order)
        real = jnp.zeros(per * n_devices, bool).at[slot_of_rank].set(True)
        position = jnp.zeros(n_subjects, int).at[order].set(slot_of_rank)
        return cls(slots, real, position, per)

    def take(self, tree):
        """``tree``'s leaves (leading subject axis) in slot order."""
        return jax.tree_util.tree_map(lambda a: a[self.slots], tree)

    def take_pop(self, pop):
        """The population in slot order; each device's block says it holds ``per`` subjects."""
        return dataclasses.replace(self.take(pop), ids=tuple(range(self.per)))

    def restore(self, tree):
        """Per-slot outputs (leading axis) back in the original subject order (padding dropped)."""
        return jax.tree_util.tree_map(lambda a: a[self.position], tree)


def per_subject(fn, n_devices: int, n_shared: int):
    """``fn(*shared, *subject_args, pop)`` (outputs: arrays with a leading subject axis) computed with
    the subjects split over ``n_devices`` devices; outputs in the original subject order.

    The first ``n_shared`` arguments are replicated; the others (and ``pop``, the last) lead with
    the subject axis. Nothing is summed: per-subject work only (an MCMC transition, a log density).
    """
    mesh = subject_mesh(n_devices)

    def wrapped(*args):
        shared, own, pop = args[:n_shared], args[n_shared:-1], args[-1]
        layout = Layout.build(pop.n_subjects, n_devices, subject_cost(pop))
        specs = (P(),) * n_shared + (P(AXIS),) * (len(own) + 1)
        sharded = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(AXIS), check_vma=False)
        return layout.restore(sharded(*shared, *layout.take(own), layout.take_pop(pop)))

    return wrapped
