"""The subject axis over several devices: one FOCEI/FOCE/FO/Laplace evaluation split by subjects.

Subjects are independent given the population parameters, so every device computes the EBEs, OFV
contributions and gradients of its own block of subjects, and the totals are one ``psum`` of the
per-subject OFVs and gradients (`jax.shard_map` over a one-axis mesh; theta replicated). Automatic
partitioning of the adaptive ODE solves is avoided on purpose: per-device maps are the route for
diffrax (its issue 407). The subject axis is padded to a multiple of the device count with copies of
the first subject, masked out of the sums and sliced off the outputs, so the wrapped function has
exactly the signature and outputs of the unsharded one.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .objective import EBEState

__all__ = ["AXIS", "shard_subjects", "shard_count"]

AXIS = "subjects"


def shard_count(setting, n_subjects: int) -> int:
    """Devices to split ``n_subjects`` over: ``setting`` None (all local devices), or a number."""
    available = jax.local_device_count()
    if setting is None:
        return max(1, min(available, n_subjects))
    if not isinstance(setting, int) or setting < 1:
        raise ValueError(f"devices must be None (all local devices) or a positive integer, not {setting!r}")
    if setting > available:
        raise ValueError(f"devices={setting}, but only {available} local device(s) are visible "
                         "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N before importing JAX)")
    return setting


def shard_subjects(value_and_grad, n_devices: int):
    """``value_and_grad(theta_free, theta_all, eta0, pop)`` computed with the subjects split over
    ``n_devices`` local devices; same outputs ``(ofv, grad, eta, ebe, ofv_i, grad_i, eta_jac)``."""
    mesh = jax.make_mesh((n_devices,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.local_devices()[:n_devices])
    subj = P(AXIS)

    def local(theta_free, theta_all, eta0, pop, real):
        ofv, grad, eta, ebe, ofv_i, grad_i, eta_jac = value_and_grad(theta_free, theta_all, eta0, pop)
        del ofv, grad  # the block's sums include its padding: sum the real subjects only
        total = jax.lax.psum(jnp.sum(jnp.where(real, ofv_i, 0.0)), AXIS)
        grad_total = jax.lax.psum(jnp.sum(jnp.where(real[:, None], grad_i, 0.0), axis=0), AXIS)
        ebe = ebe._replace(iterations=jax.lax.pmax(ebe.iterations, AXIS))
        return total, grad_total, eta, ebe, ofv_i, grad_i, eta_jac

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), subj, subj, subj),
                            out_specs=(P(), P(), subj, EBEState(subj, subj, subj, P()), subj, subj, subj),
                            # the model code is not written for varying-manual-axes types (its while loops
                            # start from constants); the replicated outputs are psum/pmax results
                            check_vma=False)

    def wrapped(theta_free, theta_all, eta0, pop):
        n = eta0.shape[0]
        per = math.ceil(n / n_devices)
        index = jnp.concatenate([jnp.arange(n), jnp.zeros(per * n_devices - n, dtype=int)])
        # each device sees a population of `per` subjects: its IDs (static, they set n_subjects) say so
        padded = dataclasses.replace(jax.tree_util.tree_map(lambda a: a[index], pop), ids=tuple(range(per)))
        real = jnp.arange(per * n_devices) < n
        out = sharded(theta_free, theta_all, eta0[index], padded, real)
        ofv, grad, eta, ebe, ofv_i, grad_i, eta_jac = out
        cut = lambda a: a[:n]  # noqa: E731
        ebe = EBEState(cut(ebe.eta), cut(ebe.converged), cut(ebe.grad_norm), ebe.iterations)
        return ofv, grad, cut(eta), ebe, cut(ofv_i), cut(grad_i), cut(eta_jac)

    return wrapped
