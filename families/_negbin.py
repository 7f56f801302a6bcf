"""Negative binomial families: nbinom2 (quadratic), nbinom1 (linear), nbinom12 (both).

All three share TMB's ``dnbinom_robust(y, log_mu, log_var_minus_mu)``:
``logit(p) = log(mu) - log(Var - mu)``, ``size = mu * p / (1 - p)``, and
``log P(y) = size log p + lgamma(size + y) - lgamma(size) - lgamma(y + 1)
+ y log(1 - p)`` evaluated with ``log p = -log1p(exp(-logit p))``. The
``lgamma`` difference is taken without cancellation (``lgamma_diff``), so a
huge ``size`` (nbinom2 with ``theta -> inf``) gives the Poisson limit instead of
rounding noise.
"""

from __future__ import annotations

import abc
from typing import ClassVar, final

import jax
import jax.numpy as jnp
from jax.scipy.special import betainc

from . import _discrete
from ._base import Family, require_counts
from ._math import lfactorial, lgamma_ratio, log_sigmoid, xlogy


def nbinom_log_prob(y, log_mu, log_var_minus_mu):
    """TMB's ``dnbinom_robust(y, log_mu, log_var_minus_mu, give_log = TRUE)``."""
    return _nbinom_kernel(y, log_mu, log_var_minus_mu) - lfactorial(y)


def _nbinom_kernel(y, log_mu, log_var_minus_mu):
    """`nbinom_log_prob` without its ``-lfactorial(y)``."""
    logit_p = log_mu - log_var_minus_mu
    size = jnp.exp(log_mu + logit_p)
    return size * log_sigmoid(logit_p) + lgamma_ratio(size, y) + y * log_sigmoid(-logit_p)


def _nb_size_logit(log_mu, log_var_minus_mu):
    logit_p = log_mu - log_var_minus_mu
    return jnp.exp(log_mu + logit_p), logit_p


class _NegativeBinomial(Family):
    """Shared machinery; subclasses define ``log(Var - mu)``."""

    has_disp: ClassVar[bool] = True
    discrete: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True
    default_link: ClassVar[str] = "log"
    allowed_links: ClassVar[tuple[str, ...]] = ("log", "identity", "sqrt")

    @abc.abstractmethod
    def _log_excess(self, log_mu, disp, psi):
        """``log(Var - mu)``."""

    def _lm_le(self, eta, disp, psi):
        log_mu = self.link.log_inverse(eta)
        return log_mu, self._log_excess(log_mu, disp, psi)

    def _log_kernel(self, y, eta, disp, psi, trials):
        return _nbinom_kernel(y, *self._lm_le(eta, disp, psi))

    def _log_norm(self, y, trials):
        return -lfactorial(y)

    def _variance(self, eta, disp, psi, trials):
        log_mu, log_excess = self._lm_le(eta, disp, psi)
        return jnp.exp(log_mu) + jnp.exp(log_excess)

    def _sample(self, key, eta, disp, psi, trials):
        size, logit_p = _nb_size_logit(*self._lm_le(eta, disp, psi))
        k1, k2 = jax.random.split(key)
        rate = jax.random.gamma(k1, size, size.shape, size.dtype) * jnp.exp(-logit_p)
        return jax.random.poisson(k2, rate, rate.shape).astype(rate.dtype)

    def _quantile(self, u, eta, disp, psi, trials):
        log_mu, log_excess = self._lm_le(eta, disp, psi)
        lo = _discrete.lower_start(jnp.exp(log_mu), jnp.exp(log_mu) + jnp.exp(log_excess))
        return _discrete.quantile(nbinom_log_prob, u, lo, log_mu, log_excess)

    def _cdf(self, y, eta, disp, psi, trials):
        size, logit_p = _nb_size_logit(*self._lm_le(eta, disp, psi))
        k = jnp.floor(y)
        val = betainc(size, jnp.maximum(k, 0.0) + 1.0, jax.nn.sigmoid(logit_p))
        return jnp.where(k < 0, 0.0, val)

    def _check_support(self, y, trials):
        require_counts(y, self.name)


