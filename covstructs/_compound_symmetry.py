"""Compound symmetry: glmmTMB ``cs`` (heterogeneous) and ``homcs``."""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._base import CovStruct, check_dim
from ._registry import register


def _cs_log_terms(x, k: int):
    """rho and the logs of 1 - rho and 1 + j rho (j = 0..k-1) for glmmTMB's
    rho = plogis(x) (1 + a) - a, a = 1/(k-1), each as a sum of non-negative
    terms (no cancellation as rho -> 1 or rho -> -1/(k-1))."""
    a = 1.0 / (k - 1) if k > 1 else 0.0
    s = jax.nn.sigmoid(x)
    rho = s * (1.0 + a) - a
    log1m_rho = np.log1p(a) + jax.nn.log_sigmoid(-x)  # 1 - rho = (1 + a) plogis(-x)
    j = np.arange(k)
    # 1 + j rho = (1 - j a) + j (1 + a) s; 1 - j a = (k-1-j)/(k-1) >= 0, zero at j = k-1
    base = (k - 1 - j) / (k - 1) if k > 1 else np.ones(1)
    positive = base > 0
    log_pos = jnp.log(jnp.where(positive, base + j * (1.0 + a) * s, 1.0))
    log_zero = np.log(float(k)) + jax.nn.log_sigmoid(x)  # j = k-1: 1 + (k-1) rho = k plogis(x)
    log1p_jrho = jnp.where(positive, log_pos, log_zero)
    return rho, log1m_rho, log1p_jrho


def cs_corr_cholesky(x, k: int):
    """Closed-form lower Cholesky factor of the compound-symmetry correlation
    (1 - rho) I + rho 1 1^T: column j has diagonal sqrt((1-rho)(1+j rho)/(1+(j-1) rho))
    and, below it, rho sqrt((1-rho) / ((1+(j-1) rho)(1+j rho))) (j >= 1; column 0 is
    (1, rho, ..., rho)). Finite and differentiable for all finite x, also where
    the matrix becomes singular."""
    rho, log1m_rho, lp = _cs_log_terms(x, k)
    lp_prev = jnp.concatenate([log1m_rho[None], lp[:-1]])  # log(1 + (j-1) rho); j=0: 1-rho
    diag = jnp.exp(0.5 * (log1m_rho + lp - lp_prev)).at[0].set(1.0)
    below = (rho * jnp.exp(0.5 * (log1m_rho - lp_prev - lp))).at[0].set(rho)
    rows, cols = np.indices((k, k))
    return jnp.where(rows == cols, diag[cols], jnp.where(rows > cols, below[cols], 0.0))


class _AbstractCompoundSymmetry(CovStruct):
    """Shared code: subclasses say how the k log-SDs come out of theta."""

    @abc.abstractmethod
    def _log_sd(self, theta):
        """(k,) log standard deviations from theta."""

    def rho(self, theta):
        a = 1.0 / (self.dim - 1) if self.dim > 1 else 0.0
        return jax.nn.sigmoid(self._theta(theta)[-1]) * (1.0 + a) - a

    def _cholesky(self, theta):
        theta = self._theta(theta)
        return jnp.exp(self._log_sd(theta))[:, None] * cs_corr_cholesky(theta[-1], self.dim)

    def cov(self, theta):
        theta = self._theta(theta)
        sd = jnp.exp(self._log_sd(theta))
        corr = jnp.where(jnp.eye(self.dim, dtype=bool), 1.0, self.rho(theta))
        return sd[:, None] * corr * sd[None, :]

    def _report_extra(self, theta):
        return {"rho": self.rho(theta)}


@register("cs")
class CompoundSymmetry(_AbstractCompoundSymmetry):
    """Heterogeneous compound symmetry: corr_ij = rho (i != j), sd_i free.

    theta = (log sd_1, ..., log sd_k, x), rho = plogis(x) (1 + a) - a with
    a = 1/(k-1), so rho ranges over (-1/(k-1), 1), the positive-definite range.
    glmmTMB: ``cs(terms | g)``; start 0 (rho = (1 - a)/2). For k = 1 theta
    still has 2 entries (x unused), as in glmmTMB.
    """

    dim: int = eqx.field(static=True)
    name: ClassVar[str] = "cs"

    def __init__(self, dim):
        self.dim = check_dim(self, dim)

    @property
    def n_params(self) -> int:
        return self.dim + 1

    def _log_sd(self, theta):
        return theta[: self.dim]

    def param_names(self, term_names=None):
        return [f"log_sd({t})" for t in self._terms(term_names)] + ["rho_logit"]


@register("homcs")
class HomogeneousCompoundSymmetry(_AbstractCompoundSymmetry):
    """Homogeneous compound symmetry: cov = sd^2 ((1 - rho) I + rho 1 1^T).

    theta = (log sd, x), rho as in ``cs``. glmmTMB (>= 1.1.12; not in 1.1.5):
    ``homcs(terms | g)``, start 0.
    """

    dim: int = eqx.field(static=True)
    name: ClassVar[str] = "homcs"

    def __init__(self, dim):
        self.dim = check_dim(self, dim)

    @property
    def n_params(self) -> int:
        return 2

    def _log_sd(self, theta):
        return jnp.broadcast_to(theta[0], (self.dim,))

    def param_names(self, term_names=None):
        return ["log_sd", "rho_logit"]
