"""Ordered beta regression (Kubinec 2022; glmmTMB's ``ordbeta``)."""

from __future__ import annotations

from typing import ClassVar, final

import jax
import jax.numpy as jnp
from jax.scipy.special import betainc

from ._base import Family, require_unit_interval
from ._beta import beta_log_density
from ._math import log_sigmoid, logspace_sub


@final
class OrderedBeta(Family):
    """Ordered beta: point masses at 0 and 1 plus a beta density on (0, 1).

    With cutpoints ``k0 < k1`` (``psi``, on the logit scale) and ``eta``:

    - ``P(y = 0) = 1 - plogis(eta - k0)``
    - ``P(y = 1) = plogis(eta - k1)``
    - ``f(y) = [plogis(eta - k0) - plogis(eta - k1)] dbeta(y, mu phi, (1 - mu) phi)``
      for ``0 < y < 1``, ``mu = link.inverse(eta)``.

    Dispersion: ``disp = log(phi)`` (beta precision), ``sigma() = phi``.
    ``psi = (k0, k1)`` untransformed, as glmmTMB 1.1.5 (``family_params``
    reports ``plogis(psi)`` as the cutoffs); the cutpoints are on the logit
    scale whatever the link. ``psi_start = (-1, 1)`` is what glmmTMB uses from
    1.1.6 on (1.1.5 started at ``(0, 0)``, where the density is degenerate).

    glmmTMB: ``ordbeta(link = "logit")``.
    """

    name: ClassVar[str] = "ordbeta"
    has_disp: ClassVar[bool] = True
    n_psi: ClassVar[int] = 2
    psi_start: ClassVar[tuple[float, ...]] = (-1.0, 1.0)
    nonnegative: ClassVar[bool] = True
    default_link: ClassVar[str] = "logit"
    allowed_links: ClassVar[tuple[str, ...]] = ("logit", "probit", "cloglog")
    support_point: ClassVar[float] = 0.5

    def _parts(self, eta, psi):
        """``log P(0)``, ``log P(1)``, ``log P(0 < y < 1)``."""
        log_p0 = log_sigmoid(psi[0] - eta)
        log_p1 = log_sigmoid(eta - psi[1])
        log_mid = logspace_sub(log_sigmoid(eta - psi[0]), log_p1)
        return log_p0, log_p1, log_mid

    def _log_prob(self, y, eta, disp, psi, trials):
        log_p0, log_p1, log_mid = self._parts(eta, psi)
        inner = (y > 0) & (y < 1)
        y_in = jnp.where(inner, y, 0.5)
        dens = log_mid + beta_log_density(
            y_in, self.link.log_inverse(eta) + disp, self.link.log1m_inverse(eta) + disp
        )
        return jnp.where(y == 0, log_p0, jnp.where(y == 1, log_p1, jnp.where(inner, dens, -jnp.inf)))

    def _log_prob_zero(self, eta, disp, psi, trials):
        return self._parts(eta, psi)[0]

    def _mean(self, eta, disp, psi, trials):
        _, log_p1, log_mid = self._parts(eta, psi)
        return jnp.exp(log_p1) + jnp.exp(log_mid) * self.link.inverse(eta)

    def _variance(self, eta, disp, psi, trials):
        _, log_p1, log_mid = self._parts(eta, psi)
        mu = self.link.inverse(eta)
        p1, pm = jnp.exp(log_p1), jnp.exp(log_mid)
        m2 = p1 + pm * (mu * mu + mu * (1.0 - mu) / (1.0 + jnp.exp(disp)))
        m1 = p1 + pm * mu
        return m2 - m1 * m1

    def _sample(self, key, eta, disp, psi, trials):
        log_p0, log_p1, _ = self._parts(eta, psi)
        mu = self.link.inverse(eta)
        phi = jnp.exp(disp)
        shape = jnp.broadcast_shapes(mu.shape, phi.shape)
        # One uniform picks 0, 1 or the interior with the likelihood's masses
        # (glmmTMB's simulate draws y = 1 with probability (1 - P0) plogis(eta - k1)
        # instead of plogis(eta - k1), inconsistent with its own likelihood).
        k1, k2 = jax.random.split(key)
        u = jax.random.uniform(k1, shape, mu.dtype)
        p0, p1 = jnp.exp(log_p0), jnp.exp(log_p1)
        b = jax.random.beta(k2, mu * phi, (1.0 - mu) * phi, shape, mu.dtype)
        return jnp.where(u < p0, 0.0, jnp.where(u < p0 + p1, 1.0, b))

    def _cdf(self, y, eta, disp, psi, trials):
        log_p0, _, log_mid = self._parts(eta, psi)
        mu = self.link.inverse(eta)
        phi = jnp.exp(disp)
        inner = jnp.exp(log_p0) + jnp.exp(log_mid) * betainc(mu * phi, (1.0 - mu) * phi, jnp.clip(y, 0.0, 1.0))
        return jnp.where(y < 0, 0.0, jnp.where(y >= 1, 1.0, inner))

    def _check_support(self, y, trials):
        require_unit_interval(y, self.name, closed=True)
