"""Student t family with location and scale (glmmTMB's ``t_family``)."""

from __future__ import annotations

from typing import ClassVar, final

import jax
import jax.numpy as jnp
from jax.scipy.special import betainc, gammaln

from ._base import Family

_LOG_PI = 1.1447298858494002


def _t_log_density(z, df):
    return (
        gammaln(0.5 * (df + 1.0))
        - gammaln(0.5 * df)
        - 0.5 * (jnp.log(df) + _LOG_PI)
        - 0.5 * (df + 1.0) * jnp.log1p(z * z / df)
    )


@final
class StudentT(Family):
    """Student t response: ``(y - mu) / sigma ~ t(df)`` (Pearson type VII).

    ``log f = log dt((y - mu) / sigma, df) - log(sigma)``;
    ``Var = sigma^2 df / (df - 2)`` for ``df > 2`` (infinite for ``1 < df <= 2``).

    Dispersion: ``disp = log(sigma)``, the scale (glmmTMB.cpp divides the
    residual by ``phi = exp(disp)``; ``sigma() = exp(disp)``).
    ``psi[0] = log(df)`` (glmmTMB: "fitted with a log link"; ``family_params``
    reports ``exp(psi)``).

    glmmTMB: ``t_family(link = "identity")`` (internal name ``"t"``).
    """

    name: ClassVar[str] = "t"
    has_disp: ClassVar[bool] = True
    n_psi: ClassVar[int] = 1
    psi_start: ClassVar[tuple[float, ...]] = (0.0,)
    default_link: ClassVar[str] = "identity"
    allowed_links: ClassVar[tuple[str, ...]] = ("identity", "log", "inverse")

    def _log_prob(self, y, eta, disp, psi, trials):
        z = (y - self.link.inverse(eta)) * jnp.exp(-disp)
        return _t_log_density(z, jnp.exp(psi[0])) - disp

    def _mean(self, eta, disp, psi, trials):
        mu = self.link.inverse(eta)
        return jnp.where(jnp.exp(psi[0]) > 1.0, mu, jnp.nan)

    def _variance(self, eta, disp, psi, trials):
        df = jnp.exp(psi[0])
        var = jnp.exp(2.0 * disp) * df / jnp.where(df > 2.0, df - 2.0, 1.0)
        var = jnp.where(df > 2.0, var, jnp.where(df > 1.0, jnp.inf, jnp.nan))
        return jnp.broadcast_to(var, jnp.broadcast_shapes(jnp.shape(eta), jnp.shape(disp)))

    def _sample(self, key, eta, disp, psi, trials):
        mu = self.link.inverse(eta)
        shape = jnp.broadcast_shapes(mu.shape, jnp.shape(disp))
        return mu + jnp.exp(disp) * jax.random.t(key, jnp.exp(psi[0]), shape, mu.dtype)

    def _cdf(self, y, eta, disp, psi, trials):
        df = jnp.exp(psi[0])
        z = (y - self.link.inverse(eta)) * jnp.exp(-disp)
        tail = 0.5 * betainc(0.5 * df, 0.5, df / (df + z * z))
        return jnp.where(z > 0, 1.0 - tail, tail)
