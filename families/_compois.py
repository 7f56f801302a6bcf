"""Conway-Maxwell-Poisson family, mean parameterization (Huang 2017; glmmTMB's ``compois``)."""

from __future__ import annotations

from typing import ClassVar, final

import jax
import jax.numpy as jnp

from . import _discrete
from ._base import Family, require_counts
from ._math import lgamma_diff
from ._series import accumulate, monomials, per_obs, step_and_min, taylor_polynomial, taylor_terms

# Series in the natural parameters theta = (a, nu), a = log(lambda):
# term_j = exp(a j - nu lgamma(j + 1)), written relative to the centre c = floor(m),
# m = lambda^(1/nu) (the mode), j = c + d; data = (step, d_min, c).
_ORDER = 5  # derivatives of log Z exact to order 5 -> log_prob exact to order 4
_EXPS = monomials(2, _ORDER)
_D1, _D2 = _EXPS.index((1, 0)), _EXPS.index((2, 0))
def _log_term(d, theta, data):
    return theta[0] * d - theta[1] * lgamma_diff(data[2] + 1.0, d)


def _stats(d, data):
    return jnp.stack([d, -lgamma_diff(data[2] + 1.0, d)])


_TERMS = taylor_terms(2, _ORDER, stats=_stats)


def _data(log_m, nu):
    m = jnp.exp(jnp.minimum(log_m, 700.0))
    c = jnp.floor(m)
    sd = jnp.sqrt(jnp.maximum(m, 1.0) / nu)
    step, d_min = step_and_min(c, sd, 0.0)
    return step, d_min, c


def _series_at(log_m, nu):
    """One pass of the series at mode parameter ``exp(log_m)``: ``(data, log S, moments)``."""
    data = _data(log_m, nu)
    log_s, moments = accumulate(_log_term, _TERMS, jnp.stack([nu * log_m, nu]), data)
    return data, log_s, moments


def _newton_steps(poly, c, a, nu, log_mean, n_steps, max_step=None):
    """Newton steps for ``log E[Y](a, nu) = log_mean`` on the Taylor polynomial of ``log Z``.

    ``E[Y] = c + dlogS/da`` and ``dE[Y]/da = Var`` come from the polynomial, so
    these steps cost no series evaluation and carry derivatives in ``nu`` and
    ``log_mean``.
    """
    for _ in range(n_steps):
        big_p, p_a, p_aa = poly.first_partials(jnp.stack([a, nu]))
        e1 = p_a / big_p
        mean = c + e1
        step = (jnp.log(mean) - log_mean) * mean / (p_aa / big_p - e1 * e1)
        if max_step is not None:
            step = jnp.clip(jnp.where(jnp.isfinite(step), step, 0.0), -max_step, max_step)
        a = a - step
    return a


def _solve(log_mean, nu):
    """Expansion point for ``E[Y] = exp(log_mean)`` (no gradient): ``(log_m, log S, moments)``.

    Each iteration sums the series once at ``log_m`` (log S and the moments of
    order <= 4) and jumps by Newton's method on that Taylor polynomial; the
    jump's error is O(distance^4), so two or three series evaluations bring the
    point within 1e-9 of the solution. ``_natural`` finishes on the polynomial.
    """
    mean = jnp.exp(log_mean)
    shifted = mean + (nu - 1.0) / (2.0 * nu)
    x0 = jnp.where(shifted > 1.0, jnp.log(jnp.maximum(shifted, 1.0)), log_mean / nu)
    n_mom = len(_EXPS)

    def jump(x):
        data, log_s, mom = _series_at(x, nu)
        poly = taylor_polynomial(log_s, mom, jnp.stack([nu * x, nu]), _ORDER)
        a = _newton_steps(poly, data[2], nu * x, nu, log_mean, 4, max_step=0.5 * nu)
        return a / nu, log_s, mom

    def cond(s):
        i, x, x_next = s[:3]
        far = ~(jnp.abs(x_next - x) <= 1e-9 * (1.0 + jnp.abs(x)))
        return (i == 0) | ((i < 100) & far)

    init = (jnp.zeros((), jnp.int32), x0, x0, jnp.zeros(()), jnp.zeros(n_mom))
    # Carry (i, point of the current moments, next point, log S, moments).
    def loop_body(s):
        i, _, x, _, _ = s
        x_next, log_s, mom = jump(x)
        return i + 1, x, x_next, log_s, mom

    _, x, _, log_s, mom = jax.lax.while_loop(cond, loop_body, init)
    return x, log_s, mom