def _nb2_deviance(y, mu, theta):
    """R/glmmTMB ``nbinom2()$dev.resids`` (unit deviance, ``wt = 1``)."""
    dev = 2.0 * (xlogy(y, jnp.maximum(1.0, y) / mu) - (y + theta) * jnp.log1p((y - mu) / (mu + theta)))
    return jnp.sign(y - mu) * jnp.sqrt(jnp.maximum(dev, 0.0))


@final
class NegativeBinomial2(_NegativeBinomial):
    """Negative binomial, quadratic variance (NB2; Hardin & Hilbe 2007).

    ``P(y) = Gamma(y + theta) / (Gamma(theta) y!) (theta / (theta + mu))^theta
    (mu / (theta + mu))^y``, ``Var = mu * (1 + mu / theta)``.

    Dispersion: ``disp = log(theta)`` (``sigma() = theta``); robust form with
    ``log(Var - mu) = 2 log(mu) - disp`` (glmmTMB.cpp). ``theta -> inf`` is Poisson.

    glmmTMB: ``nbinom2(link = "log")``.
    """

    name: ClassVar[str] = "nbinom2"

    def _log_excess(self, log_mu, disp, psi):
        return 2.0 * log_mu - disp

    def _log_kernel(self, y, eta, disp, psi, trials):
        # dnbinom_robust's value with its size written as exp(disp) (= mu * p / (1 - p)
        # exactly): the size then does not depend on eta, so the derivatives in eta that
        # the Laplace approximation takes (up to third order) skip the lgamma terms
        logit_p = disp - self.link.log_inverse(eta)
        size = jnp.exp(disp)
        return size * log_sigmoid(logit_p) + lgamma_ratio(size, y) + y * log_sigmoid(-logit_p)

    def _deviance_residuals(self, y, eta, disp, psi, trials):
        return _nb2_deviance(y, self.link.inverse(eta), jnp.exp(disp))


@final
class NegativeBinomial1(_NegativeBinomial):
    """Negative binomial, linear variance (NB1): ``Var = mu * (1 + phi)``.

    NB with ``size = mu / phi`` and ``p = 1 / (1 + phi)``.
    Dispersion: ``disp = log(phi)`` (``sigma() = phi``); robust form with
    ``log(Var - mu) = log(mu) + disp`` (glmmTMB.cpp).

    glmmTMB: ``nbinom1(link = "log")``.
    """

    name: ClassVar[str] = "nbinom1"

    def _log_excess(self, log_mu, disp, psi):
        return log_mu + disp

    def _deviance_residuals(self, y, eta, disp, psi, trials):
        # glmmTMB >= 1.1.8: theta = mu / phi in the nbinom2 expression.
        mu = self.link.inverse(eta)
        return _nb2_deviance(y, mu, mu / jnp.exp(disp))


@final
class NegativeBinomial12(_NegativeBinomial):
    """Negative binomial with linear and quadratic variance terms (glmmTMB >= 1.1.9):
    ``Var = mu * (1 + phi + mu / theta)``.

    Dispersion: ``disp = log(phi)`` (``sigma() = phi``); ``psi[0] = log(theta)``.
    Robust form ``log(Var - mu) = log(mu) + logspace_add(disp, log(mu) - psi[0])``
    (glmmTMB.cpp). Not part of glmmTMB 1.1.5.

    glmmTMB: ``nbinom12(link = "log")``.
    """

    name: ClassVar[str] = "nbinom12"
    n_psi: ClassVar[int] = 1
    psi_start: ClassVar[tuple[float, ...]] = (0.0,)

    def _log_excess(self, log_mu, disp, psi):
        return log_mu + jnp.logaddexp(disp, log_mu - psi[0])
