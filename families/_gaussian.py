"""Gaussian family, glmmTMB 1.1.5 parameterization (dispersion = log variance)."""

from __future__ import annotations

from typing import ClassVar, final

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from ._base import Family
from ._math import LOG_2PI


@final
class Gaussian(Family):
    """Normal response: ``y ~ N(mu, sigma^2)``.

    Density: ``log f = -(y - mu)^2 / (2 sigma^2) - log(sigma) - log(2 pi) / 2``.

    Dispersion (glmmTMB 1.1.5): ``disp = log(sigma^2)``, so ``Var = exp(disp)``
    and ``sigma() = exp(disp / 2)`` (glmmTMB.cpp: ``dnorm(y, mu, sqrt(phi))``,
    ``sigma.glmmTMB``: ``exp(0.5 * betad)``). glmmTMB >= 1.1.8 switched to
    ``disp = log(sigma)``; this family keeps 1.1.5's convention.

    glmmTMB: ``gaussian(link = "identity")``.
    """

    name: ClassVar[str] = "gaussian"
    has_disp: ClassVar[bool] = True
    default_link: ClassVar[str] = "identity"
    allowed_links: ClassVar[tuple[str, ...]] = ("identity", "log", "inverse")

    def _log_prob(self, y, eta, disp, psi, trials):
        r = y - self.link.inverse(eta)
        return -0.5 * r * r * jnp.exp(-disp) - 0.5 * disp - 0.5 * LOG_2PI

    def _variance(self, eta, disp, psi, trials):
        return jnp.broadcast_to(jnp.exp(disp), jnp.broadcast_shapes(jnp.shape(eta), jnp.shape(disp)))

    def _sample(self, key, eta, disp, psi, trials):
        mu = self.link.inverse(eta)
        shape = jnp.broadcast_shapes(mu.shape, disp.shape)
        return mu + jnp.exp(0.5 * disp) * jax.random.normal(key, shape, mu.dtype)

    def _cdf(self, y, eta, disp, psi, trials):
        return ndtr((y - self.link.inverse(eta)) * jnp.exp(-0.5 * disp))

    def _deviance_residuals(self, y, eta, disp, psi, trials):
        return y - self.link.inverse(eta)

    def sigma(self, disp, psi=None):
        return jnp.exp(0.5 * jnp.asarray(disp, dtype=float))
