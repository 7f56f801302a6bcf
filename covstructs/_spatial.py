"""Isotropic spatial correlations on coordinates: glmmTMB ``exp`` and ``gau``
(and the shared base of ``mat``)."""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._base import CovStruct, check_dim
from ._registry import register


def _coords(obj, dim, coords):
    name = type(obj).__name__
    if coords is None:
        raise ValueError(f"{name} needs `coords`, an array (k, ndim) of the k locations.")
    xy = np.asarray(coords, dtype=float)
    if xy.ndim == 1:
        xy = xy[:, None]
    if xy.ndim != 2 or not np.all(np.isfinite(xy)):
        raise ValueError(f"{name}: coords must be a finite (k, ndim) array; got shape {xy.shape}.")
    dim = check_dim(obj, xy.shape[0] if dim is None else dim)
    if xy.shape[0] != dim:
        raise ValueError(f"{name}: got {xy.shape[0]} locations for dim={dim}; give one per level.")
    return dim, xy


class AbstractIsotropic(CovStruct):
    """cov_ij = sd^2 rho(d_ij), d the Euclidean distance between the levels'
    coordinates (glmmTMB: ``dist(coords)`` on ``numFactor`` levels), rho(0) = 1.
    theta = (log sd, log range, ...); subclasses give ``correlation``."""

    coords: eqx.AbstractVar[jax.Array]
    dist: eqx.AbstractVar[jax.Array]

    @abc.abstractmethod
    def correlation(self, theta):
        """(k, k) correlation matrix."""

    def cov(self, theta):
        theta = self._theta(theta)
        return jnp.exp(2.0 * theta[0]) * self.correlation(theta)

    def _cholesky(self, theta):
        theta = self._theta(theta)
        return jnp.exp(theta[0]) * jnp.linalg.cholesky(self.correlation(theta))

    def _report_extra(self, theta):
        return {"range": jnp.exp(self._theta(theta)[1])}

    def param_names(self, term_names=None):
        return ["log_sd", "log_range"]


def spatial_fields(obj, dim, coords):
    """(dim, coords, dist) for a new isotropic structure, validated."""
    dim, xy = _coords(obj, dim, coords)
    dist = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
    return dim, jnp.asarray(xy), jnp.asarray(dist)


@register("exp")
class Exponential(AbstractIsotropic):
    """Exponential correlation: rho(d) = exp(-d / range).

    theta = (log sd, log range); computed as glmmTMB does,
    exp(-d exp(-theta[1])). glmmTMB: ``exp(pos + 0 | g)``, ``pos = numFactor(x, y)``;
    start 0.
    """

    dim: int = eqx.field(static=True)
    coords: jax.Array
    dist: jax.Array
    name: ClassVar[str] = "exp"

    def __init__(self, dim=None, coords=None):
        self.dim, self.coords, self.dist = spatial_fields(self, dim, coords)

    @property
    def n_params(self) -> int:
        return 2

    def correlation(self, theta):
        theta = self._theta(theta)
        return jnp.exp(-self.dist * jnp.exp(-theta[1]))


@register("gau")
class Gaussian(AbstractIsotropic):
    """Gaussian correlation: rho(d) = exp(-(d / range)^2).

    theta = (log sd, log range), computed as exp(-d^2 exp(-2 theta[1])).
    glmmTMB: ``gau(pos + 0 | g)``; start 0. The matrix is nearly singular when
    the range is large compared with the spacing (then factor is NaN, as
    glmmTMB's likelihood is).
    """

    dim: int = eqx.field(static=True)
    coords: jax.Array
    dist: jax.Array
    name: ClassVar[str] = "gau"

    def __init__(self, dim=None, coords=None):
        self.dim, self.coords, self.dist = spatial_fields(self, dim, coords)

    @property
    def n_params(self) -> int:
        return 2

    def correlation(self, theta):
        theta = self._theta(theta)
        return jnp.exp(-(self.dist**2) * jnp.exp(-2.0 * theta[1]))
