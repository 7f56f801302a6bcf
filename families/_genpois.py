"""Generalized Poisson family (Consul & Famoye 1992; glmmTMB's ``genpois``)."""

from __future__ import annotations

from typing import ClassVar, final

import jax.numpy as jnp

from . import _discrete
from ._base import Family, require_counts
from ._math import lfactorial


def genpois_log_prob(y, log_mu, disp, lfact=None):
    """``log dgenpois(y, theta, lambda)`` with ``theta = mu / sqrt(phi)``,
    ``lambda = 1 - 1 / sqrt(phi)``, ``phi = exp(disp)``:
    ``log theta + (y - 1) log(theta + lambda y) - theta - lambda y - lgamma(y + 1)``.

    ``-inf`` where ``theta + lambda y <= 0`` (possible when ``phi < 1``).
    ``lfact``: the ``lgamma(y + 1)`` to use, if known (0 for the family's kernel).
    """
    inv_sqrt_phi = jnp.exp(-0.5 * disp)
    log_theta = log_mu - 0.5 * disp
    theta = jnp.exp(log_theta)
    lam = 1.0 - inv_sqrt_phi
    arg = theta + lam * y
    ok = arg > 0
    # (y - 1) log(theta + lambda y) + log(theta), written so y = 0 is exact:
    log_arg = jnp.log(jnp.where(ok, arg, 1.0))
    core = jnp.where(y == 0, 0.0, log_theta + (y - 1.0) * log_arg)
    val = core - theta - lam * y - (lfactorial(y) if lfact is None else lfact)
    return jnp.where(ok | (y == 0), val, -jnp.inf)


@final
class GeneralizedPoisson(Family):
    """Generalized Poisson counts with mean ``mu`` and ``Var = mu * phi``.

    ``P(y) = theta (theta + lambda y)^(y - 1) exp(-theta - lambda y) / y!`` with
    ``theta = mu / sqrt(phi)``, ``lambda = 1 - 1 / sqrt(phi)`` (glmmTMB.cpp,
    after HMMpa). ``phi > 1`` is overdispersion, ``phi < 1`` underdispersion
    (then the support is cut where ``theta + lambda y <= 0`` and, as in
    glmmTMB, the masses need not sum exactly to 1).

    Dispersion: ``disp = log(phi)``, ``sigma() = phi``.

    glmmTMB: ``genpois(link = "log")``.
    """

    name: ClassVar[str] = "genpois"
    has_disp: ClassVar[bool] = True
    discrete: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True
    default_link: ClassVar[str] = "log"
    allowed_links: ClassVar[tuple[str, ...]] = ("log", "identity", "sqrt")

    def _log_kernel(self, y, eta, disp, psi, trials):
        return genpois_log_prob(y, self.link.log_inverse(eta), disp, lfact=0.0)

    def _log_norm(self, y, trials):
        return -lfactorial(y)

    def _log_prob_zero(self, eta, disp, psi, trials):
        return -self.link.inverse(eta) * jnp.exp(-0.5 * disp)

    def _variance(self, eta, disp, psi, trials):
        return self.link.inverse(eta) * jnp.exp(disp)

    def _lo(self, eta, disp):
        return _discrete.lower_start(self.link.inverse(eta), self._variance(eta, disp, None, None))

    def _cdf(self, y, eta, disp, psi, trials):
        log_mu = self.link.log_inverse(eta)
        return _discrete.cdf(genpois_log_prob, y, self._lo(eta, disp), log_mu, disp)

    def _quantile(self, u, eta, disp, psi, trials):
        log_mu = self.link.log_inverse(eta)
        return _discrete.quantile(genpois_log_prob, u, self._lo(eta, disp), log_mu, disp)

    def _check_support(self, y, trials):
        require_counts(y, self.name)
