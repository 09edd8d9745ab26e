"""The reverse engine of the conditional estimation methods: OFV gradient in one reverse pass.

For FO, FOCE and FOCEI on any model (ODE models through the sensitivity-augmented solve of
`nlmegen.dynamics._sensitivity`, network terms included). One evaluation at theta:

1. EBEs ``eta*`` by the batched Newton search, gradient and curvature from one sensitivity run per
   iteration (`Objective.ebe_local`); no derivatives with respect to theta.
2. At ``eta*``, values only: the exact Hessian ``H_i = -d^2 l_i / d eta^2`` of the joint log
   density and the partial derivative ``dF_i / d eta`` of the subject's OFV ``F_i`` (its
   ``log|A_i|`` depends on eta through ``g = df/d eta``), from one forward-over-forward pass (the
   augmented solves in `diffrax.ForwardMode`) that ends the search (`Objective.exact_pieces`, the
   same function as the search's Newton steps: one copy in the compiled program);
   ``lambda_i = H_i^-1 dF_i / d eta``.
3. ONE reverse-mode pass (diffrax's checkpointed adjoint) of
   ``L_i(theta) = F_i(theta, eta*) + lambda_i' d l_i / d eta (theta, eta*)``:
   at the mode ``d l_i / d eta = 0``, so ``L_i = F_i`` in value, and by the implicit function
   theorem (``d eta* / d theta = H^-1 d^2 l / d eta d theta``) its theta-gradient is the total
   derivative ``dF_i / d theta`` (the adjoint form of the implicit-function correction). The pass
   is vmapped over subjects, each seeing a one-subject population, so the per-subject gradients
   (BHHH start, S matrix of the covariance step) come at the cost of the summed one.

The OFV returned is ``sum_i L_i`` in value too, not ``sum_i F_i``: the search stops at ``eta`` within
the ODE solver's noise of the mode, not at it, and ``L_i = F_i(eta) + lambda_i' g``, ``g = d l_i /
d eta``, is the first-order Taylor estimate of ``F_i`` at the one-Newton-step estimate ``eta + H^-1 g``
of the mode (its error, ``-g' H^-1 g`` from ``F_i``'s ``-2 l_i`` and O(|g|^2) from ``log|A_i|``, is of
the size of the search's last Newton decrement, below 1e-6 at the noise floor). So the value and the
gradient are of the same function: with ``F_i`` alone the value's slope along a short outer step is
the partial derivative at the stale ``eta`` (a subject at the noise floor takes no EBE step there),
not the total derivative the gradient gives, and on network models BFGS' line searches failed at
gradients of 3-60 for that reason (DeepNLME, 20 and 60 subjects). The value carries the term only
for subjects whose search converged: where it stopped away from a mode (its cap, a failed line
search, e.g. between the modes of a bimodal flow prior) the Newton step is no estimate of the mode
and the first-order term can be large (with it everywhere, the FOCEI fit of a bimodal flow prior
recovered mixture weights 0.03/0.94 instead of 0.3/0.7).

The cost of 3 does not grow with the number of population parameters (network weights included):
the forward engine (`backend`) pushes one tangent per parameter through every solve.
"""

from __future__ import annotations

import contextlib
import dataclasses

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from .objective import LOG_2PI, EBEState, Objective, _n_observations

__all__ = ["reverse_value_and_grad"]


