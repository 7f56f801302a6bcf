"""Matérn correlation with estimated smoothness: glmmTMB ``mat``."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from ._bessel import log_matern_correlation
from ._registry import register
from ._spatial import AbstractIsotropic, spatial_fields


@register("mat")
class Matern(AbstractIsotropic):
    """Matérn correlation (TMB's ``matern``, geoR's parameterization):

        rho(d) = 2^(1 - kappa) / Gamma(kappa) (d / phi)^kappa K_kappa(d / phi),  rho(0) = 1,

    phi = range = exp(theta[1]), kappa = smoothness = exp(theta[2]);
    theta = (log sd, log range, log smoothness). kappa = 1/2 is ``exp`` with the
    same range; as kappa grows with phi fixed, rho -> 1 (the effective range is
    about 2 phi sqrt(kappa)). glmmTMB: ``mat(pos + 0 | g)``; start 0.
    K_kappa comes from ``_bessel.log_bessel_k`` (differentiable in kappa).
    """

    dim: int = eqx.field(static=True)
    coords: jax.Array
    dist: jax.Array
    name: ClassVar[str] = "mat"

    def __init__(self, dim=None, coords=None):
        self.dim, self.coords, self.dist = spatial_fields(self, dim, coords)

    @property
    def n_params(self) -> int:
        return 3

    def correlation(self, theta):
        theta = self._theta(theta)
        positive = self.dist > 0
        d = jnp.where(positive, self.dist, 1.0)
        log_rho = log_matern_correlation(d, jnp.exp(theta[1]), jnp.exp(theta[2]))
        return jnp.where(positive, jnp.exp(log_rho), 1.0)

    def _report_extra(self, theta):
        theta = self._theta(theta)
        return {"range": jnp.exp(theta[1]), "smoothness": jnp.exp(theta[2])}

    def param_names(self, term_names=None):
        return ["log_sd", "log_range", "log_smoothness"]
