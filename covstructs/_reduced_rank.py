"""Reduced-rank (factor-analytic) covariance: glmmTMB ``rr``."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve

from ._base import _LOG_2PI, CovStruct, check_dim
from ._registry import register


def _loading_index(k: int, d: int):
    """Rows and columns of Lambda filled by theta, in theta's order: the d
    diagonal entries, then the strict lower triangle column by column."""
    rows = list(range(d))
    cols = list(range(d))
    for j in range(d):
        for i in range(j + 1, k):
            rows.append(i)
            cols.append(j)
    return np.array(rows), np.array(cols)


@register("rr")
class ReducedRank(CovStruct):
    """Reduced rank d: cov = Lambda Lambda^T, Lambda (k x d) lower trapezoidal.

    theta = (Lambda_00, Lambda_11, ..., Lambda_{d-1,d-1}, then the entries below
    the diagonal column by column: Lambda_10..Lambda_{k-1,0}, Lambda_21, ...),
    k d - d(d-1)/2 values, unconstrained (the diagonal may be negative), as
    glmmTMB's ``rr(terms | g, d)``; start: all ones (glmmTMB's default,
    ``start_method = "res"`` aside). ``report`` adds "loadings" (glmmTMB's
    ``fact_load``).

    ``factor`` is Lambda padded with k - d zero columns (b = Lambda u_1:d, as
    glmmTMB's spherical u). For d < k the covariance is singular:
    ``log_density`` is then the density on its column space with respect to
    Lebesgue measure there (pseudo-determinant det(Lambda^T Lambda), quadratic
    form with the pseudo-inverse; scipy's ``allow_singular=True``), and
    ``precision`` is the Moore-Penrose pseudo-inverse
    Lambda (Lambda^T Lambda)^-2 Lambda^T; both are the usual ones when d = k.
    """

    dim: int = eqx.field(static=True)
    d: int = eqx.field(static=True)
    name: ClassVar[str] = "rr"

    def __init__(self, dim, d=2):
        self.dim = check_dim(self, dim)
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 1 <= d <= self.dim:
            raise ValueError(
                f"rr: the rank d must be an integer between 1 and dim={self.dim}; got {d!r}."
            )
        self.d = int(d)

    @property
    def n_params(self) -> int:
        return self.dim * self.d - self.d * (self.d - 1) // 2

    def start(self):
        return jnp.ones(self.n_params)

    def loadings(self, theta):
        """Lambda, (k, d)."""
        theta = self._theta(theta)
        rows, cols = _loading_index(self.dim, self.d)
        return jnp.zeros((self.dim, self.d)).at[rows, cols].set(theta)

    def factor(self, theta):
        lam = self.loadings(theta)
        return jnp.concatenate([lam, jnp.zeros((self.dim, self.dim - self.d))], axis=1)

    def cov(self, theta):
        lam = self.loadings(theta)
        return lam @ lam.T

    def _gram_cholesky(self, lam):
        return jnp.linalg.cholesky(lam.T @ lam)

    def precision(self, theta):
        lam = self.loadings(theta)
        chol = self._gram_cholesky(lam)
        a = cho_solve((chol, True), lam.T)  # G^-1 Lambda^T
        return a.T @ a

    def log_density(self, theta, b):
        b = self._check_b(b).reshape(-1, self.dim)
        lam = self.loadings(theta)
        chol = self._gram_cholesky(lam)
        c = cho_solve((chol, True), lam.T @ b.T)  # (d, n): coordinates in Lambda
        n = b.shape[0]
        log_pdet = 2.0 * jnp.sum(jnp.log(jnp.abs(jnp.diagonal(chol))))
        return -0.5 * jnp.sum(c * c) - 0.5 * n * (log_pdet + self.d * _LOG_2PI)

    def _report_extra(self, theta):
        return {"loadings": self.loadings(theta)}

    def param_names(self, term_names=None):
        terms = self._terms(term_names)
        rows, cols = _loading_index(self.dim, self.d)
        return [f"loading({terms[i]},{j + 1})" for i, j in zip(rows, cols)]
