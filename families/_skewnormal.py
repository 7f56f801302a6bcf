"""Skew-normal family parameterized by mean and sd (glmmTMB >= 1.1.8's ``skewnormal``)."""

from __future__ import annotations

import math
from typing import ClassVar, final

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr, owens_t

from ._base import Family
from ._math import LOG_2PI

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _direct_params(mu, sigma, alpha):
    """``(xi, omega, delta)`` of Azzalini's SN(xi, omega, alpha) with mean ``mu`` and sd ``sigma``."""
    delta = alpha / jnp.sqrt(1.0 + alpha * alpha)
    omega = sigma / jnp.sqrt(1.0 - 2.0 / math.pi * delta * delta)
    xi = mu - omega * delta * _SQRT_2_OVER_PI
    return xi, omega, delta


@final
class SkewNormal(Family):
    """Skew-normal response with mean ``mu``, sd ``sigma`` and shape ``alpha``.

    Azzalini's density ``f = 2 / omega phi(z) Phi(alpha z)``, ``z = (y - xi) / omega``,
    with ``delta = alpha / sqrt(1 + alpha^2)``, ``omega = sigma / sqrt(1 - 2 delta^2 / pi)``,
    ``xi = mu - omega delta sqrt(2 / pi)`` so that ``E = mu`` and ``Var = sigma^2``.
    ``log Phi`` is evaluated with ``log_ndtr`` (glmmTMB's ``log(pnorm())`` underflows).

    Dispersion: ``disp = log(sigma)`` (the sd), ``sigma() = exp(disp)``.
    ``psi[0] = alpha`` untransformed (glmmTMB's ``family_params``: "Skewnormal shape").
    Not part of glmmTMB 1.1.5.

    glmmTMB: ``skewnormal(link = "identity")``.
    """

    name: ClassVar[str] = "skewnormal"
    has_disp: ClassVar[bool] = True
    n_psi: ClassVar[int] = 1
    psi_start: ClassVar[tuple[float, ...]] = (0.0,)
    default_link: ClassVar[str] = "identity"
    allowed_links: ClassVar[tuple[str, ...]] = ("identity", "log", "inverse")

    def _z(self, y, eta, disp, psi):
        xi, omega, _ = _direct_params(self.link.inverse(eta), jnp.exp(disp), psi[0])
        return (y - xi) / omega, omega

    def _log_prob(self, y, eta, disp, psi, trials):
        z, omega = self._z(y, eta, disp, psi)
        return math.log(2.0) - jnp.log(omega) - 0.5 * z * z - 0.5 * LOG_2PI + log_ndtr(psi[0] * z)

    def _variance(self, eta, disp, psi, trials):
        return jnp.broadcast_to(jnp.exp(2.0 * disp), jnp.broadcast_shapes(jnp.shape(eta), jnp.shape(disp)))

    def _sample(self, key, eta, disp, psi, trials):
        xi, omega, delta = _direct_params(self.link.inverse(eta), jnp.exp(disp), psi[0])
        shape = jnp.broadcast_shapes(xi.shape, omega.shape)
        k1, k2 = jax.random.split(key)
        u0 = jnp.abs(jax.random.normal(k1, shape, xi.dtype))
        u1 = jax.random.normal(k2, shape, xi.dtype)
        return xi + omega * (delta * u0 + jnp.sqrt(1.0 - delta * delta) * u1)

    def _cdf(self, y, eta, disp, psi, trials):
        z, _ = self._z(y, eta, disp, psi)
        return jnp.clip(ndtr(z) - 2.0 * owens_t(z, psi[0]), 0.0, 1.0)
