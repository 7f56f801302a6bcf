"""Zero truncation and hurdle models: wrappers around any non-negative base family."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._base import Family, _bad
from ._math import log1mexp, log_sigmoid
from ._zero_inflated import _Delegating, _ZeroWrapper, resolve_base

_MAX_REJECTIONS = 1000


def _require_nonnegative(base, wrapper):
    if not base.nonnegative:
        raise TypeError(
            f"{wrapper} needs a family on [0, inf) (counts, Gamma, beta, ...); "
            f"the {base.name} family has support on the whole real line."
        )


class Truncated(_Delegating):
    """Zero-truncated ``base``: ``f(y) = f_base(y) / P_base(Y > 0)`` for ``y > 0``, no mass at 0.

    ``log P_base(Y > 0) = log1mexp(log P_base(0))`` (glmmTMB's ``log_nzprob``,
    ``logspace_sub(0, log P(0))``), from the base family's ``_log_prob_zero``.
    ``E = E_base / P(Y > 0)``, ``Var = (Var_base + E_base^2) / P(Y > 0) - E^2``.
    Sampling redraws zeros (up to 1000 times; a draw still zero, possible only
    when ``P(Y > 0)`` is negligible, is set to 1, the limit of the truncated law).

    glmmTMB: ``truncated_poisson``, ``truncated_nbinom1``, ``truncated_nbinom2``,
    ``truncated_genpois``, ``truncated_compois`` (= ``Truncated(Poisson())``, ...).
    """

    def __init__(self, base):
        base = resolve_base(base, "Truncated")
        _require_nonnegative(base, "Truncated")
        self.base = base
        self.link = base.link

    @property
    def name(self):
        return "truncated_" + self.base.name

    @property
    def support_point(self):
        return 1.0 if self.base.discrete else self.base.support_point

    def _log_pos(self, eta, d, p, t):
        return log1mexp(self.base._log_prob_zero(eta, d, p, t))

    def _log_prob(self, y, eta, d, p, t, kernel=False):
        pos = y > 0
        y_safe = jnp.where(pos, y, self.support_point)
        both = self.base._log_kernel_and_zero if kernel else self.base._log_prob_and_zero
        val, log_p0 = both(y_safe, eta, d, p, t)
        return jnp.where(pos, val - log1mexp(log_p0), -jnp.inf)

    def _log_kernel(self, y, eta, d, p, t):
        return self._log_prob(y, eta, d, p, t, kernel=True)

    def _log_prob_zero(self, eta, d, p, t):
        return jnp.full(jnp.shape(eta), -jnp.inf)

    def _mean(self, eta, d, p, t):
        return self.base._mean(eta, d, p, t) / jnp.exp(self._log_pos(eta, d, p, t))

    def _variance(self, eta, d, p, t):
        pos = jnp.exp(self._log_pos(eta, d, p, t))
        m = self.base._mean(eta, d, p, t)
        second = (self.base._variance(eta, d, p, t) + m * m) / pos
        mt = m / pos
        return second - mt * mt

    def _cdf(self, y, eta, d, p, t):
        p0 = jnp.exp(self.base._log_prob_zero(eta, d, p, t))
        val = (self.base._cdf(y, eta, d, p, t) - p0) / (1.0 - p0)
        return jnp.where(y > 0, jnp.clip(val, 0.0, 1.0), 0.0)

    def _sample(self, key, eta, d, p, t):
        if type(self.base)._quantile is not Family._quantile:
            # Exact inversion: u uniform on (P(0), 1).
            p0 = jnp.exp(self.base._log_prob_zero(eta, d, p, t))
            u = jax.random.uniform(key, jnp.shape(p0), p0.dtype)
            return jnp.maximum(self.base._quantile(p0 + (1.0 - p0) * u, eta, d, p, t), 1.0)
        key, sub = jax.random.split(key)
        draw = self.base._sample(sub, eta, d, p, t)

        def cond(c):
            i, _, x = c
            return (i < _MAX_REJECTIONS) & jnp.any(x <= 0)

        def body(c):
            i, k, x = c
            k, sub = jax.random.split(k)
            return i + 1, k, jnp.where(x <= 0, self.base._sample(sub, eta, d, p, t), x)

        _, _, draw = jax.lax.while_loop(cond, body, (0, key, draw))
        return jnp.where(draw <= 0, 1.0, draw)

    def _no_zi(self, zi):
        if zi is not None:
            raise ValueError(
                f"{self.name} got a zero predictor zi; for a hurdle model use "
                f"Hurdle({type(self.base).__name__}()) (glmmTMB: truncated family + ziformula)."
            )

    def check_support(self, y, trials=None):
        y = np.asarray(y, dtype=float)
        _bad(
            y,
            y <= 0,
            self.name,
            "strictly positive responses (it is zero-truncated)",
            f"For data with zeros use Hurdle({type(self.base).__name__}()) "
            "(glmmTMB: the truncated family with a ziformula).",
        )
        self.base.check_support(y, trials)


class Hurdle(_ZeroWrapper):
    """Hurdle model: ``P(0) = pz``; ``f(y) = (1 - pz) f_Truncated(base)(y)`` for ``y > 0``.

    ``zi = logit(pz)``, the probability of a zero. Equal to
    ``ZeroInflated(Truncated(base))``; ``E = (1 - pz) E_T``,
    ``Var = (1 - pz) (Var_T + E_T^2) - E^2``.

    glmmTMB: ``family = truncated_X, ziformula = ~ ...`` (for continuous bases,
    e.g. ``ziGamma``, the family itself with a ziformula).
    """

    truncated: Truncated

    def __init__(self, base):
        base = resolve_base(base, "Hurdle")
        _require_nonnegative(base, "Hurdle")
        self.base = base
        self.truncated = Truncated(base)
        self.link = base.link

    @property
    def name(self):
        return self.truncated.name if self.base.discrete else self.base.name

    def _zi_log_prob(self, y, eta, d, p, t, zi, kernel=False):
        positive = self.truncated._log_prob(y, eta, d, p, t, kernel=kernel)
        return jnp.where(y == 0, log_sigmoid(zi), log_sigmoid(-zi) + positive)

    def _zi_mean(self, eta, d, p, t, zi):
        return jax.nn.sigmoid(-zi) * self.truncated._mean(eta, d, p, t)

    def _zi_variance(self, eta, d, p, t, zi):
        q = jax.nn.sigmoid(-zi)
        m = self.truncated._mean(eta, d, p, t)
        mean = q * m
        return q * (self.truncated._variance(eta, d, p, t) + m * m) - mean * mean

    def _zi_sample(self, key, eta, d, p, t, zi):
        k1, k2 = jax.random.split(key)
        draw = self.truncated._sample(k1, eta, d, p, t)
        zero = jax.random.uniform(k2, jnp.broadcast_shapes(draw.shape, zi.shape)) < jax.nn.sigmoid(zi)
        return jnp.where(zero, 0.0, draw)

    def _zi_cdf(self, y, eta, d, p, t, zi):
        pz = jax.nn.sigmoid(zi)
        val = pz + (1.0 - pz) * self.truncated._cdf(y, eta, d, p, t)
        return jnp.where(y < 0, 0.0, val)

    def check_support(self, y, trials=None):
        y = np.asarray(y, dtype=float)
        _bad(y, y < 0, self.name, "non-negative responses", "A hurdle model describes y >= 0.")
        keep = y > 0
        t = None if trials is None else np.broadcast_to(np.asarray(trials, float), y.shape)[keep]
        self.base.check_support(y[keep], t)
