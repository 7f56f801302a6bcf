"""Ornstein-Uhlenbeck process on irregular times: glmmTMB ``ou``."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._base import AbstractSparsePrecision, check_dim
from ._registry import register


@register("ou")
class OrnsteinUhlenbeck(AbstractSparsePrecision):
    """Continuous-time AR(1): cov_ij = sd^2 exp(-rate |t_i - t_j|).

    theta = (log sd, log rate); ``times`` strictly increasing (glmmTMB:
    ``ou(times + 0 | g)`` with ``times = numFactor(t)``; start 0). ``report``
    gives "rate" (glmmTMB's parameter, exp(theta[1])) and "range" = 1/rate
    (the lag at which the correlation is 1/e, as for ``exp``).

    A Markov chain, so the precision is tridiagonal. With z_g = rate (t_{g+1} - t_g)
    and rho_g = exp(-z_g): diagonal (1 + c_{j-1} + c_j) / sd^2 (terms present
    where the gap exists), c_g = rho_g^2 / (1 - rho_g^2) = e^{-2z} / -expm1(-2z),
    off-diagonal -rho_g / (1 - rho_g^2) / sd^2 = -e^{-z} / -expm1(-2z) / sd^2,
    log det Q = -2k log sd - sum_g log(-expm1(-2 z_g)); all stable for
    widely spaced (rho -> 0) and close (rho -> 1) times.
    """

    dim: int = eqx.field(static=True)
    times: jax.Array
    name: ClassVar[str] = "ou"

    def __init__(self, dim=None, times=None):
        if times is None:
            raise ValueError("OrnsteinUhlenbeck needs `times`, an array of the k sorted times.")
        t = np.asarray(times, dtype=float).reshape(-1)
        if dim is None:
            dim = t.size
        self.dim = check_dim(self, dim)
        if t.size != self.dim:
            raise ValueError(f"ou: got {t.size} times for dim={self.dim}; give one time per level.")
        if np.any(np.diff(t) <= 0) or not np.all(np.isfinite(t)):
            raise ValueError("ou: times must be finite and strictly increasing (as glmmTMB requires).")
        self.times = jnp.asarray(t)

    @property
    def n_params(self) -> int:
        return 2

    def rate(self, theta):
        return jnp.exp(self._theta(theta)[1])

    def cov(self, theta):
        theta = self._theta(theta)
        dt = jnp.abs(self.times[:, None] - self.times[None, :])
        return jnp.exp(2.0 * theta[0] - jnp.exp(theta[1]) * dt)

    def _cholesky(self, theta):
        theta = self._theta(theta)
        t, rate = self.times, jnp.exp(theta[1])
        i, j = np.indices((self.dim, self.dim))
        lower = i >= j
        decay = jnp.exp(jnp.where(lower, -rate * (t[:, None] - t[None, :]), -jnp.inf))
        z = rate * jnp.diff(t)
        c = jnp.concatenate([jnp.ones(1), jnp.sqrt(-jnp.expm1(-2.0 * z))])
        return jnp.exp(theta[0]) * decay * c[None, :]

    def precision_bands(self, theta):
        theta = self._theta(theta)
        z = jnp.exp(theta[1]) * jnp.diff(self.times)
        one_minus = -jnp.expm1(-2.0 * z)
        c = jnp.exp(-2.0 * z) / one_minus
        zero = jnp.zeros(1)
        diag = 1.0 + jnp.concatenate([zero, c]) + jnp.concatenate([c, zero])
        off = -jnp.exp(-z) / one_minus
        inv_var = jnp.exp(-2.0 * theta[0])
        return diag * inv_var, off * inv_var

    def log_det_precision(self, theta):
        theta = self._theta(theta)
        z = jnp.exp(theta[1]) * jnp.diff(self.times)
        return -2.0 * self.dim * theta[0] - jnp.sum(jnp.log(-jnp.expm1(-2.0 * z)))

    def _report_extra(self, theta):
        rate = self.rate(theta)
        return {"rate": rate, "range": 1.0 / rate}

    def param_names(self, term_names=None):
        return ["log_sd", "log_rate"]
