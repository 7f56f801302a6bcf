"""The covariance-structure interface and the structure-by-type hierarchy.

A covariance structure describes the covariance of one random-effect block
b (length ``dim`` = k, one block per level of the grouping factor) as a
function of an unconstrained parameter vector ``theta`` -- glmmTMB's theta
for that term, entry for entry, so that estimates, start values and VarCorr
are comparable with glmmTMB 1.1.5.

Structure the engine can exploit is declared by type (as tinygp's kernels
declare ``Quasisep``):

- ``CovStruct``: dense. The engine works with ``factor(theta)`` = T,
  ``cov = T T^T``, b = T u with u ~ N(0, I) (lme4's spherical effects).
- ``AbstractSparsePrecision``: the precision (inverse covariance) is
  tridiagonal; ``precision_bands`` gives its diagonal and first
  off-diagonal, and ``log_density`` costs O(k) per block (ar1, hetar1, ou).
- ``AbstractDiagonal``: independent effects (diag, homdiag); also a sparse
  precision with a zero off-diagonal.

Parameter names (``param_names(term_names)``) follow one convention:
``log_sd(TERM)`` for a term's log standard deviation (``log_sd`` when shared
by all terms); transformed correlation parameters are named after the
quantity they map to and the transform, e.g. ``chol_cor(T2,T1)`` (us),
``rho_logit`` (cs), ``rho_transf`` and ``rho_lag1_transf`` (ar1, toep:
rho = x / sqrt(1 + x^2)); ``log_rate``, ``log_range``, ``log_smoothness``,
``log_lambda``; ``loading(TERM,j)`` for rr loadings.
"""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from .._internal import eval_method

_LOG_2PI = math.log(2.0 * math.pi)


class CovStruct(eqx.Module):
    """A covariance structure for a random-effect block of length ``dim``.

    Subclasses are small frozen modules: they set ``name`` (glmmTMB's), hold
    ``dim`` (and any fixed data such as coordinates) as fields, and implement
    ``n_params`` and ``cov``. Everything else has a default built on ``cov``
    and its Cholesky factor; structures with a closed-form factor override
    ``_cholesky`` (a lower-triangular T with T T^T = cov) or ``factor``.
    """

    dim: eqx.AbstractVar[int]
    name: eqx.AbstractClassVar[str]

    @property
    @abc.abstractmethod
    def n_params(self) -> int:
        """Number of unconstrained parameters (glmmTMB's theta for the term)."""

    @abc.abstractmethod
    def cov(self, theta):
        """The (k, k) covariance matrix."""

    # ---- defaults ---------------------------------------------------------

    def start(self):
        """glmmTMB's default start values (zeros for all but rr)."""
        return jnp.zeros(self.n_params)

    def _cholesky(self, theta):
        return jnp.linalg.cholesky(self.cov(theta))

    def factor(self, theta):
        """T with cov = T T^T (lower-triangular Cholesky where natural)."""
        return self._cholesky(theta)

    def precision(self, theta):
        """The inverse covariance, from the Cholesky factor."""
        linv = solve_triangular(self._cholesky(theta), jnp.eye(self.dim), lower=True)
        return linv.T @ linv

    def log_density(self, theta, b):
        """sum_j log N(b_j; 0, cov) over all leading axes of b (..., k)."""
        b = self._check_b(b)
        chol = self._cholesky(theta)
        z = solve_triangular(chol, b.reshape(-1, self.dim).T, lower=True)
        n = z.shape[1]
        log_det = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
        return -0.5 * jnp.sum(z * z) - 0.5 * n * (log_det + self.dim * _LOG_2PI)

    def sample(self, key, theta, n: int):
        """n independent draws of b, shape (n, k), as T u with u ~ N(0, I)."""
        t = self.factor(theta)
        u = jax.random.normal(key, (n, t.shape[1]))
        return u @ t.T

    def _report_parts(self, theta):
        return self.cov(theta), self._report_extra(theta)

    def report(self, theta) -> dict:
        """glmmTMB's VarCorr for this block as numpy values: "sd", "corr" (and
        "cov"), plus the structure's own parameters (``_report_extra``: ar1/cs
        "rho", "range", "smoothness", rr "loadings", ...).
        """
        # one compiled program: op by op, each operation's first use in a process
        # compiles its own (0.7 s for an exponential structure on 52 positions)
        cov, extra = eval_method(self, "_report_parts", theta)
        cov = np.asarray(cov, dtype=float)
        sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = cov / np.outer(sd, sd)
        corr = np.where(np.isfinite(corr), corr, 0.0)
        np.fill_diagonal(corr, 1.0)
        out = {"sd": sd, "corr": corr, "cov": cov}
        for key, value in extra.items():
            value = np.asarray(value, dtype=float)
            out[key] = float(value) if value.ndim == 0 else value
        return out

    def _report_extra(self, theta) -> dict:
        """Structure-specific entries of ``report`` (jax arrays; traced)."""
        return {}

    def param_names(self, term_names=None) -> list[str]:
        """Readable names of the theta entries (convention in the module doc)."""
        return [f"theta[{i}]" for i in range(self.n_params)]

    # ---- helpers for subclasses -------------------------------------------

    def _terms(self, term_names):
        if term_names is None:
            return [str(i + 1) for i in range(self.dim)]
        term_names = [str(t) for t in term_names]
        if len(term_names) != self.dim:
            raise ValueError(
                f"{type(self).__name__}.param_names: expected {self.dim} term names "
                f"(one per element of the block), got {len(term_names)}."
            )
        return term_names

    def _theta(self, theta):
        theta = jnp.asarray(theta, dtype=float)
        if theta.shape != (self.n_params,):
            raise ValueError(
                f"{type(self).__name__} (dim={self.dim}) takes theta of shape "
                f"({self.n_params},), got shape {theta.shape}."
            )
        return theta

    def _check_b(self, b):
        b = jnp.asarray(b, dtype=float)
        if b.ndim == 0 or b.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__}: b must have shape (..., {self.dim}), got {b.shape}."
            )
        return b


