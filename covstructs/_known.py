"""Covariances given by a known matrix: glmmTMB ``propto`` and ``equalto``."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._base import CovStruct, check_dim
from ._registry import register
from ._unstructured import corr_to_theta


def _known_matrix(obj, dim, matrix):
    name = type(obj).__name__
    if matrix is None:
        raise ValueError(f"{name} needs `matrix`, the known (k, k) covariance matrix.")
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name}: matrix must be square (k, k); got shape {m.shape}.")
    dim = check_dim(obj, m.shape[0] if dim is None else dim)
    if m.shape[0] != dim:
        raise ValueError(f"{name}: matrix is {m.shape[0]} x {m.shape[0]} but dim={dim}.")
    if not np.allclose(m, m.T, rtol=1e-10, atol=0.0):
        raise ValueError(f"{name}: matrix must be symmetric.")
    try:
        chol = np.linalg.cholesky(m)
    except np.linalg.LinAlgError:
        raise ValueError(
            f"{name}: matrix must be positive definite (its Cholesky factorization failed)."
        ) from None
    return dim, jnp.asarray(m), jnp.asarray(chol)


def _glmmtmb_fixed_theta(m) -> np.ndarray:
    """glmmTMB's (mapped, fixed) theta for a known matrix: its log-SDs and
    ``us`` correlation parameters (``as.theta.vcov``)."""
    m = np.asarray(m)
    sd = np.sqrt(np.diag(m))
    return np.concatenate([np.log(sd), corr_to_theta(m / np.outer(sd, sd))])


@register("propto")
class ProportionalTo(CovStruct):
    """Covariance proportional to a known positive-definite matrix M:
    cov = lambda M.

    theta = (log lambda,); start 0. glmmTMB (>= 1.1.10; not in 1.1.5):
    ``propto(terms + 0 | g, M)``. glmmTMB's own theta for the term also holds
    M's log-SDs and ``us`` correlation parameters, mapped (held fixed) before
    log lambda; ``glmmtmb_theta`` returns that full vector.
    """

    dim: int = eqx.field(static=True)
    matrix: jax.Array
    chol: jax.Array
    name: ClassVar[str] = "propto"

    def __init__(self, dim=None, matrix=None):
        self.dim, self.matrix, self.chol = _known_matrix(self, dim, matrix)

    @property
    def n_params(self) -> int:
        return 1

    def cov(self, theta):
        return jnp.exp(self._theta(theta)[0]) * self.matrix

    def _cholesky(self, theta):
        return jnp.exp(0.5 * self._theta(theta)[0]) * self.chol

    def glmmtmb_theta(self, theta) -> np.ndarray:
        return np.concatenate([_glmmtmb_fixed_theta(self.matrix), np.asarray(self._theta(theta))])

    def _report_extra(self, theta):
        return {"lambda": jnp.exp(self._theta(theta)[0])}

    def param_names(self, term_names=None):
        return ["log_lambda"]


@register("equalto")
class EqualTo(CovStruct):
    """A known positive-definite covariance M, no parameters: cov = M.

    theta = () (shape (0,)). glmmTMB (>= 1.1.14; not in 1.1.5):
    ``equalto(terms + 0 | g, M)``, whose theta holds M's log-SDs and
    correlation parameters, all mapped (``glmmtmb_theta``).
    """

    dim: int = eqx.field(static=True)
    matrix: jax.Array
    chol: jax.Array
    name: ClassVar[str] = "equalto"

    def __init__(self, dim=None, matrix=None):
        self.dim, self.matrix, self.chol = _known_matrix(self, dim, matrix)

    @property
    def n_params(self) -> int:
        return 0

    def cov(self, theta):
        self._theta(theta)
        return self.matrix

    def _cholesky(self, theta):
        self._theta(theta)
        return self.chol

    def glmmtmb_theta(self, theta=None) -> np.ndarray:
        return _glmmtmb_fixed_theta(self.matrix)

    def param_names(self, term_names=None):
        return []
