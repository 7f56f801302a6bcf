"""Cumulative sums of a probability mass function, for cdf() and sampling by inversion.

Used by the count families without a closed-form cdf or sampler in JAX
(generalized Poisson, COM-Poisson, Bell, beta-binomial). Per observation, a
``lax.while_loop`` adds blocks of 64 masses starting from ``lo`` (a point
below which the mass is negligible, e.g. ``mean - 40 sd``). No derivatives.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ._series import per_obs

_BLOCK = 64
_MAX_BLOCKS = 100_000


def lower_start(mean, variance):
    """``floor(max(0, mean - 40 sd))``: where the summation may start."""
    lo = jnp.floor(mean - 40.0 * jnp.sqrt(variance))
    return jax.lax.stop_gradient(jnp.where(jnp.isfinite(lo), jnp.maximum(lo, 0.0), 0.0))


def cdf(logpmf, y, lo, *params):
    """``sum_{k=lo}^{floor(y)} exp(logpmf(k, *params))`` per observation."""
    return per_obs(_cdf_kernel(logpmf), y, lo, *params)


def quantile(logpmf, u, lo, *params):
    """Smallest ``k >= lo`` with ``sum_{j=lo}^{k} pmf(j) >= u`` per observation."""
    return per_obs(_quantile_kernel(logpmf), u, lo, *params)


@functools.cache
def _cdf_kernel(logpmf):
    def one(y1, lo1, *p1):
        top = jnp.floor(y1)
        offs = jnp.arange(_BLOCK, dtype=jnp.result_type(float))

        def body(c):
            i, acc = c
            k = lo1 + i * _BLOCK + offs
            lp = jnp.where(k <= top, logpmf(k, *p1), -jnp.inf)
            return i + 1, jnp.logaddexp(acc, jax.nn.logsumexp(lp))

        def cond(c):
            i, _ = c
            return (lo1 + i * _BLOCK <= top) & (i < _MAX_BLOCKS)

        _, acc = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), jnp.asarray(-jnp.inf)))
        return jnp.where(top < lo1, 0.0, jnp.minimum(jnp.exp(acc), 1.0))

    return one


@functools.cache
def _quantile_kernel(logpmf):
    def one(u1, lo1, *p1):
        offs = jnp.arange(_BLOCK, dtype=jnp.result_type(float))

        def body(c):
            i, acc, ans = c
            k = lo1 + i * _BLOCK + offs
            cum = acc + jnp.cumsum(jnp.exp(logpmf(k, *p1)))
            hit = cum >= u1
            first = k[jnp.argmax(hit)]
            ans = jnp.where(jnp.any(hit), first, ans)
            return i + 1, cum[-1], ans

        def cond(c):
            i, acc, ans = c
            return jnp.isnan(ans) & (i < _MAX_BLOCKS) & jnp.isfinite(acc)

        init = (jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.asarray(jnp.nan))
        _, _, ans = jax.lax.while_loop(cond, body, init)
        return ans

    return one
