"""Gamma family (glmmTMB: dispersion = log shape)."""

from __future__ import annotations

from typing import ClassVar, final

import jax
import jax.numpy as jnp
from jax.scipy.special import gammainc, gammaln

from ._base import Family, require_positive


@final
class Gamma(Family):
    """Gamma response with mean ``mu`` and shape ``k``: ``y ~ Gamma(k, scale = mu / k)``.

    Density: ``log f = (k - 1) log y - y k / mu - lgamma(k) - k log(mu / k)``.

    Dispersion (glmmTMB): ``disp = log(k)`` (shape), ``Var = mu^2 / k``,
    ``sigma() = 1 / sqrt(k) = exp(-disp / 2)`` (the coefficient of variation).
    ``log(mu)`` comes from the link, so the log link never forms ``exp(eta)``.

    Zeros: glmmTMB's ``ziGamma`` is this family under a zero-inflation formula,
    where zeros get probability ``zi`` only (``ZeroInflated(Gamma())`` =
    ``Hurdle(Gamma())``); the registry maps ``"ziGamma"`` here.

    glmmTMB: ``Gamma(link = "inverse")`` (R's default link) or ``ziGamma``.
    """

    name: ClassVar[str] = "Gamma"
    has_disp: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True
    default_link: ClassVar[str] = "inverse"
    allowed_links: ClassVar[tuple[str, ...]] = ("inverse", "log", "identity")

    def _log_prob(self, y, eta, disp, psi, trials):
        log_scale = self.link.log_inverse(eta) - disp
        shape = jnp.exp(disp)
        return (shape - 1.0) * jnp.log(y) - y * jnp.exp(-log_scale) - gammaln(shape) - shape * log_scale

    def _variance(self, eta, disp, psi, trials):
        mu = self.link.inverse(eta)
        return mu * mu * jnp.exp(-disp)

    def _sample(self, key, eta, disp, psi, trials):
        mu = self.link.inverse(eta)
        shape = jnp.exp(disp)
        out_shape = jnp.broadcast_shapes(mu.shape, shape.shape)
        return jax.random.gamma(key, jnp.broadcast_to(shape, out_shape), out_shape, mu.dtype) * mu / shape

    def _cdf(self, y, eta, disp, psi, trials):
        mu = self.link.inverse(eta)
        shape = jnp.exp(disp)
        return gammainc(shape, jnp.maximum(y, 0.0) * shape / mu)

    def _deviance_residuals(self, y, eta, disp, psi, trials):
        mu = self.link.inverse(eta)
        dev = -2.0 * (jnp.log(jnp.where(y == 0, 1.0, y / mu)) - (y - mu) / mu)
        return jnp.sign(y - mu) * jnp.sqrt(jnp.maximum(dev, 0.0))

    def sigma(self, disp, psi=None):
        return jnp.exp(-0.5 * jnp.asarray(disp, dtype=float))

    def _check_support(self, y, trials):
        require_positive(y, self.name)
