"""Beta-binomial family (glmmTMB's ``dbetabinom_robust``)."""

from __future__ import annotations

from typing import ClassVar, final

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

from . import _discrete
from ._base import Family
from ._binomial import BINOMIAL_LINKS, check_successes
from ._math import lchoose, log_sigmoid, logspace_gamma


def betabinomial_log_prob(y, n, log_a, log_b, lchoose_ny=None):
    """``log P(y)`` for ``BetaBinomial(n, a, b)`` from ``log a`` and ``log b``.

    ``lchoose(n, y) + lgamma(y + a) + lgamma(n - y + b) - lgamma(n + a + b)
    + lgamma(a + b) - lgamma(a) - lgamma(b)``, with ``lgamma`` of a quantity
    known on the log scale evaluated as glmmTMB's ``logspace_gamma``.
    ``lchoose_ny``: ``lchoose(n, y)`` if known (0 for the family's kernel).
    """
    a, b = jnp.exp(log_a), jnp.exp(log_b)
    log_y = jnp.log(jnp.where(y > 0, y, 1.0))
    log_nmy = jnp.log(jnp.where(n - y > 0, n - y, 1.0))
    lg_ya = jnp.where(y > 0, logspace_gamma(jnp.logaddexp(log_y, log_a)), logspace_gamma(log_a))
    lg_nyb = jnp.where(n - y > 0, logspace_gamma(jnp.logaddexp(log_nmy, log_b)), logspace_gamma(log_b))
    return (
        (lchoose(n, y) if lchoose_ny is None else lchoose_ny)
        + lg_ya
        + lg_nyb
        - gammaln(n + a + b)
        + logspace_gamma(jnp.logaddexp(log_a, log_b))
        - logspace_gamma(log_a)
        - logspace_gamma(log_b)
    )


def _log_pmf_upto_n(k, n, log_a, log_b):
    return jnp.where(k <= n, betabinomial_log_prob(k, n, log_a, log_b), -jnp.inf)


@final
class BetaBinomial(Family):
    """Beta-binomial successes (Morris 1997): ``p ~ Beta(mu phi, (1 - mu) phi)``,
    ``y | p ~ Binomial(n, p)``.

    ``P(y) = choose(n, y) B(y + a, n - y + b) / B(a, b)``, ``a = mu phi``,
    ``b = (1 - mu) phi``.

    Dispersion: ``disp = log(phi)`` (``sigma() = phi``, the beta precision);
    ``a`` and ``b`` are formed on the log scale from ``logit(mu)`` as glmmTMB
    (``log a = log(mu) + disp``). ``y`` counts successes out of ``trials``.
    ``mean``/``variance`` refer to the proportion ``y / n``: ``E = mu``,
    ``Var = mu (1 - mu) (phi + n) / (n (phi + 1))``.

    glmmTMB: ``betabinomial(link = "logit")``.
    """

    name: ClassVar[str] = "betabinomial"
    has_disp: ClassVar[bool] = True
    discrete: ClassVar[bool] = True
    nonnegative: ClassVar[bool] = True
    needs_trials: ClassVar[bool] = True
    default_link: ClassVar[str] = "logit"
    allowed_links: ClassVar[tuple[str, ...]] = BINOMIAL_LINKS
    support_point: ClassVar[float] = 0.0

    def _log_ab(self, eta, disp):
        lp = self.link.logit_inverse(eta)
        return log_sigmoid(lp) + disp, log_sigmoid(-lp) + disp

    def _log_kernel(self, y, eta, disp, psi, trials):
        log_a, log_b = self._log_ab(eta, disp)
        return betabinomial_log_prob(y, trials, log_a, log_b, lchoose_ny=0.0)

    def _log_norm(self, y, trials):
        return lchoose(trials, y)

    def _variance(self, eta, disp, psi, trials):
        mu = self.link.inverse(eta)
        phi = jnp.exp(disp)
        return mu * (1.0 - mu) * (phi + trials) / (trials * (phi + 1.0))

    def _sample(self, key, eta, disp, psi, trials):
        log_a, log_b = self._log_ab(eta, disp)
        shape = jnp.broadcast_shapes(log_a.shape, trials.shape)
        k1, k2 = jax.random.split(key)
        p = jax.random.beta(k1, jnp.exp(log_a), jnp.exp(log_b), shape)
        return jax.random.binomial(k2, jnp.broadcast_to(trials, shape), p).astype(p.dtype)

    def _cdf(self, y, eta, disp, psi, trials):
        log_a, log_b = self._log_ab(eta, disp)
        y = jnp.minimum(y, trials)
        return _discrete.cdf(_log_pmf_upto_n, y, jnp.zeros_like(y), trials, log_a, log_b)

    def _check_support(self, y, trials):
        check_successes(y, trials, self.name)
