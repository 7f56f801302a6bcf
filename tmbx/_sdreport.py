"""`SDReport`: TMB's ``sdreport`` — standard errors by the delta method.

- Fixed parameters: ``V = H^-1`` with ``H`` the exact Hessian of the Laplace
  marginal nll at the optimum.
- Random effects (conditional modes ``u*``):
  ``Var(u) = diag(H_uu^-1) + J V J'`` with ``J = du*/dx`` (TMB's formula),
  where ``diag(H_uu^-1)`` is a selected inversion of the sparse factor.
- Derived quantities ``phi = report(p, d)`` (TMB's ``ADREPORT``):
  ``Var(phi) = D V D' + phi_u H_uu^-1 phi_u'`` with ``D`` the total derivative
  in ``x`` (through ``u*(x)``) and ``phi_u`` the partial derivative in ``u``.
- Bias correction (``bias_correct=True``, TMB's ``sdreport(bias.correct = TRUE)``):
  the epsilon method of Thorson & Kristensen (2016), ``E[phi(u) | y] ~= -dL_eps/d eps``
  at ``eps = 0``, ``L_eps`` the Laplace marginal nll of ``f(x, u) - eps' phi(x, u)``
  at the estimates ``x``; for the random effects themselves ``phi = u``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from ._internal import unique_sorted


class SDReport:
    """Standard errors of fixed parameters, random effects and reported quantities.

    Attributes
    ----------
    value, se : dict name -> array for the fixed parameters (held elements: NaN se).
    cov_fixed : covariance of the free fixed parameters (order of ``labels``).
    labels : names of the free fixed parameters.
    par_random, se_random : dict name -> conditional modes and their standard errors.
    report_value, report_se, report_cov : derived quantities (``report=``).
    joint_precision : precision of (x, u) jointly, when asked for.
    report_value_bc, par_random_bc : bias-corrected reported quantities and random
        effects (``bias_correct=True``; TMB's "Est. (bias.correct)").
    pd_hessian : whether the Hessian of the marginal is positive definite.
    """

    def __init__(self, fit, joint_precision: bool = False, bias_correct: bool = False):
        model = fit.model
        sp = model.space
        self.labels = list(sp.labels["x"])
        H = fit.hessian
        H = 0.5 * (H + H.T)
        self.pd_hessian = fit.pd_hessian
        if sp.n_x:
            if self.pd_hessian:
                V = np.linalg.inv(H)
            else:
                warnings.warn(
                    "sdreport: the Hessian of the marginal nll is not positive definite; standard "
                    "errors are NaN where the curvature is not positive (see Fit.message)",
                    RuntimeWarning, stacklevel=2,
                )
                V = np.linalg.pinv(H)
                bad = np.diag(V) <= 0
                V[bad, :] = np.nan
                V[:, bad] = np.nan
        else:
            V = np.zeros((0, 0))
        self.cov_fixed = V
        se_x = np.sqrt(np.maximum(np.diag(V), 0.0)) if V.size else np.zeros(0)
        se_x = np.where(np.isnan(np.diag(V)) if V.size else [], np.nan, se_x) if V.size else se_x
        self.value = fit.par
        self.se = sp.expand(se_x, "x")
        self._xud = (jnp.asarray(fit.x), jnp.asarray(fit.u), fit.data)
        self._fit = fit
        self._random = None
        self._report = None
        self.joint_precision = self._joint_precision(*self._xud, V) if joint_precision else None
        self.report_value_bc, self.par_random_bc = ({}, {})
        if bias_correct:
            self._bias_correct()

    # random effects and reported quantities are computed on first use: they
    # need their own compiled programs, which a user asking only for the
    # fixed effects' standard errors should not wait for
    @property
    def par_random(self) -> dict:
        return self._fit.par_random

    @property
    def se_random(self) -> dict:
        if self._random is None:
            model, sp = self._fit.model, self._fit.model.space
            if model.laplace is None:
                self._random = {}
            else:
                diag_inv, J = (np.asarray(a) for a in _random_core(model)(*self._xud))
                V = np.nan_to_num(self.cov_fixed)
                var_u = diag_inv + np.einsum("ij,jk,ik->i", J, V, J)
                self._random = sp.expand(np.sqrt(np.maximum(var_u, 0.0)), "u")
        return self._random

    def _reported(self):
        if self._report is None:
            self._report = ({}, {}, {})
            if self._fit.model.report_fn is not None:
                self._adreport(*self._xud, np.nan_to_num(self.cov_fixed))
        return self._report

    @property
    def report_value(self) -> dict:
        return self._reported()[0]

    @property
    def report_se(self) -> dict:
        return self._reported()[1]

    @property
    def report_cov(self) -> dict:
        return self._reported()[2]

    def _adreport(self, x, u, d, V):
        model = self._fit.model
        vals, D, PHP = jax.tree_util.tree_map(np.asarray, _report_core(model)(x, u, d))
        for k, v in vals.items():
            v = np.asarray(v)
            Dk = np.asarray(D[k]).reshape(v.size, -1)
            cov = Dk @ V @ Dk.T if V.size else np.zeros((v.size, v.size))
            if PHP is not None:
                cov = cov + np.asarray(PHP[k]).reshape(v.size, v.size)
            self._report[0][k] = v
            self._report[2][k] = cov
            self._report[1][k] = np.sqrt(np.maximum(np.diag(cov), 0.0)).reshape(v.shape)

    def _joint_precision(self, x, u, d, V):
        """Joint precision of (x, u) as TMB's ``getJointPrecision``: a scipy sparse
        matrix [[V^-1 + Hxu Huu^-1 Hux, Hxu], [Hux, Huu]], with ``Huu`` taken from the
        sparse latent Hessian (never dense in n_u); rows/columns ordered (x, u)."""
        import scipy.sparse as sps

        model = self._fit.model
        lap = model.laplace
        n_x = x.shape[0]
        if lap is None:
            return sps.csr_matrix(np.linalg.inv(V)) if n_x else sps.csr_matrix((0, 0))
        hess = lap.hessian
        flat = np.asarray(jax.jit(lambda xx, uu: hess(xx, uu, d))(x, u))
        lay = lap.layout
        n_u = u.shape[0]
        key = unique_sorted(np.asarray(hess.rows, np.int64) * n_u + np.asarray(hess.cols, np.int64))
        rows, cols = key // n_u, key % n_u
        slots = lay.slots(rows, cols)
        swapped = lay.slots(cols, rows)
        slots = np.where(slots >= 0, slots, swapped)
        vals = flat[slots]
        Huu = sps.coo_matrix((vals, (rows, cols)), shape=(n_u, n_u)).tocsr()
        if not n_x:
            return Huu
        grad_x = lambda uu: jax.grad(model.f, argnums=0)(x, uu, d)
        Hxu = np.asarray(jax.jit(jax.jacrev(grad_x))(u))  # (n_x, n_u)
        sol = np.asarray(jax.jit(lambda xx, uu, b: lap.factor(xx, uu, d).solve(b))(x, u, jnp.asarray(Hxu.T)))
        top = np.linalg.inv(V) + Hxu @ sol
        return sps.bmat([[sps.csr_matrix(top), sps.csr_matrix(Hxu)], [sps.csr_matrix(Hxu.T), Huu]]).tocsr()

    def _bias_correct(self):
        model, sp = self._fit.model, self._fit.model.space
        if model.laplace is None:
            warnings.warn("sdreport(bias_correct=True): the model has no random effects, so there is "
                          "nothing to correct; the estimates are returned unchanged", RuntimeWarning, stacklevel=3)
            self.report_value_bc = dict(self.report_value)
            return
        u_bc, rep_bc = jax.tree_util.tree_map(np.asarray, _bias_core(model)(*self._xud))
        if not np.all(np.isfinite(u_bc)):
            warnings.warn("sdreport(bias_correct=True): the correction is not finite; the Hessian of the "
                          "random effects may be singular at their mode (see Fit.message)",
                          RuntimeWarning, stacklevel=3)
        self.par_random_bc = sp.expand(u_bc, "u")
        self.report_value_bc = {k: np.asarray(v).reshape(np.shape(self.report_value[k])) for k, v in rep_bc.items()}

    def summary(self):
        """A pandas DataFrame: estimate and standard error of every reported quantity."""
        import pandas as pd

        rows = []
        for kind, vals, ses in (("fixed", self.value, self.se), ("random", self.par_random, self.se_random),
                                ("report", self.report_value, self.report_se)):
            for name, v in vals.items():
                v, s = np.atleast_1d(v).ravel(), np.atleast_1d(ses[name]).ravel()
                for i, (vi, si) in enumerate(zip(v, s)):
                    rows.append((kind, name if v.size == 1 else f"{name}[{i}]", float(vi), float(si)))
        return pd.DataFrame(rows, columns=["kind", "name", "estimate", "se"]).set_index("name")


def _random_core(model):
    """Jitted (cached on the model): diag(H_uu^-1) and du*/dx at (x, u)."""
    if getattr(model, "_random_core", None) is None:
        lap = model.laplace

        def core(x, u, d):
            # (the implicit derivative at the fit's mode: differentiating
            # `u_star` would solve for the mode again, a Newton loop in the program)
            F = lap.factor(x, u, d)
            J = lap.mode_jacobian(x, u, d, F) if x.shape[0] else jnp.zeros((u.shape[0], 0))
            return F.diag_inverse(), J

        model._random_core = model.jit(core)  # (level 0 for a small model)
    return model._random_core


def _report_core(model):
    """Jitted (cached on the model): report values, their total x-derivative and
    ``phi_u H_uu^-1 phi_u'``."""
    if getattr(model, "_report_core", None) is None:
        sp, lap = model.space, model.laplace

        def rep(xx, uu, d):
            out = model.report_fn(sp.unflatten(xx, uu), d)
            return {k: jnp.asarray(v, jnp.float64) for k, v in out.items()}

        def core(x, u, d):
            if lap is None:
                return rep(x, u, d), jax.jacfwd(lambda xx: rep(xx, u, d))(x), None
            vals = rep(x, u, d)
            F = lap.factor(x, u, d)
            # the total derivative in x, through the mode's implicit derivative J
            J = lap.mode_jacobian(x, u, d, F)
            D = jax.jacfwd(lambda xx: rep(xx, u + J @ (xx - x), d))(x)
            phi_u = jax.jacfwd(lambda uu: rep(x, uu, d))(u)
            PHP = {}
            for k, v in vals.items():
                Pu = phi_u[k].reshape(v.size, -1)
                PHP[k] = Pu @ F.solve(Pu.T)
            return vals, D, PHP

        model._report_core = model.jit(core)  # (level 0 for a small model)
    return model._report_core


def _bias_core(model):
    """Jitted (cached on the model): the epsilon method's ``E[u | y]`` and ``E[phi | y]``.

    With ``H`` the Hessian of ``f`` in ``u`` at the mode ``u*`` and ``v_k = H^-1 grad_u phi_k``
    (the mode's response to ``eps_k``), differentiating the Laplace marginal of
    ``f - eps' phi`` at ``eps = 0`` gives::

        E[phi_k] ~= phi_k(u*) + tr(H^-1 d2phi_k/du2) / 2 - (grad_u log det H) . v_k / 2

    exact for ``phi`` quadratic in ``u`` when ``f`` is (Gaussian models). ``H^-1`` is never
    formed: the trace is accumulated one solve per random effect.
    """
    if getattr(model, "_bias_core", None) is None:
        sp, lap = model.space, model.laplace

        def core(x, u, d):
            F = lap.factor(x, u, d)
            g_ld = jax.grad(lambda uu: lap.factor(x, uu, d).logdet())(u)
            w = F.solve(g_ld)  # H^-1 grad log det H
            u_bc = u - 0.5 * w
            if model.report_fn is None:
                return u_bc, {}

            def phi(uu):
                out = model.report_fn(sp.unflatten(x, uu), d)
                return jnp.concatenate([jnp.ravel(jnp.asarray(out[k], jnp.float64)) for k in sorted(out)])

            grad_phi = jax.jacrev(phi)

            def trace_term(j):
                # column j of H^-1, then (d2phi/du2 H^-1)[:, j, j] for every phi_k
                c = F.solve(jnp.zeros(u.shape[0]).at[j].set(1.0))
                return jax.jvp(grad_phi, (u,), (c,))[1][:, j]

            tr = jnp.sum(jax.lax.map(trace_term, jnp.arange(u.shape[0])), axis=0)
            flat = phi(u) + 0.5 * tr - 0.5 * grad_phi(u) @ w
            out = model.report_fn(sp.unflatten(x, u), d)
            vals, start = {}, 0
            for k in sorted(out):
                n = int(np.size(out[k]))
                vals[k] = flat[start:start + n]
                start += n
            return u_bc, vals

        model._bias_core = model.jit(core)  # (level 0 for a small model)
    return model._bias_core
