"""First-order autoregressive structures on unit-spaced levels: ``ar1``, ``hetar1``."""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._base import AbstractSparsePrecision, check_dim
from ._registry import register
from ._toeplitz import bounded


class _AbstractAR1(AbstractSparsePrecision):
    """corr_ij = phi^|i-j|, phi = x / sqrt(1 + x^2) (x = theta[-1]); cov = S corr S.

    With 1 - phi^2 = 1 / (1 + x^2) every quantity has a closed, stable form:
    the Cholesky factor C_ij = phi^(i-j) c_j (c_0 = 1, c_j = 1/sqrt(1 + x^2)),
    the precision of corr, tridiagonal with diagonal 1 + x^2 at both ends and
    1 + 2 x^2 inside and off-diagonal -x sqrt(1 + x^2), and
    log det Q = -2 sum log sd + (k - 1) log(1 + x^2).
    """

    @abc.abstractmethod
    def _log_sd(self, theta):
        """(k,) log standard deviations from theta."""

    def phi(self, theta):
        return bounded(self._theta(theta)[-1])

    def _cholesky(self, theta):
        theta = self._theta(theta)
        k, x = self.dim, theta[-1]
        phi = bounded(x)
        powers = jnp.cumprod(jnp.concatenate([jnp.ones(1), jnp.full(k - 1, phi)]))
        c = jnp.concatenate([jnp.ones(1), jnp.full(k - 1, 1.0 / jnp.hypot(1.0, x))])
        i, j = np.indices((k, k))
        corr_chol = jnp.where(i >= j, powers[np.maximum(i - j, 0)] * c[j], 0.0)
        return jnp.exp(self._log_sd(theta))[:, None] * corr_chol

    def cov(self, theta):
        theta = self._theta(theta)
        k = self.dim
        powers = jnp.cumprod(jnp.concatenate([jnp.ones(1), jnp.full(k - 1, bounded(theta[-1]))]))
        lag = np.abs(np.subtract.outer(np.arange(k), np.arange(k)))
        sd = jnp.exp(self._log_sd(theta))
        return sd[:, None] * powers[lag] * sd[None, :]

    def precision_bands(self, theta):
        theta = self._theta(theta)
        k, x = self.dim, theta[-1]
        inner = (np.arange(k) >= 1).astype(float) + (np.arange(k) <= k - 2)
        inv_sd = jnp.exp(-self._log_sd(theta))
        diag = (1.0 + inner * x * x) * inv_sd**2
        off = -x * jnp.hypot(1.0, x) * inv_sd[:-1] * inv_sd[1:]
        return diag, off

    def log_det_precision(self, theta):
        theta = self._theta(theta)
        return -2.0 * jnp.sum(self._log_sd(theta)) + (self.dim - 1) * jnp.log1p(theta[-1] ** 2)

    def _report_extra(self, theta):
        return {"rho": self.phi(theta)}


@register("ar1")
class AR1(_AbstractAR1):
    """Homogeneous AR(1) on ordered, unit-spaced levels (glmmTMB 1.1.5's ``ar1``).

    cov_ij = sd^2 phi^|i-j|; theta = (log sd, x), phi = x / sqrt(1 + x^2).
    glmmTMB: ``ar1(factor(time) + 0 | g)``, start 0 (phi = 0). Declares its
    tridiagonal precision (``precision_bands``).
    """

    dim: int = eqx.field(static=True)
    name: ClassVar[str] = "ar1"

    def __init__(self, dim):
        self.dim = check_dim(self, dim)

    @property
    def n_params(self) -> int:
        return 2

    def _log_sd(self, theta):
        return jnp.broadcast_to(theta[0], (self.dim,))

    def param_names(self, term_names=None):
        return ["log_sd", "rho_transf"]


@register("hetar1")
class HeterogeneousAR1(_AbstractAR1):
    """AR(1) correlation with a free sd per level.

    cov_ij = sd_i sd_j phi^|i-j|; theta = (log sd_1..log sd_k, x),
    phi = x / sqrt(1 + x^2). glmmTMB (>= 1.1.12, where its earlier hetar1 was
    corrected; not in 1.1.5): ``hetar1(factor(time) + 0 | g)``, start 0.
    """

    dim: int = eqx.field(static=True)
    name: ClassVar[str] = "hetar1"

    def __init__(self, dim):
        self.dim = check_dim(self, dim)

    @property
    def n_params(self) -> int:
        return self.dim + 1

    def _log_sd(self, theta):
        return theta[: self.dim]

    def param_names(self, term_names=None):
        return [f"log_sd({t})" for t in self._terms(term_names)] + ["rho_transf"]