class AbstractSparsePrecision(CovStruct):
    """A covariance whose precision is tridiagonal (a Gauss-Markov chain).

    Subclasses give the bands of the precision Q = cov^-1 and log det Q in
    closed form; the dense precision, the log-density (O(k) per block) follow.
    The engine can assemble Q blockwise without ever inverting a covariance.
    """

    @abc.abstractmethod
    def precision_bands(self, theta):
        """(diag (k,), offdiag (k-1,)) of the tridiagonal precision."""

    @abc.abstractmethod
    def log_det_precision(self, theta):
        """log det Q, in closed form."""

    def precision(self, theta):
        d, e = self.precision_bands(theta)
        return jnp.diag(d) + jnp.diag(e, 1) + jnp.diag(e, -1)

    def log_density(self, theta, b):
        b = self._check_b(b).reshape(-1, self.dim)
        d, e = self.precision_bands(theta)
        quad = jnp.sum(d[None, :] * b * b) + 2.0 * jnp.sum(e[None, :] * b[:, :-1] * b[:, 1:])
        n = b.shape[0]
        return 0.5 * (n * (self.log_det_precision(theta) - self.dim * _LOG_2PI) - quad)


class AbstractDiagonal(AbstractSparsePrecision):
    """Independent effects: cov = diag(sd^2). Subclasses give ``log_sd``."""

    @abc.abstractmethod
    def log_sd(self, theta):
        """(k,) log standard deviations."""

    def cov(self, theta):
        return jnp.diag(jnp.exp(2.0 * self.log_sd(theta)))

    def _cholesky(self, theta):
        return jnp.diag(jnp.exp(self.log_sd(theta)))

    def precision_bands(self, theta):
        return jnp.exp(-2.0 * self.log_sd(theta)), jnp.zeros(self.dim - 1)

    def log_det_precision(self, theta):
        return -2.0 * jnp.sum(self.log_sd(theta))


def check_dim(obj, dim, minimum: int = 1) -> int:
    """Validate a block dimension at construction (a clear error, at once)."""
    if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer)) or dim < minimum:
        raise ValueError(
            f"{type(obj).__name__} needs dim (the number of random effects per "
            f"level, k) as an integer >= {minimum}; got {dim!r}."
        )
    return int(dim)
