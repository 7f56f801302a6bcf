"""Infinite positive series, summed to full precision, with exact low-order derivatives.

The COM-Poisson normalizing constant, the Tweedie series ``W(y, phi, p)`` and
the Bell numbers are sums ``S(theta) = sum_j exp(g(j; theta))`` whose number of
non-negligible terms depends on the parameters. We sum them with a
``lax.while_loop`` (blocks of terms walking outward from a centre near the
largest term, until the rest is below 1e-20 of the sum), so the shapes stay
static and the result is exact to rounding for every parameter value; TMB sums
the same series term by term (compois_utils::calc_logZ, tweedie_logW).

A while loop cannot be reverse-differentiated (and every loop costs compile
time), so derivatives come from one loop evaluated without gradient at
``theta0`` that also averages the Taylor coefficients of every term: the
returned function of ``theta`` is the log of the Taylor polynomial of
``S(theta) / S(theta0)``, exact in value and in all derivatives up to the
requested order (``taylor_log_sum``; Tweedie uses order 3, COM-Poisson 5, enough for
the third derivatives of the Laplace approximation). Reverse mode, forward
mode and any nesting then differentiate a polynomial, never a loop.

Conventions: everything here is per observation (scalars; callers ``vmap``).
``g`` is given *relative to a centre* ``c`` as ``log_term(d, theta, data)`` with
``j = c + d``, so that huge terms (``lgamma(1e20)``) never enter; ``data`` is a
tuple of arrays whose first two entries are ``step`` and ``d_min``. With
``step = 1`` the sum runs over every integer ``d >= d_min``; with ``step > 1``
(only used far from the boundary, when the terms vary smoothly over several
integers) it is the trapezoid rule ``step * sum_k g(k * step)``, whose error for
terms spread over ``sigma >= 10 * step`` is below ``exp(-2 pi^2 100)``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_BLOCK = 32
_LOG_TOL = -46.0  # stop when the rest is below exp(-46) ~ 1e-20 of the sum
_MAX_BLOCKS = 20000


def _tail_negligible(g_edge, g_prev, log_total):
    """The log-concave tail after ``g_edge`` is below tolerance (geometric bound)."""
    decreasing = g_edge < g_prev
    ratio = jnp.where(decreasing, g_edge - g_prev, -1.0)
    tail = g_edge - jnp.log(-jnp.expm1(ratio))
    return (decreasing & (tail - log_total < _LOG_TOL)) | (g_edge == -jnp.inf)


def accumulate(log_term, fn, theta, data):
    """Primal sum ``(log S, E_w[fn])`` (no derivatives; ``fn`` may be None).

    ``log_term(d, theta, data)`` and ``fn(d, theta, data)`` take a scalar ``d``;
    ``fn`` returns a 1-d array. Each iteration adds ``_BLOCK`` terms on each
    side of the centre.
    """
    step, d_min = data[0], data[1]
    dtype = jnp.result_type(float)
    offs = jnp.arange(_BLOCK, dtype=dtype)
    g_vec = jax.vmap(log_term, in_axes=(0, None, None))
    f_vec = None if fn is None else jax.vmap(fn, in_axes=(0, None, None))
    size = 0 if fn is None else jax.eval_shape(fn, jnp.zeros((), dtype), theta, data).shape[0]

    def body(carry):
        i, done_r, done_l, m, w0, rest, sf = carry
        d_r = step * (i * _BLOCK + offs)
        d_l = -step * (i * _BLOCK + 1.0 + offs)
        d = jnp.concatenate([d_r, d_l])
        valid = jnp.concatenate([jnp.full((_BLOCK,), ~done_r), (d_l >= d_min) & ~done_l])
        g = jnp.where(valid, g_vec(d, theta, data), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(g))
        m_new = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        scale = jnp.exp(m - m_new)
        w = jnp.exp(g - m_new)
        centre = d == 0.0
        # The centre term apart, so that log S = log(w0) + log1p(rest / w0) keeps
        # full relative accuracy when the other terms are tiny (log S ~ 1e-22).
        w0 = w0 * scale + jnp.sum(jnp.where(centre, w, 0.0))
        rest = rest * scale + jnp.sum(jnp.where(centre, 0.0, w))
        if f_vec is not None:
            vals = jnp.where(valid[:, None], f_vec(d, theta, data), 0.0)
            sf = sf * scale + w @ vals
        log_total = m_new + jnp.log(w0 + rest)
        bad = ~jnp.isfinite(log_total)
        g_r, g_l = g[:_BLOCK], g[_BLOCK:]
        done_r = done_r | bad | _tail_negligible(g_r[-1], g_r[-2], log_total)
        done_l = done_l | bad | ~valid[-1] | _tail_negligible(g_l[-1], g_l[-2], log_total)
        return i + 1, done_r, done_l, m_new, w0, rest, sf

    def cond(carry):
        i, done_r, done_l = carry[:3]
        return (i < _MAX_BLOCKS) & ~(done_r & done_l)

    # When -step < d_min the left side holds no term at all.
    init = (
        jnp.zeros((), dtype),
        jnp.asarray(False),
        -step < d_min,
        jnp.asarray(-jnp.inf, dtype),
        jnp.zeros((), dtype),
        jnp.zeros((), dtype),
        jnp.zeros((size,), dtype),
    )
    _, _, _, m, w0, rest, sf = jax.lax.while_loop(cond, body, init)
    safe_w0 = jnp.where(w0 > 0, w0, 1.0)
    log_sum = jnp.where(w0 > 0, jnp.log(safe_w0) + jnp.log1p(rest / safe_w0), jnp.log(rest))
    return m + log_sum + jnp.log(step), sf / (w0 + rest)


def monomials(p: int, order: int) -> list[tuple[int, ...]]:
    """Exponents ``alpha`` with ``1 <= |alpha| <= order`` in ``p`` variables (static)."""
    out = [()]
    for _ in range(p):
        out = [a + (k,) for a in out for k in range(order + 1)]
    return sorted((a for a in out if 1 <= sum(a) <= order), key=lambda a: (sum(a), a))


def taylor_terms(p: int, order: int, log_term=None, stats=None):
    """Per-term function: ``d^alpha h(0)`` for each monomial, where
    ``h(tau) = exp(log_term(d, theta + tau) - log_term(d, theta))``.

    With ``stats(d, data)`` (an exponential family, ``log_term = theta . stats``)
    these are the monomials ``stats^alpha``; otherwise nested ``jacfwd``.
    """
    exps = monomials(p, order)
    if stats is not None:
        index = np.asarray(exps).T  # (p, n_monomials)

        def coefs(d, theta, data):
            table = _power_table(stats(d, data), order)  # (p, order + 1)
            return math.prod(table[i, index[i]] for i in range(p))

        return coefs

    def coefs(d, theta, data):
        def h(tau):
            return jnp.exp(log_term(d, theta + tau, data) - log_term(d, theta, data))

        tensors, f = [None], h
        for _ in range(order):
            f = jax.jacfwd(f)
            tensors.append(f(jnp.zeros_like(theta)))
        return jnp.stack([tensors[sum(a)][sum(((i,) * a[i] for i in range(p)), ())] for a in exps])

    return coefs


class TaylorPolynomial:
    """``log S(theta) = log S0 + log P(theta - theta0)``, ``P(t) = 1 + sum_alpha b_alpha t^alpha``.

    Built from ``coefs = E_w[d^alpha h]`` at ``theta0`` (``b_alpha = coefs_alpha /
    alpha!``), it has the exact value and derivatives up to ``order`` at
    ``theta0``. All inputs are taken without gradient; derivatives flow through
    ``theta`` only. Evaluation gathers from a table of powers (a handful of
    vector operations), so its derivatives compile quickly.
    """

    def __init__(self, log_s0, coefs, theta0, order: int):
        self.log_s0, coefs, self.theta0 = (jax.lax.stop_gradient(x) for x in (log_s0, coefs, theta0))
        self.p = self.theta0.shape[0]
        self.order = order
        exps = monomials(self.p, order)
        self.index = np.asarray(exps).T  # (p, n_monomials)
        scale = np.asarray([1.0 / math.prod(math.factorial(k) for k in a) for a in exps])
        self.b = coefs * scale

    def _poly(self, table, k: int = 0):
        """``d^k P / d t_0^k`` from the table of powers of ``t``."""
        e0 = self.index[0]
        factor = np.asarray([math.perm(int(e), k) for e in e0], dtype=float)
        mono = table[0, np.maximum(e0 - k, 0)]
        for i in range(1, self.p):
            mono = mono * table[i, self.index[i]]
        return (1.0 if k == 0 else 0.0) + jnp.sum(self.b * factor * mono)

    def __call__(self, theta):
        """``log S(theta)``."""
        return self.log_s0 + jnp.log(self._poly(_power_table(theta - self.theta0, self.order)))

    def first_partials(self, theta):
        """``(P, dP/dt_0, d^2P/dt_0^2)`` at ``theta`` (for Newton steps in ``theta[0]``)."""
        table = _power_table(theta - self.theta0, self.order)
        return self._poly(table), self._poly(table, 1), self._poly(table, 2)


def _power_table(t, order: int):
    """``table[i, k] = t[i]^k``, ``k = 0..order`` (products, so derivatives stay finite at 0)."""
    cols = [jnp.ones_like(t)]
    for _ in range(order):
        cols.append(cols[-1] * t)
    return jnp.stack(cols, axis=-1)


def taylor_polynomial(log_s0, coefs, theta0, order: int) -> TaylorPolynomial:
    """See ``TaylorPolynomial``."""
    return TaylorPolynomial(log_s0, coefs, theta0, order)


def taylor_log_sum(log_term, theta0, data, order: int, stats=None):
    """``log S`` near ``theta0`` as a function with exact derivatives up to ``order``.

    One while loop computes ``log S(theta0)`` and the weighted averages of the
    Taylor coefficients of each term's ratio ``exp(g(theta0 + tau) - g(theta0))``
    (``taylor_terms``); the result is ``taylor_polynomial`` of them: exact in
    value at ``theta0`` and in every derivative up to ``order`` there. No while
    loop is ever differentiated, so any mix of forward and reverse mode works.
    """
    theta0 = jax.lax.stop_gradient(theta0)
    fn = taylor_terms(theta0.shape[0], order, log_term=log_term, stats=stats)
    log_s0, coefs = accumulate(log_term, fn, theta0, data)
    return taylor_polynomial(log_s0, coefs, theta0, order)


def step_and_min(center, sd, j_min):
    """Summation step and lowest offset for terms centred at ``center`` with spread ``sd``.

    Unit steps unless the boundary ``j_min`` lies more than 20 sd away and the
    terms spread over more than 20 integers (then ``step = floor(sd / 10)``).
    """
    far = (center - j_min) > 20.0 * sd
    step = jnp.where(far & (sd >= 20.0), jnp.floor(sd / 10.0), 1.0)
    return jax.lax.stop_gradient(step), jax.lax.stop_gradient(j_min - center)


@functools.cache
def _vectorized(fn):
    return jax.jit(jax.vmap(fn))


def per_obs(fn, *args):
    """Broadcast the array ``args``, apply the scalar function ``fn`` to each element (vmap).

    ``fn`` should be a module-level function: the jitted, vectorized version is
    cached on it, so eager calls do not recompile the series' while loops.
    """
    args = [jnp.asarray(a) for a in args]
    shape = jnp.broadcast_shapes(*(a.shape for a in args))
    flat = [jnp.broadcast_to(a, shape).reshape(-1) for a in args]
    n = flat[0].shape[0]
    if n and not any(isinstance(a, jax.core.Tracer) for a in flat):
        # Eager call: pad to a power of two so that a few compiled sizes serve all
        # (inside a caller's jit the shapes are fixed and nothing is padded).
        size = max(8, 1 << (n - 1).bit_length())
        flat = [jnp.concatenate([a, jnp.broadcast_to(a[:1], (size - n,))]) for a in flat]
    out = _vectorized(fn)(*flat)
    return jax.tree_util.tree_map(lambda o: o[:n].reshape(shape + o.shape[1:]), out)
