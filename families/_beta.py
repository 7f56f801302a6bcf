"""Beta family (Ferrari & Cribari-Neto 2004; glmmTMB's ``beta_family``)."""

from __future__ import annotations

from typing import ClassVar, final

import jax
import jax.numpy as jnp
from jax.scipy.special import betainc

from ._base import Family, require_unit_interval
from ._math import logspace_gamma


def beta_log_density(y, log_a, log_b):
    """``log dbeta(y, a, b)`` from ``log a``, ``log b``."""
    a, b = jnp.exp(log_a), jnp.exp(log_b)
    return (
        logspace_gamma(jnp.logaddexp(log_a, log_b))
        - logspace_gamma(log_a)
        - logspace_gamma(log_b)
        + (a - 1.0) * jnp.log(y)
        + (b - 1.0) * jnp.log1p(-y)
    )


@final
class Beta(Family):
    """Beta response on (0, 1): ``y ~ Beta(mu phi, (1 - mu) phi)``.

    Density: ``log f = lgamma(phi) - lgamma(a) - lgamma(b) + (a - 1) log y
    + (b - 1) log(1 - y)``, ``a = mu phi``, ``b = (1 - mu) phi``.

    Dispersion: ``disp = log(phi)`` (precision), ``Var = mu (1 - mu) / (1 + phi)``,
    ``sigma() = phi``. ``log a = log(mu) + disp`` and ``log b = log(1 - mu) + disp``
    come from the link's stable log forms, so ``mu`` near 0 or 1 stays finite.

    glmmTMB: ``beta_family(link = "logit")`` (internal name ``"beta"``).
    """

    name: ClassVar[str] = "beta"
    has_disp: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True
    default_link: ClassVar[str] = "logit"
    allowed_links: ClassVar[tuple[str, ...]] = ("logit", "probit", "cloglog")
    support_point: ClassVar[float] = 0.5

    def _log_ab(self, eta, disp):
        return self.link.log_inverse(eta) + disp, self.link.log1m_inverse(eta) + disp

    def _log_prob(self, y, eta, disp, psi, trials):
        return beta_log_density(y, *self._log_ab(eta, disp))

    def _variance(self, eta, disp, psi, trials):
        mu = self.link.inverse(eta)
        return mu * (1.0 - mu) / (1.0 + jnp.exp(disp))

    def _sample(self, key, eta, disp, psi, trials):
        log_a, log_b = self._log_ab(eta, disp)
        shape = jnp.broadcast_shapes(log_a.shape, log_b.shape)
        return jax.random.beta(key, jnp.exp(log_a), jnp.exp(log_b), shape, log_a.dtype)

    def _cdf(self, y, eta, disp, psi, trials):
        log_a, log_b = self._log_ab(eta, disp)
        return betainc(jnp.exp(log_a), jnp.exp(log_b), jnp.clip(y, 0.0, 1.0))

    def _check_support(self, y, trials):
        require_unit_interval(y, self.name, closed=False)

