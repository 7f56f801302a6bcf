"""Covariance structures for random-effect blocks (glmmTMB's, same theta).

Every structure is a small frozen ``equinox.Module`` with the interface of
``CovStruct``: ``dim``, ``n_params``, ``start()``, ``cov``, ``factor``,
``precision``, ``log_density``, ``sample``, ``report``, ``param_names``.
Get one by glmmTMB's name::

    s = tmbx.covstructs.get("us", dim=2)
    s = tmbx.covstructs.get("ar1", dim=4)
    s = tmbx.covstructs.get("exp", dim=k, coords=xy)      # also "gau", "mat"
    s = tmbx.covstructs.get("ou", dim=k, times=t)
    s = tmbx.covstructs.get("rr", dim=k, d=2)
    s = tmbx.covstructs.get("propto", dim=k, matrix=M)   # also "equalto"

=======  ============================  ==============================================
name     class                         theta (glmmTMB's layout)
=======  ============================  ==============================================
us       Unstructured                  log sd_1..k, k(k-1)/2 unit-Cholesky entries
                                       (row-wise); k = 1 is (1 | g): log sd
diag     Diagonal                      log sd_1..k
homdiag  HomogeneousDiagonal           log sd  (alias "identity")
cs       CompoundSymmetry              log sd_1..k, x: rho = plogis(x)(1+a)-a, a=1/(k-1)
homcs    HomogeneousCompoundSymmetry   log sd, x
toep     Toeplitz                      log sd_1..k, x_1..x_k-1: rho_lag = x/sqrt(1+x^2)
homtoep  HomogeneousToeplitz           log sd, x_1..x_k-1
ar1      AR1                           log sd, x: phi = x/sqrt(1+x^2), corr = phi^|i-j|
hetar1   HeterogeneousAR1              log sd_1..k, x
ou       OrnsteinUhlenbeck             log sd, log rate: corr = exp(-rate |t_i - t_j|)
exp      Exponential                   log sd, log range: corr = exp(-d / range)
gau      Gaussian                      log sd, log range: corr = exp(-(d / range)^2)
mat      Matern                        log sd, log range, log smoothness
rr       ReducedRank                   Lambda's diagonal (d), then its lower entries
                                       column by column
propto   ProportionalTo                log lambda: cov = lambda M
equalto  EqualTo                       none: cov = M
=======  ============================  ==============================================

homdiag, homcs, homtoep, hetar1, propto and equalto came after glmmTMB 1.1.5
(in 1.1.6 to 1.1.14); their theta follows glmmTMB 1.1.15's source (hetar1 as
corrected in 1.1.12; for propto/equalto only the free entries, see
``ProportionalTo``).

Structure the engine can exploit is declared by type: ``AbstractSparsePrecision``
(tridiagonal precision: ar1, hetar1, ou, and the diagonal ones) and
``AbstractDiagonal`` (diag, homdiag). A user-defined structure is a subclass
of ``CovStruct`` implementing ``n_params`` and ``cov`` (optionally ``factor``);
pass the class or an instance to ``get``, or ``register`` it under a name.
"""

from ._base import AbstractDiagonal, AbstractSparsePrecision, CovStruct
from ._registry import available, get, register, registry
from ._unstructured import Unstructured, corr_to_theta
from ._diagonal import Diagonal, HomogeneousDiagonal
from ._compound_symmetry import CompoundSymmetry, HomogeneousCompoundSymmetry
from ._toeplitz import HomogeneousToeplitz, Toeplitz
from ._ar1 import AR1, HeterogeneousAR1
from ._ou import OrnsteinUhlenbeck
from ._spatial import AbstractIsotropic, Exponential, Gaussian
from ._matern import Matern
from ._reduced_rank import ReducedRank
from ._known import EqualTo, ProportionalTo
from ._bessel import log_bessel_k

__all__ = [
    "AR1",
    "AbstractDiagonal",
    "AbstractIsotropic",
    "AbstractSparsePrecision",
    "CompoundSymmetry",
    "CovStruct",
    "Diagonal",
    "EqualTo",
    "Exponential",
    "Gaussian",
    "HeterogeneousAR1",
    "HomogeneousCompoundSymmetry",
    "HomogeneousDiagonal",
    "HomogeneousToeplitz",
    "Matern",
    "OrnsteinUhlenbeck",
    "ProportionalTo",
    "ReducedRank",
    "Toeplitz",
    "Unstructured",
    "available",
    "corr_to_theta",
    "get",
    "log_bessel_k",
    "register",
    "registry",
]
