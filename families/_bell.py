"""Bell family (Castellares et al. 2018; glmmTMB's ``bell``)."""

from __future__ import annotations

import functools
from typing import ClassVar, final

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln
from scipy import special

from . import _discrete
from ._base import Family, require_counts
from ._math import lfactorial, lgamma_diff
from ._series import accumulate, per_obs, step_and_min


@jax.custom_jvp
def lambertw_of_log(log_x):
    """Principal Lambert W of ``x = exp(log_x)`` (``W exp(W) = x``), for ``x > 0``.

    Newton on ``w + log(w) = log_x`` from below (monotone convergence), so huge
    ``x`` (``log_x = 50``) never forms ``exp(log_x)``. ``dW / dlog_x = W / (1 + W)``.
    """
    x_small = jnp.exp(jnp.minimum(log_x, 1.0))
    w0 = jnp.where(log_x > 1.0, log_x - jnp.log(jnp.maximum(log_x, 1.0)), x_small / (1.0 + x_small))

    def step(_, w):
        w = jnp.maximum(w, 1e-300)
        return w - (w + jnp.log(w) - log_x) * w / (1.0 + w)

    return jax.lax.fori_loop(0, 60, step, w0)


@lambertw_of_log.defjvp
def _lambertw_jvp(primals, tangents):
    w = lambertw_of_log(primals[0])
    return w, w / (1.0 + w) * tangents[0]


def _bell_term(d, theta, data):
    c, y = data[2], data[3]
    return y * jnp.log1p(d / c) - lgamma_diff(c + 1.0, d)


def log_bell_number(y):
    """``log B_y`` (Bell number) by Dobinski's formula ``B_y = e^-1 sum_k k^y / k!``,
    summed to full precision for any ``y`` (glmmTMB's table overflows past y ~ 218).
    Scalar; no derivatives (``y`` is data)."""
    y = jax.lax.stop_gradient(y)
    ys = jnp.maximum(y, 1.0)
    c = jnp.maximum(jnp.round(ys / lambertw_of_log(jnp.log(ys))), 1.0)
    sd = 1.0 / jnp.sqrt(ys / (c * c) + 1.0 / c)
    step, d_min = step_and_min(c, sd, 1.0)
    log_s = accumulate(_bell_term, None, jnp.zeros((1,)), (step, d_min, c, ys))[0]
    val = -1.0 + ys * jnp.log(c) - gammaln(c + 1.0) + log_s
    return jnp.where(y > 0, val, 0.0)


_TABLE_SIZE = 2048


@functools.cache
def _log_bell_table() -> np.ndarray:
    """``log B_n``, ``n < 2048``, by Dobinski's formula in NumPy (for cdf and sampling)."""
    n = np.arange(_TABLE_SIZE, dtype=float)[:, None]
    k = np.arange(1, 4 * _TABLE_SIZE, dtype=float)[None, :]
    table = np.empty(_TABLE_SIZE)
    for rows in np.array_split(np.arange(_TABLE_SIZE), 16):
        terms = n[rows] * np.log(k) - special.gammaln(k + 1.0)
        table[rows] = special.logsumexp(terms, axis=1) - 1.0
    table[0] = 0.0
    return table


def _bell_log_pmf(k, log_theta, theta):
    """Bell log mass for ``k < 2048`` (table), ``-inf`` beyond (cdf and sampling only)."""
    inside = k < _TABLE_SIZE
    idx = jnp.where(inside, k, 0.0).astype(jnp.int32)
    log_b = jnp.asarray(_log_bell_table())[idx]
    val = k * log_theta - jnp.expm1(theta) + log_b - lfactorial(k)
    return jnp.where(inside, val, -jnp.inf)


@final
class Bell(Family):
    """Bell counts: ``P(y) = theta^y exp(1 - e^theta) B_y / y!`` (``B_y``: Bell numbers).

    Mean ``mu = theta e^theta`` (so ``theta = W(mu)``, Lambert W),
    ``Var = mu (1 + W(mu))``. No dispersion (``sigma() = 1``). ``log_prob``
    sums Dobinski's series for ``B_y`` (any ``y``); ``cdf`` and ``sample`` use a
    table of ``B_y`` for ``y < 2048`` (means up to several hundred).
    Not part of glmmTMB 1.1.5 (added in 1.1.10).

    glmmTMB: ``bell(link = "log")``.
    """

    name: ClassVar[str] = "bell"
    discrete: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True
    default_link: ClassVar[str] = "log"
    allowed_links: ClassVar[tuple[str, ...]] = ("log", "identity", "sqrt")

    def _theta(self, eta):
        w = lambertw_of_log(self.link.log_inverse(eta))
        return jnp.log(w), w

    def _log_kernel(self, y, eta, disp, psi, trials):
        log_theta, theta = self._theta(eta)
        return jnp.where(y > 0, y * log_theta, 0.0) - jnp.expm1(theta)

    def _log_norm(self, y, trials):
        return per_obs(log_bell_number, y) - lfactorial(y)

    def _log_prob_zero(self, eta, disp, psi, trials):
        return -jnp.expm1(self._theta(eta)[1])

    def _variance(self, eta, disp, psi, trials):
        return self.link.inverse(eta) * (1.0 + self._theta(eta)[1])

    def _parts(self, eta):
        log_theta, theta = self._theta(eta)
        lo = _discrete.lower_start(self.link.inverse(eta), self._variance(eta, None, None, None))
        return lo, (log_theta, theta)

    def _cdf(self, y, eta, disp, psi, trials):
        lo, params = self._parts(eta)
        return _discrete.cdf(_bell_log_pmf, y, lo, *params)

    def _quantile(self, u, eta, disp, psi, trials):
        lo, params = self._parts(eta)
        return _discrete.quantile(_bell_log_pmf, u, lo, *params)

    def _check_support(self, y, trials):
        require_counts(y, self.name)
