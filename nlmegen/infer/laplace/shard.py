"""The subject axis over several devices: one FOCEI/FOCE/FO/Laplace evaluation split by subjects.

Subjects are independent given the population parameters, so every device computes the EBEs, OFV
contributions and gradients of its own block of subjects, and the totals are one ``psum`` of the
per-subject OFVs and gradients (`jax.shard_map` over a one-axis mesh; theta replicated). Automatic
partitioning of the adaptive ODE solves is avoided on purpose: per-device maps are the route for
diffrax (its issue 407). Subjects sit in the balanced, padded `shared.shard.Layout` (padding
masked out of the sums), and the per-subject outputs come back in the original order, so the
wrapped function has exactly the signature and outputs of the unsharded one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..shared.shard import AXIS, Layout, replicated, shard_count, subject_cost, subject_mesh
from .objective import EBEState

__all__ = ["AXIS", "shard_subjects", "shard_count"]


def shard_subjects(value_and_grad, n_devices: int):
    """``value_and_grad(theta_free, theta_all, eta0, pop)`` computed with the subjects
    split over ``n_devices`` devices; same outputs ``(ofv, grad, eta, ebe, ofv_i, grad_i, eta_jac)``.

    Returns ``(wrapped, sharding)``: jit the wrapped function with ``sharding`` for its inputs and
    outputs (replicated: every process passes the whole population, see `shared.shard`)."""
    mesh = subject_mesh(n_devices)
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
        layout = Layout.build(pop.n_subjects, n_devices, subject_cost(pop))
        out = sharded(theta_free, theta_all, layout.take(eta0), layout.take_pop(pop), layout.real)
        ofv, grad, eta, ebe, ofv_i, grad_i, eta_jac = out
        ebe = EBEState(*layout.restore((ebe.eta, ebe.converged, ebe.grad_norm)), ebe.iterations)
        return (ofv, grad, *layout.restore((eta,)), ebe, *layout.restore((ofv_i, grad_i, eta_jac)))

    return wrapped, replicated(mesh)
