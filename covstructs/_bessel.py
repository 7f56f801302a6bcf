"""log K_nu(x): the modified Bessel function of the second kind, for real order.

Why our own: JAX has no K_nu for non-integer order (``jax.scipy.special``
offers only the exponentially scaled I0/I1/K0/K1-type functions), and the
Matérn smoothness nu is an estimated parameter, so we need derivatives in
*both* nu and x. TensorFlow Probability's ``bessel_kve`` gives no gradient in
the order and pulls in TFP; the PyPI package ``logbesselk`` uses the same idea
as below and could replace this module if it becomes a dependency.

Method: the integral representation (DLMF 10.32.9)

    K_nu(x) = int_0^inf exp(g(t)) dt,   g(t) = -x cosh(t) + log cosh(nu t),

evaluated in log space. g rises to one maximum t0 (t0 = 0 when nu^2 <= x,
otherwise the root of x sinh t = nu tanh(nu t), found by bisection), and the
integrand is negligible (below exp(-_LEVEL) of its peak) outside [lo, hi],
also found by bisection. On that interval the trapezoidal rule with _N nodes
converges geometrically (the integrand is analytic and decays double
exponentially; at lo = 0 it is even, so the half-weight end point is exact).
The nodes are held fixed under differentiation (``stop_gradient``): the
derivatives are then the same quadrature applied to d g / d nu = t tanh(nu t)
and d g / d x = -cosh t, which is what the exact derivatives of the integral
are. Relative accuracy about 1e-14 over nu in [1e-3, 1e3], x in [1e-10, 1e3]
(checked against scipy.special.kv and mpmath in tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

_N = 160  # quadrature nodes
_LEVEL = 46.0  # log of the peak-to-cutoff ratio of the integrand
_BISECT = 64  # bisection steps (interval widths below 1e-16 of the start)


def _log_cosh(z):
    a = jnp.abs(z)
    return a + jnp.log1p(jnp.exp(-2.0 * a)) - jnp.log(2.0)


def _g(t, nu, x):
    return -x * jnp.cosh(t) + _log_cosh(nu * t)


def _window(nu, x):
    """Interval [lo, hi] outside which exp(g) is below exp(-_LEVEL) of its peak.

    Two bisection loops: the maximum t0 of g (g' = nu tanh(nu t) - x sinh t
    changes sign once, at t0 <= asinh(nu / x); t0 = 0 when nu^2 <= x), then
    both ends at once, g(lo) = g(hi) = g(t0) - _LEVEL, with hi bracketed in
    closed form: x cosh T - nu T > c holds when x cosh T / 2 exceeds both
    nu T (T >= 2 log(8 nu / (e x))) and c (T >= acosh(2 c / x)).
    """
    zero = jnp.zeros_like(x)

    def find_peak(_, lh):
        lo, hi = lh
        mid = 0.5 * (lo + hi)
        rising = nu * jnp.tanh(nu * mid) > x * jnp.sinh(mid)
        return jnp.where(rising, mid, lo), jnp.where(rising, hi, mid)

    t0 = 0.5 * sum(jax.lax.fori_loop(0, _BISECT, find_peak, (zero, jnp.arcsinh(nu / x))))
    t0 = jnp.where(nu * nu <= x, 0.0, t0)
    level = _g(t0, nu, x) - _LEVEL
    c = jnp.maximum(-level, 0.0)
    t_a = 2.0 * jnp.log(jnp.maximum(8.0 * nu / (jnp.e * x), 1.0))
    t_b = jnp.arccosh(jnp.maximum(2.0 * c / x, 1.0))
    t_up = jnp.maximum(jnp.maximum(t_a, t_b), t0) + 1.0

    def find_ends(_, state):
        lo_a, lo_b, hi_a, hi_b = state  # lo in [lo_a, lo_b] (g rising), hi in [hi_a, hi_b]
        m_lo, m_hi = 0.5 * (lo_a + lo_b), 0.5 * (hi_a + hi_b)
        below = _g(m_lo, nu, x) <= level
        above = _g(m_hi, nu, x) > level
        return (jnp.where(below, m_lo, lo_a), jnp.where(below, lo_b, m_lo),
                jnp.where(above, m_hi, hi_a), jnp.where(above, hi_b, m_hi))

    lo_a, lo_b, hi_a, hi_b = jax.lax.fori_loop(0, _BISECT, find_ends, (zero, t0, t0, t_up))
    lo = jnp.where(_g(zero, nu, x) > level, 0.0, 0.5 * (lo_a + lo_b))
    return lo, 0.5 * (hi_a + hi_b)


@jax.jit
def log_bessel_k(nu, x):
    """log K_nu(x) for nu >= 0, x > 0 (broadcast), differentiable in nu and x."""
    nu, x = jnp.broadcast_arrays(jnp.abs(jnp.asarray(nu, float)), jnp.asarray(x, float))
    lo, hi = jax.lax.stop_gradient(_window(nu, x))
    frac = jnp.linspace(0.0, 1.0, _N).reshape((1,) * nu.ndim + (_N,))
    lo, hi, nu, x = (v[..., None] for v in (lo, hi, nu, x))
    t = lo + (hi - lo) * frac  # (..., _N)
    end = (frac == 0.0) | (frac == 1.0)
    logw = jnp.log((hi - lo) / (_N - 1)) + jnp.where(end, jnp.log(0.5), 0.0)
    return logsumexp(_g(t, nu, x) + logw, axis=-1)


def log_matern_correlation(d, range_, smoothness):
    """log of geoR's / TMB's Matérn correlation at distances d > 0.

    rho(d) = 2^(1 - kappa) / Gamma(kappa) * (d / phi)^kappa * K_kappa(d / phi),
    phi = range_, kappa = smoothness. Clipped at 0 (rho <= 1).
    """
    x = d / range_
    lr = (
        (1.0 - smoothness) * jnp.log(2.0)
        - jax.scipy.special.gammaln(smoothness)
        + smoothness * jnp.log(x)
        + log_bessel_k(smoothness, x)
    )
    return jnp.minimum(lr, 0.0)
