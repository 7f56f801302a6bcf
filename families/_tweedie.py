"""Tweedie (compound Poisson-gamma) family, 1 < p < 2 (glmmTMB's ``tweedie``)."""

from __future__ import annotations

from typing import ClassVar, final

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, gammainc, gammaln, polygamma

from ._base import Family, _bad
from ._math import lgamma_diff
from ._series import accumulate, monomials, per_obs, step_and_min, taylor_polynomial

_ORDER = 3  # derivatives of log W (in phi and p) exact to order 3 (see _terms)
assert monomials(2, _ORDER) == [(0, 1), (1, 0), (0, 2), (1, 1), (2, 0), (0, 3), (1, 2), (2, 1), (3, 0)]


def _log_term(d, theta, data):
    """``log W_j - log W_c`` with ``theta = (z, s)``, ``j = c + d``:
    ``log W_j = j z - lgamma(j + 1) - lgamma(j s)``."""
    z, s = theta[0], theta[1]
    c = data[2]
    return z * d - lgamma_diff(c + 1.0, d) - lgamma_diff(s * c, s * d)


def _terms(d, theta, data):
    """Taylor coefficients of ``exp(log_term(theta + tau) - log_term(theta))`` at 0,
    in ``monomials(2, 3)`` order: (0,1), (1,0), (0,2), (1,1), (2,0), (0,3), (1,2), (2,1), (3,0)
    (first exponent: ``z``, second: ``s``).

    ``z`` enters linearly (factor ``exp(tau_z d)``); in ``s`` the exponent's
    derivatives are ``f_k = -(j^k psi^(k-1)(s j) - c^k psi^(k-1)(s c))``.
    """
    s = theta[1]
    c = data[2]
    j = c + d
    f1 = -(j * digamma(s * j) - c * digamma(s * c))
    f2 = -(j * j * polygamma(1, s * j) - c * c * polygamma(1, s * c))
    f3 = -(j**3 * polygamma(2, s * j) - c**3 * polygamma(2, s * c))
    h_s = f1
    h_ss = f2 + f1 * f1
    h_sss = f3 + 3.0 * f1 * f2 + f1**3
    return jnp.stack([h_s, d, h_ss, d * h_s, d * d, h_sss, d * h_ss, d * d * h_s, d**3])


def tweedie_log_prob(y, log_mu, log_phi, p):
    """Per-observation (scalar) Tweedie log density (Dunn & Smyth 2005 series).

    ``y = 0``: ``-mu^(2-p) / (phi (2-p))``. ``y > 0``: ``log W(y, phi, p) - log y
    - y mu^(1-p) / (phi (p-1)) - mu^(2-p) / (phi (2-p))`` with
    ``W = sum_{j>=1} W_j``, ``log W_j = j z - lgamma(j+1) - lgamma(j s)``,
    ``s = (2-p)/(p-1)``, ``z = s log y - s log(p-1) - (1+s) log phi - log(2-p)``.
    """
    positive = y > 0
    log_y = jnp.log(jnp.where(positive, y, 1.0))
    s = (2.0 - p) / (p - 1.0)
    z = s * log_y - s * jnp.log(p - 1.0) - (1.0 + s) * log_phi - jnp.log(2.0 - p)
    # Largest term near j = y^(2-p) / (phi (2-p)); spread sqrt(j / (1 + s)).
    log_jmax = jax.lax.stop_gradient((2.0 - p) * log_y - log_phi - jnp.log(2.0 - p))
    c = jnp.maximum(jnp.round(jnp.exp(jnp.minimum(log_jmax, 690.0))), 1.0)
    sd = jnp.sqrt(c / (1.0 + jax.lax.stop_gradient(s)))
    step, d_min = step_and_min(c, sd, 1.0)
    theta = jnp.stack([z, s])
    data = (step, d_min, c)
    log_s0, coefs = accumulate(_log_term, _terms, jax.lax.stop_gradient(theta), data)
    log_s = taylor_polynomial(log_s0, coefs, theta, _ORDER)(theta)
    log_w = c * z - gammaln(c + 1.0) - gammaln(s * c) + log_s
    zero_part = -jnp.exp((2.0 - p) * log_mu - log_phi) / (2.0 - p)
    pos_part = log_w - log_y - y * jnp.exp((1.0 - p) * log_mu - log_phi) / (p - 1.0) + zero_part
    return jnp.where(positive, pos_part, zero_part)


def _poisson_term(d, theta, data):
    c = data[2]
    return d * theta[0] - lgamma_diff(c + 1.0, d)


