"""Unstructured covariance (glmmTMB ``us``; also ``(1 + x | g)``)."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._base import CovStruct, check_dim
from ._registry import register


def unit_lower(x, k: int):
    """The unit lower-triangular L whose strict lower triangle is x, filled row
    by row: L[1,0] = x0, L[2,0] = x1, L[2,1] = x2, ... (TMB's UNSTRUCTURED_CORR)."""
    rows, cols = np.tril_indices(k, -1)
    return jnp.eye(k).at[rows, cols].set(x)


def corr_to_theta(corr) -> np.ndarray:
    """glmmTMB's ``put_cor``: the k(k-1)/2 correlation parameters of a
    positive-definite correlation matrix (inverse of ``Unstructured``'s map)."""
    c = np.linalg.cholesky(np.asarray(corr, dtype=float))
    lower = c / np.diag(c)[:, None]
    return lower[np.tril_indices(c.shape[0], -1)]


@register("us")
class Unstructured(CovStruct):
    """General positive-definite covariance, glmmTMB's ``us`` (default for
    ``(x1 + ... | g)``; with k = 1 it is ``(1 | g)``: theta = log sd).

    theta = (log sd_1..log sd_k, x_1..x_{k(k-1)/2}). With L unit lower
    triangular holding x row by row (L[1,0], L[2,0], L[2,1], ...):

        corr = D^-1/2 L L^T D^-1/2,   D = diag(L L^T),   cov = S corr S,  S = diag(sd)

    (TMB's ``UNSTRUCTURED_CORR`` scaled by ``VECSCALE``; for k = 2 the
    correlation is x / sqrt(1 + x^2)). The Cholesky factor is closed form,
    T = diag(sd_i / ||L_i||) L, finite and smooth for every finite theta.
    glmmTMB: ``us(terms | g)``; start theta = 0 (identity).
    """

    dim: int = eqx.field(static=True)
    name: ClassVar[str] = "us"

    def __init__(self, dim):
        self.dim = check_dim(self, dim)

    @property
    def n_params(self) -> int:
        return self.dim * (self.dim + 1) // 2

    def _cholesky(self, theta):
        theta = self._theta(theta)
        k = self.dim
        lower = unit_lower(theta[k:], k)
        log_scale = theta[:k] - 0.5 * jnp.log(jnp.sum(lower * lower, axis=1))
        return jnp.exp(log_scale)[:, None] * lower

    def cov(self, theta):
        t = self._cholesky(theta)
        return t @ t.T

    def param_names(self, term_names=None):
        terms = self._terms(term_names)
        rows, cols = np.tril_indices(self.dim, -1)
        return [f"log_sd({t})" for t in terms] + [
            f"chol_cor({terms[i]},{terms[j]})" for i, j in zip(rows, cols)
        ]
