"""Independent effects: glmmTMB ``diag`` and ``homdiag``."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp

from ._base import AbstractDiagonal, check_dim
from ._registry import register


@register("diag")
class Diagonal(AbstractDiagonal):
    """Heterogeneous diagonal: cov = diag(sd_1^2, ..., sd_k^2), corr = I.

    theta = (log sd_1, ..., log sd_k). glmmTMB: ``diag(terms | g)``, start 0.
    """

    dim: int = eqx.field(static=True)
    name: ClassVar[str] = "diag"

    def __init__(self, dim):
        self.dim = check_dim(self, dim)

    @property
    def n_params(self) -> int:
        return self.dim

    def log_sd(self, theta):
        return self._theta(theta)

    def param_names(self, term_names=None):
        return [f"log_sd({t})" for t in self._terms(term_names)]


@register("homdiag", "identity")
class HomogeneousDiagonal(AbstractDiagonal):
    """Homogeneous diagonal (scaled identity): cov = sd^2 I_k.

    theta = (log sd,). glmmTMB (>= 1.1.6; not in 1.1.5): ``homdiag(terms | g)``.
    Also registered as ``identity``: with k = 1 it is the scalar variance of
    ``(1 | g)``, whose theta (log sd) equals that of ``us`` with k = 1.
    """

    dim: int = eqx.field(static=True)
    name: ClassVar[str] = "homdiag"

    def __init__(self, dim):
        self.dim = check_dim(self, dim)

    @property
    def n_params(self) -> int:
        return 1

    def log_sd(self, theta):
        return jnp.broadcast_to(self._theta(theta)[0], (self.dim,))

    def param_names(self, term_names=None):
        return ["log_sd"]