def reverse_value_and_grad(objective: Objective, use_map: bool, free_idx: np.ndarray):
    """``value_and_grad(theta_free, theta_all, eta0, pop)`` with the forward engine's outputs:
    ``(ofv, grad, eta*, ebe_state, ofv_i, grad_i, d eta*/d theta)``; the last is zeros (not computed:
    it would cost one reverse pass per random effect)."""
    method = objective.method
    fwd = diffrax.ForwardMode()

    def full(theta_free, theta_all):
        return theta_all.at[free_idx].set(theta_free)

    def var0_of(theta, pop, adjoint):
        if method != "foce":
            return None
        zero = jnp.zeros((pop.n_subjects, objective.n_eta))
        return objective.local(theta, zero, pop, None, adjoint).var

    def map_penalty(theta, pop, n_subjects):
        """MAP: a subject's share of ``-2 log p(theta)`` (the prior does not depend on the dynamics)."""
        if not use_map:
            return 0.0
        return -2.0 * objective.density.log_prior(theta, pop, jacobian=False) / n_subjects

    def value_and_grad(theta_free, theta_all, eta0, pop):
        if objective.n_eta == 0:
            return _without_random_effects(theta_free, theta_all, pop)
        theta = jax.lax.stop_gradient(full(theta_free, theta_all))
        n_subjects = pop.n_subjects

        def subject_objective(theta_free, theta_all, eta, lam, converged, pop):
            """``L_i`` of one subject (``pop`` and ``eta`` of one subject); its gradient is dF_i/d theta."""
            theta = full(theta_free, theta_all)
            if method == "fo":
                ofv = objective.local_fo_ofv(theta, pop)[0]
            else:
                loc = objective.local(theta, eta, pop, var0_of(theta, pop, None))
                ofv = objective.local_ofv(loc, pop)[0]
                # F_i at the Newton-corrected mode (see the module docstring): value and gradient
                # agree; in value only where the search converged (elsewhere the step is no estimate)
                correction = jnp.dot(lam[0], loc.grad[0])
                ofv = ofv + correction - jnp.where(converged, 0.0, jax.lax.stop_gradient(correction))
            return ofv + map_penalty(theta, pop, n_subjects)

        var0 = var0_of(theta, pop, fwd)
        # the search ends with the exact Hessian and d OFV_i / d eta at the EBEs (not for FO)
        ebe, hess, dofv = objective.ebe_local(theta, eta0, pop, var0, final_exact=method != "fo")
        eta = jax.lax.stop_gradient(ebe.eta)
        if method == "fo":
            lam = jnp.zeros_like(eta)
        else:  # lambda_i = H_i^-1 dF_i/d eta (values: no theta-derivatives)
            lam = jax.lax.stop_gradient(jnp.linalg.solve(hess, dofv[..., None])[..., 0])
        ofv_i, grad_i = jax.vmap(jax.value_and_grad(subject_objective), in_axes=(None, None, 0, 0, 0, 0))(
            theta_free, theta_all, eta[:, None], lam[:, None], ebe.converged, one_subject_populations(pop))
        eta_jac = jnp.zeros((*eta.shape, theta_free.size), eta.dtype)
        return jnp.sum(ofv_i), jnp.sum(grad_i, axis=0), eta, ebe, ofv_i, grad_i, eta_jac

    def _without_random_effects(theta_free, theta_all, pop):
        """No random effects (one subject, naive pooled, a UDE on many regimens): the OFV is
        ``-2 log p(y | theta)`` (NONMEM's constant dropped), differentiated in reverse mode through
        plain solves; per subject as above."""
        n_subjects = pop.n_subjects

        def subject_objective(theta_free, pop):
            theta = full(theta_free, theta_all)
            parts = objective._trace_parts(theta, jnp.zeros((1, 0)), pop, context=contextlib.nullcontext())
            ofv = -2.0 * parts["loglik"][0] - _n_observations(parts, pop)[0] * LOG_2PI
            return ofv + map_penalty(theta, pop, n_subjects)

        ofv_i, grad_i = jax.vmap(jax.value_and_grad(subject_objective), in_axes=(None, 0))(
            theta_free, one_subject_populations(pop))
        eta = jnp.zeros((n_subjects, 0))
        ebe = EBEState(eta, jnp.ones(n_subjects, bool), jnp.zeros(n_subjects), jnp.zeros((), int))
        return (jnp.sum(ofv_i), jnp.sum(grad_i, axis=0), eta, ebe, ofv_i, grad_i,
                jnp.zeros((n_subjects, 0, theta_free.size)))

    return value_and_grad


def one_subject_populations(pop):
    """``pop`` with an extra axis: ``[subj, 1, ...]`` leaves, to be vmapped over its first axis.

    Under `jax.vmap` each slice is a valid one-subject population (``n_subjects == 1``).
    """
    batched = jax.tree.map(lambda a: a[:, None], pop)
    return dataclasses.replace(batched, ids=(pop.ids[0],))
