"""Binomial family on the logit scale (TMB's ``dbinom_robust``)."""

from __future__ import annotations

from typing import ClassVar, final

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import betainc

from ._base import Family, _bad, require_counts
from ._math import lchoose, xlogy

BINOMIAL_LINKS = ("logit", "probit", "cloglog", "log")


def check_successes(y, trials, family: str):
    """``y`` successes out of ``trials``: integers with ``0 <= y <= trials``."""
    require_counts(y, family)
    n = np.ones_like(y) if trials is None else np.broadcast_to(np.asarray(trials, float), y.shape)
    _bad(
        n,
        (n < 0) | (n != np.round(n)),
        family,
        "non-negative integer numbers of trials",
        "Pass trials as whole numbers (for proportions y with weights w use successes = y * w, trials = w).",
    )
    _bad(
        y,
        y > n,
        family,
        "successes y no larger than trials",
        "y counts successes out of trials; pass trials= (or cbind(successes, failures) in a formula). "
        "Without trials, y must be 0 or 1.",
    )


def _binomial_kernel(y, n, logit_p):
    """``y log p + (n - y) log(1 - p)`` from ``logit(p)`` (the log mass less ``lchoose(n, y)``)."""
    return y * logit_p - n * jax.nn.softplus(logit_p)


@final
class Binomial(Family):
    """Binomial successes: ``P(y) = choose(n, y) p^y (1 - p)^(n - y)``, ``p = mu``.

    ``y`` is the number of successes and ``trials = n`` (default 1, Bernoulli).
    Computed from ``logit(p)`` (``y logit(p) - n log(1 + exp(logit(p)))``, the
    link supplying a stable ``logit(p)`` for probit and cloglog too), as TMB's
    ``dbinom_robust``. No dispersion (``sigma() = 1``).

    ``mean`` and ``variance`` refer to the proportion ``y / n``: ``E = p``,
    ``Var = p (1 - p) / n`` (what glmmTMB's ``predict(type = "response")`` and
    ``family$variance`` describe); ``sample`` returns successes like ``y``.

    glmmTMB: ``binomial(link = "logit")``.
    """

    name: ClassVar[str] = "binomial"
    discrete: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True
    needs_trials: ClassVar[bool] = True
    default_link: ClassVar[str] = "logit"
    allowed_links: ClassVar[tuple[str, ...]] = BINOMIAL_LINKS
    support_point: ClassVar[float] = 0.0

    def _log_kernel(self, y, eta, disp, psi, trials):
        return _binomial_kernel(y, trials, self.link.logit_inverse(eta))

    def _log_norm(self, y, trials):
        return lchoose(trials, y)

    def _variance(self, eta, disp, psi, trials):
        p = self.link.inverse(eta)
        return p * (1.0 - p) / trials

    def _sample(self, key, eta, disp, psi, trials):
        p = self.link.inverse(eta)
        shape = jnp.broadcast_shapes(p.shape, trials.shape)
        return jax.random.binomial(key, jnp.broadcast_to(trials, shape), jnp.broadcast_to(p, shape)).astype(p.dtype)

    def _cdf(self, y, eta, disp, psi, trials):
        k = jnp.floor(y)
        p = self.link.inverse(eta)
        inside = (k >= 0) & (k < trials)
        a = jnp.where(inside, trials - k, 1.0)
        b = jnp.where(inside, k + 1.0, 1.0)
        val = betainc(a, b, 1.0 - p)
        return jnp.where(k < 0, 0.0, jnp.where(k >= trials, 1.0, val))

    def _deviance_residuals(self, y, eta, disp, psi, trials):
        p = self.link.inverse(eta)
        prop = y / trials
        dev = 2.0 * trials * (xlogy(prop, prop / p) + xlogy(1.0 - prop, (1.0 - prop) / (1.0 - p)))
        return jnp.sign(prop - p) * jnp.sqrt(jnp.maximum(dev, 0.0))

    def _check_support(self, y, trials):
        check_successes(y, trials, self.name)
