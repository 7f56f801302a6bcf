"""Poisson family."""

from __future__ import annotations

from typing import ClassVar, final

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaincc

from . import _discrete
from ._base import Family, require_counts
from ._math import lfactorial, xlogy


def _poisson_log_pmf(k, log_mu, mu):
    return k * log_mu - mu - lfactorial(k)


@final
class Poisson(Family):
    """Poisson counts: ``P(y) = mu^y exp(-mu) / y!``, ``Var = mu``.

    Computed as ``y * log(mu) - mu - lgamma(y + 1)`` with ``log(mu)`` taken
    from the link (exactly ``eta`` for the log link). No dispersion
    (``sigma() = 1``). glmmTMB: ``poisson(link = "log")``.
    """

    name: ClassVar[str] = "poisson"
    discrete: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True
    default_link: ClassVar[str] = "log"
    allowed_links: ClassVar[tuple[str, ...]] = ("log", "identity", "sqrt")

    def _log_kernel(self, y, eta, disp, psi, trials):
        log_mu = self.link.log_inverse(eta)
        y_pos = y > 0
        term = jnp.where(y_pos, y * jnp.where(y_pos, log_mu, 0.0), 0.0)
        return term - self.link.inverse(eta)

    def _log_norm(self, y, trials):
        return -lfactorial(y)

    def _log_prob_zero(self, eta, disp, psi, trials):
        return -self.link.inverse(eta)

    def _variance(self, eta, disp, psi, trials):
        return self.link.inverse(eta)

    def _sample(self, key, eta, disp, psi, trials):
        mu = self.link.inverse(eta)
        return jax.random.poisson(key, mu, mu.shape).astype(mu.dtype)

    def _quantile(self, u, eta, disp, psi, trials):
        mu = self.link.inverse(eta)
        return _discrete.quantile(_poisson_log_pmf, u, _discrete.lower_start(mu, mu), jnp.log(mu), mu)

    def _cdf(self, y, eta, disp, psi, trials):
        k = jnp.floor(y)
        mu = self.link.inverse(eta)
        return jnp.where(k < 0, 0.0, gammaincc(jnp.maximum(k, 0.0) + 1.0, mu))

    def _deviance_residuals(self, y, eta, disp, psi, trials):
        mu = self.link.inverse(eta)
        dev = 2.0 * (xlogy(y, y / mu) - (y - mu))
        return jnp.sign(y - mu) * jnp.sqrt(jnp.maximum(dev, 0.0))

    def _check_support(self, y, trials):
        require_counts(y, self.name)
