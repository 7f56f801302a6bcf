"""Lognormal family parameterized by the mean and sd on the data scale (glmmTMB >= 1.1.7)."""

from __future__ import annotations

from typing import ClassVar, final

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from ._base import Family, require_positive
from ._math import LOG_2PI


@final
class LogNormal(Family):
    """Lognormal response with data-scale mean ``mu`` and sd ``phi``.

    ``log y ~ N(m, s^2)`` with ``s^2 = log(1 + (phi / mu)^2)``, ``m = log(mu) - s^2 / 2``;
    ``log f = log dnorm(log y, m, s) - log y``. ``E = mu``, ``Var = phi^2``.

    Dispersion: ``disp = log(phi)`` (data-scale sd), ``sigma() = phi``;
    ``s^2 = softplus(2 (disp - log mu))`` as glmmTMB's ``logspace_add``.
    Not part of glmmTMB 1.1.5.

    glmmTMB: ``lognormal(link = "log")``.
    """

    name: ClassVar[str] = "lognormal"
    has_disp: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True
    default_link: ClassVar[str] = "log"
    allowed_links: ClassVar[tuple[str, ...]] = ("log", "identity", "inverse")

    def _log_params(self, eta, disp):
        log_mu = self.link.log_inverse(eta)
        s2 = jax.nn.softplus(2.0 * (disp - log_mu))
        return log_mu - 0.5 * s2, s2

    def _log_prob(self, y, eta, disp, psi, trials):
        m, s2 = self._log_params(eta, disp)
        log_y = jnp.log(y)
        r = log_y - m
        return -0.5 * r * r / s2 - 0.5 * jnp.log(s2) - 0.5 * LOG_2PI - log_y

    def _variance(self, eta, disp, psi, trials):
        return jnp.broadcast_to(jnp.exp(2.0 * disp), jnp.broadcast_shapes(jnp.shape(eta), jnp.shape(disp)))

    def _sample(self, key, eta, disp, psi, trials):
        m, s2 = self._log_params(eta, disp)
        return jnp.exp(m + jnp.sqrt(s2) * jax.random.normal(key, m.shape, m.dtype))

    def _cdf(self, y, eta, disp, psi, trials):
        m, s2 = self._log_params(eta, disp)
        pos = y > 0
        val = ndtr((jnp.log(jnp.where(pos, y, 1.0)) - m) / jnp.sqrt(s2))
        return jnp.where(pos, val, 0.0)

    def _check_support(self, y, trials):
        require_positive(y, self.name)
