"""Stable scalar helpers shared by the families (log-space arithmetic).

All functions are elementwise, jax-traceable and differentiable. They follow
the log-space forms of TMB/glmmTMB (``logspace_add``, ``logspace_sub``,
``R_Log1_Exp``) so that the families keep glmmTMB's numerics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, gammaln

LOG_2PI = math.log(2.0 * math.pi)


def as_float(x):
    """``x`` as a floating jax array (float64 when x64 is on)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def log1mexp(a):
    """``log(1 - exp(a))`` for ``a <= 0`` (R's ``R_Log1_Exp``; Maechler 2012)."""
    a = jnp.minimum(a, 0.0)
    near = a > -math.log(2.0)
    # Evaluate each branch only on its own domain so gradients stay finite.
    a_near = jnp.where(near, a, -1.0)
    a_far = jnp.where(near, -1.0, a)
    return jnp.where(near, jnp.log(-jnp.expm1(a_near)), jnp.log1p(-jnp.exp(a_far)))


def logspace_sub(logx, logy):
    """``log(exp(logx) - exp(logy))`` for ``logy <= logx`` (TMB's ``logspace_sub``)."""
    return logx + log1mexp(logy - logx)


def log_sigmoid(x):
    """``log(1 / (1 + exp(-x)))`` = ``-softplus(-x)``."""
    return -jax.nn.softplus(-x)


# Stirling-series coefficients B_{2k} / (2k (2k-1)), k = 1..8.
_STIRLING = (
    1.0 / 12.0,
    -1.0 / 360.0,
    1.0 / 1260.0,
    -1.0 / 1680.0,
    1.0 / 1188.0,
    -691.0 / 360360.0,
    1.0 / 156.0,
    -3617.0 / 122400.0,
)


def _stirling_tail(x):
    """``lgamma(x) - [(x - 1/2) log x - x + log(2 pi)/2]`` for ``x >= 10`` (error < 1e-17)."""
    inv = 1.0 / x
    inv2 = inv * inv
    acc = jnp.zeros_like(x)
    for c in reversed(_STIRLING):
        acc = acc * inv2 + c
    return acc * inv


_SHIFT = 8  # lgamma(x) = S(x + 8) - log(x (x + 1) ... (x + 7)) for x < 10


def _stirling_diff(x, d, y):
    """``S(y) - S(x)``, ``S(z) = (z - 1/2) log z - z + tail(z)``, ``y = x + d``, ``x, y >= 10``."""
    near = jnp.abs(d) < 0.5 * x
    log_ratio = jnp.where(near, jnp.log1p(jnp.where(near, d, 0.0) / x), jnp.log(y) - jnp.log(x))
    return (x - 0.5) * log_ratio + d * jnp.log(y) - d + (_stirling_tail(y) - _stirling_tail(x))


def _log_rising(x, small):
    """``log(x (x + 1) ... (x + 7))`` where ``small``, else 0."""
    prod = jnp.ones_like(x)
    for i in range(_SHIFT):
        prod = prod * jnp.where(small, x + i, 1.0)
    return jnp.log(prod)


@jax.custom_jvp
def _lgamma_diff(x, d, y):
    sx, sy = x < 10.0, y < 10.0
    xs = jnp.where(sx, x + _SHIFT, x)
    ys = jnp.where(sy, y + _SHIFT, y)
    ds = d + _SHIFT * (sy.astype(d.dtype) - sx.astype(d.dtype))
    return _stirling_diff(xs, ds, ys) - _log_rising(y, sy) + _log_rising(x, sx)


@_lgamma_diff.defjvp
def _lgamma_diff_jvp(primals, tangents):
    # the series is for the value; its AD derivatives would trace it again at
    # every order (the Laplace gradient needs third derivatives) -- digamma is
    # exact and small. ``y`` carries ``x + d``'s tangent.
    x, d, y = primals
    tx, _, ty = tangents
    return _lgamma_diff(x, d, y), digamma(y) * ty - digamma(x) * tx


def lgamma_diff(x, d, y=None):
    """``lgamma(x + d) - lgamma(x)`` for ``x, x + d > 0``, without cancellation when ``x`` is large.

    ``y``, if given, is ``x + d`` known exactly (``x + d`` may round away a
    small ``y`` when ``x`` is huge). Both ends go through Stirling's series
    (arguments below 10 shifted up by 8 with the rising factorial), so the
    difference ``(x - 1/2) log1p(d / x) + d log(x + d) - d + ...`` keeps full
    relative accuracy even for ``x ~ 1e20`` (where the plain difference of two
    ``lgamma`` values loses every digit), and it costs no ``lgamma`` call (a
    third of the time, inside the series loops).
    """
    x, d = jnp.broadcast_arrays(as_float(x), as_float(d))
    y = x + d if y is None else jnp.broadcast_to(as_float(y), x.shape)
    return _lgamma_diff(x, d, y)


_LARGE = 1e5


@jax.custom_jvp
def lgamma_ratio(x, n):
    """``lgamma(x + n) - lgamma(x)`` for ``x > 0`` and counts ``n >= 0``: the cheap form
    of `lgamma_diff` for the negative binomial's size ``x``.

    Below ``x = 1e5`` the plain difference of ``lgamma`` values (TMB's and glmmTMB's
    form) loses at most ``eps * lgamma(1e5) ~ 1e-10``; above, two Stirling terms
    (remainder below ``1 / (360 x^3)``) keep the difference exact as the size grows
    to the Poisson limit. The full series of `lgamma_diff` would be exact
    everywhere, but the Laplace gradient takes third derivatives of this term and
    AD through the series tripled the compiled program (and its compile time);
    the derivatives are digamma's, as for the plain difference.
    """
    big = x >= _LARGE
    xb = jnp.where(big, x, _LARGE)
    yb = xb + n
    stirling = (xb - 0.5) * jnp.log1p(n / xb) + n * jnp.log(yb) - n + (1.0 / 12.0) * (1.0 / yb - 1.0 / xb)
    xs = jnp.where(big, 1.0, x)
    return jnp.where(big, stirling, gammaln(xs + n) - gammaln(xs))


@lgamma_ratio.defjvp
def _lgamma_ratio_jvp(primals, tangents):
    # the derivatives of lgamma's difference, whatever form the value takes
    x, n = primals
    tx, tn = tangents
    dy = digamma(x + n)
    return lgamma_ratio(x, n), dy * (tx + tn) - digamma(x) * tx


def logspace_gamma(logx):
    """``lgamma(exp(logx))`` that survives ``logx -> -inf`` (glmmTMB's ``logspace_gamma``)."""
    tiny = logx < -150.0
    return jnp.where(tiny, -logx, gammaln(jnp.exp(jnp.where(tiny, 0.0, logx))))


def lfactorial(k):
    """``log(k!)``, exactly 0 for ``k`` = 0 and 1 (where XLA's ``lgamma`` may be off by
    an ulp, which matters in ``log(1 - P(0))`` when ``P(0)`` is within 1e-16 of 1)."""
    return jnp.where(k <= 1.0, 0.0, gammaln(jnp.maximum(k, 1.0) + 1.0))


def lchoose(n, k):
    """``log(n choose k)``, exactly 0 at ``k = 0`` and ``k = n``."""
    return jnp.where((k == 0) | (k == n), 0.0, lfactorial(n) - lfactorial(k) - lfactorial(n - k))


def xlogy(x, y):
    """``x * log(y)`` with ``0 * log(0) = 0`` and finite gradients at ``x = 0``."""
    zero = x == 0
    return jnp.where(zero, 0.0, x * jnp.log(jnp.where(zero, 1.0, y)))