def _expansion(log_mean, nu):
    """``(a, c, poly)``: ``lambda = exp(a)`` solves ``E[Y] = exp(log_mean)``; ``poly`` is
    the Taylor polynomial of ``log S`` in ``(a, nu)``. Derivatives in
    ``(log_mean, nu)`` come from three Newton steps on the polynomial, started
    within 1e-9 of the root (exact to order 4, with the order-5 polynomial)."""
    lm0, nu0 = jax.lax.stop_gradient(log_mean), jax.lax.stop_gradient(nu)
    x0, log_s0, moments = _solve(lm0, nu0)
    c = _data(x0, nu0)[2]
    poly = taylor_polynomial(log_s0, moments, jnp.stack([nu0 * x0, nu0]), _ORDER)
    return _newton_steps(poly, c, nu0 * x0, nu, log_mean, 3), c, poly


def _variance_at(poly, a, nu):
    big_p, p_a, p_aa = poly.first_partials(jnp.stack([a, nu]))
    return p_aa / big_p - (p_a / big_p) ** 2


def pmf_params(log_mean, nu):
    """Per observation (scalar): ``(a, c, log S, Var)`` for the COM-Poisson with mean
    ``exp(log_mean)``, where ``log P(y) = a (y - c) - nu (lgamma(y + 1) -
    lgamma(c + 1)) - log S``. One kernel serves every method (one compilation)."""
    a, c, poly = _expansion(log_mean, nu)
    return a, c, poly(jnp.stack([a, nu])), _variance_at(poly, a, nu)


def _log_pmf(k, a, nu, c, log_s):
    return a * (k - c) - nu * lgamma_diff(c + 1.0, k - c, k + 1.0) - log_s


@final
class ConwayMaxwellPoisson(Family):
    """Conway-Maxwell-Poisson counts parameterized by their exact mean (Huang 2017).

    ``P(y) = lambda^y / (y!)^nu / Z(lambda, nu)``, ``Z = sum_j lambda^j / (j!)^nu``,
    with ``lambda`` chosen so that ``E[y] = mu`` (TMB's ``dcompois2``).
    ``nu = 1`` is Poisson; ``nu < 1`` over-, ``nu > 1`` underdispersion.

    Dispersion: ``disp = log(phi)``, ``nu = 1 / phi`` (glmmTMB), ``sigma() = phi``.
    ``Var`` has no closed form; it is the second cumulant (as glmmTMB's
    ``compois_calc_var``).

    Numerics: ``Z`` and the moments are summed to relative 1e-20 by a while
    loop (see ``_series``), for any ``mu`` and ``nu``; TMB switches to a
    Laplace approximation when ``mode > 100`` and ``mode * nu > 200`` (exact
    for ``nu = 1``, close otherwise). ``lambda`` is found by Newton's method;
    derivatives in ``eta`` and ``disp`` (exact to order 4: the Laplace
    approximation's third derivatives and one more for Hessians of its
    gradient) come from a fifth-order Taylor expansion of ``log Z`` (see
    ``_series``); higher orders are those of the truncated polynomial.

    glmmTMB: ``compois(link = "log")``.
    """

    name: ClassVar[str] = "compois"
    has_disp: ClassVar[bool] = True
    discrete: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True
    default_link: ClassVar[str] = "log"
    allowed_links: ClassVar[tuple[str, ...]] = ("log", "identity", "sqrt")

    def _params(self, eta, disp):
        """``(a, nu, c, log S, Var)`` per observation."""
        nu = jnp.exp(-disp)
        a, c, log_s, var = per_obs(pmf_params, self.link.log_inverse(eta), nu)
        return a, jnp.broadcast_to(nu, a.shape), c, log_s, var

    def _log_prob(self, y, eta, disp, psi, trials):
        return _log_pmf(y, *self._params(eta, disp)[:4])

    def _log_prob_and_zero(self, y, eta, disp, psi, trials):
        a, nu, c, log_s, _ = self._params(eta, disp)
        return _log_pmf(y, a, nu, c, log_s), _log_pmf(jnp.zeros_like(a), a, nu, c, log_s)

    def _log_prob_zero(self, eta, disp, psi, trials):
        a, nu, c, log_s, _ = self._params(eta, disp)
        return _log_pmf(jnp.zeros_like(a), a, nu, c, log_s)

    def _variance(self, eta, disp, psi, trials):
        return self._params(eta, disp)[4]

    def _parts(self, eta, disp):
        *params, var = self._params(eta, disp)
        return _discrete.lower_start(self.link.inverse(eta), var), tuple(params)

    def _cdf(self, y, eta, disp, psi, trials):
        lo, params = self._parts(eta, disp)
        return _discrete.cdf(_log_pmf, y, lo, *params)

    def _quantile(self, u, eta, disp, psi, trials):
        lo, params = self._parts(eta, disp)
        return _discrete.quantile(_log_pmf, u, lo, *params)

    def _check_support(self, y, trials):
        require_counts(y, self.name)
