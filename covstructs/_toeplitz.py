"""Toeplitz correlation: glmmTMB ``toep`` (heterogeneous) and ``homtoep``."""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._base import CovStruct, check_dim
from ._registry import register


def bounded(x):
    """glmmTMB's map from the real line to (-1, 1): x / sqrt(1 + x^2)."""
    return x / jnp.hypot(1.0, x)


class _AbstractToeplitz(CovStruct):
    """corr_ij = r_|i-j|, r_0 = 1, r_l = x_l / sqrt(1 + x_l^2) (l = 1..k-1);
    cov = S corr S. The last k-1 entries of theta are x_1..x_{k-1}."""

    @abc.abstractmethod
    def _log_sd(self, theta):
        """(k,) log standard deviations from theta."""

    def correlations(self, theta):
        """(k-1,) correlations at lags 1..k-1."""
        theta = self._theta(theta)
        return bounded(theta[self.n_params - (self.dim - 1) :])

    def cov(self, theta):
        theta = self._theta(theta)
        r = jnp.concatenate([jnp.ones(1), self.correlations(theta)])
        lag = np.abs(np.subtract.outer(np.arange(self.dim), np.arange(self.dim)))
        sd = jnp.exp(self._log_sd(theta))
        return sd[:, None] * r[lag] * sd[None, :]

    def _report_extra(self, theta):
        return {"rho": self.correlations(theta)}

    def _lag_names(self):
        return [f"rho_lag{l}_transf" for l in range(1, self.dim)]


@register("toep")
class Toeplitz(_AbstractToeplitz):
    """Heterogeneous Toeplitz: a free correlation per lag, a free sd per term.

    theta = (log sd_1..log sd_k, x_1..x_{k-1}); rho_lag l = x_l / sqrt(1 + x_l^2).
    glmmTMB: ``toep(terms | g)``, start 0. As in glmmTMB the lag correlations
    are not constrained jointly, so some theta give an indefinite matrix
    (``factor``/``log_density`` are then NaN, as glmmTMB's likelihood is).
    """

    dim: int = eqx.field(static=True)
    name: ClassVar[str] = "toep"

    def __init__(self, dim):
        self.dim = check_dim(self, dim)

    @property
    def n_params(self) -> int:
        return 2 * self.dim - 1

    def _log_sd(self, theta):
        return theta[: self.dim]

    def param_names(self, term_names=None):
        return [f"log_sd({t})" for t in self._terms(term_names)] + self._lag_names()


@register("homtoep")
class HomogeneousToeplitz(_AbstractToeplitz):
    """Homogeneous Toeplitz: as ``toep`` with one shared sd.

    theta = (log sd, x_1..x_{k-1}). glmmTMB (>= 1.1.13; not in 1.1.5):
    ``homtoep(terms | g)``, start 0.
    """

    dim: int = eqx.field(static=True)
    name: ClassVar[str] = "homtoep"

    def __init__(self, dim):
        self.dim = check_dim(self, dim)

    @property
    def n_params(self) -> int:
        return self.dim

    def _log_sd(self, theta):
        return jnp.broadcast_to(theta[0], (self.dim,))

    def param_names(self, term_names=None):
        return ["log_sd"] + self._lag_names()