def _gamma_cdf_term(d, theta, data):
    j = data[2] + d
    shape, x = data[3], data[4]
    val = gammainc(jnp.where(j > 0, j * shape, 1.0), x)
    return jnp.stack([jnp.where(j > 0, val, 1.0)])


def _tweedie_cdf(y, log_mu, log_phi, p):
    """``P(Y <= y) = sum_j Pois(j; lambda) P(Gamma(j s, gamma) <= y)``."""
    log_lam = (2.0 - p) * log_mu - log_phi - jnp.log(2.0 - p)
    shape = (2.0 - p) / (p - 1.0)
    scale = jnp.exp(log_phi + (p - 1.0) * log_mu) * (p - 1.0)
    lam = jnp.exp(log_lam)
    c = jnp.floor(lam)
    step, d_min = step_and_min(c, jnp.sqrt(jnp.maximum(lam, 1.0)), 0.0)
    data = (jnp.ones_like(step), d_min, c, shape, jnp.maximum(y, 0.0) / scale)
    val = accumulate(_poisson_term, _gamma_cdf_term, jnp.stack([log_lam]), data)[1][0]
    return jnp.where(y < 0, 0.0, jnp.clip(val, 0.0, 1.0))


@final
class Tweedie(Family):
    """Tweedie compound Poisson-gamma response with ``1 < p < 2``: mass at 0, density on (0, inf).

    ``Y = sum_{i <= N} G_i``, ``N ~ Poisson(lambda)``, ``G_i ~ Gamma(shape =
    (2-p)/(p-1), scale = phi (p-1) mu^(p-1))``, ``lambda = mu^(2-p) / (phi (2-p))``;
    ``E = mu``, ``Var = phi * mu^p``. Density by the Dunn & Smyth series
    (TMB's ``dtweedie``), summed to relative 1e-20 for any parameters.

    Dispersion: ``disp = log(phi)``, ``sigma() = phi``.
    ``psi[0]``: power ``p = 1 + plogis(psi[0])`` (glmmTMB's transform;
    ``family_params`` reports ``p``). Derivatives in ``disp`` and ``psi`` are
    exact to order 3 (ample for the Laplace approximation, where only ``eta``
    carries random effects and enters in closed form).

    glmmTMB: ``tweedie(link = "log")``.
    """

    name: ClassVar[str] = "tweedie"
    has_disp: ClassVar[bool] = True
    n_psi: ClassVar[int] = 1
    psi_start: ClassVar[tuple[float, ...]] = (0.0,)
    nonnegative: ClassVar[bool] = True
    default_link: ClassVar[str] = "log"
    allowed_links: ClassVar[tuple[str, ...]] = ("log", "identity", "sqrt", "inverse")

    @staticmethod
    def power(psi):
        """``p = 1 + plogis(psi[0])``."""
        return 1.0 + jax.nn.sigmoid(psi[0])

    def _log_prob(self, y, eta, disp, psi, trials):
        return per_obs(tweedie_log_prob, y, self.link.log_inverse(eta), disp, self.power(psi))

    def _log_prob_zero(self, eta, disp, psi, trials):
        p = self.power(psi)
        return -jnp.exp((2.0 - p) * self.link.log_inverse(eta) - disp) / (2.0 - p)

    def _variance(self, eta, disp, psi, trials):
        p = self.power(psi)
        return jnp.exp(disp + p * self.link.log_inverse(eta))

    def _cdf(self, y, eta, disp, psi, trials):
        return per_obs(_tweedie_cdf, y, self.link.log_inverse(eta), disp, self.power(psi))

    def _sample(self, key, eta, disp, psi, trials):
        p = self.power(psi)
        log_mu = self.link.log_inverse(eta)
        shape = jnp.broadcast_shapes(log_mu.shape, disp.shape)
        lam = jnp.broadcast_to(jnp.exp((2.0 - p) * log_mu - disp) / (2.0 - p), shape)
        scale = jnp.exp(disp + (p - 1.0) * log_mu) * (p - 1.0)
        k1, k2 = jax.random.split(key)
        n = jax.random.poisson(k1, lam, shape).astype(lam.dtype)
        g = jax.random.gamma(k2, jnp.maximum(n, 1.0) * (2.0 - p) / (p - 1.0), shape, lam.dtype)
        return jnp.where(n > 0, g * scale, 0.0)

    def _check_support(self, y, trials):
        _bad(y, y < 0, self.name, "non-negative responses", "The Tweedie family models y >= 0.")
