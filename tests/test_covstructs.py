"""Covariance structures: every registered structure against its dense form,
scipy's multivariate normal, finite differences and Monte Carlo, and the
1.1.5 structures against glmmTMB 1.1.5 itself (numbers pinned below).

How the glmmTMB numbers were produced (R 4.2.2, TMB 1.9.2, glmmTMB 1.1.5 from Debian's
r-cran-glmmtmb 1.1.5+dfsg-4; R is not needed to run these tests):

- REF_THETA: ``getME(fit, "theta")`` of the reference fits of
  /work/shared/reference/cases (same formulas, data from the reference CSVs
  with their factor levels), printed with ``sprintf("%.17g")``; e.g.
  ``glmmTMB(distance ~ age + Sex + ar1(factor(age) + 0 | Subject), data)``.
  Their log-likelihoods agree with the cases' ``logLik``.
- R_CASES: for a tiny data set (factor f with 4 levels L1..L4 inside 2 groups;
  times 0, 0.5, 1.7, 2 for ``ou``/``ar1``; coordinates (0,0), (1,0), (0.3,1.2),
  (2,1.5) for ``exp``/``gau``/``mat``, via ``numFactor``), the TMB object
  ``MakeADFun(data.tmb, parameters, map, random = NULL, DLL = "glmmTMB")`` of
  ``glmmTMB(y ~ STRUCT(f + 0 | g), doFit = FALSE)`` was evaluated at each theta
  with b = R_B: ``obj$report(p)`` gives corr, sd (and ``fact_load`` for rr),
  and ``obj$fn(p) - obj$fn(p0)`` (p0: the first theta of the list) the change
  of the random-effect negative log-density, the data term being unchanged.
  Entries: (theta, sd, upper triangle of corr by row, dnll[, loadings]).
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
import scipy.stats as st

import tmbx.covstructs as cs



@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield

R_B = [0.391031190045438, 0.82854225610805, -0.0834420467350283, -0.360990954969051, -0.823184574835961, -0.0635275070904321, 0.350344767058299, 0.777386574103767]
R_CASES = {
    'us': [
        ([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
         [1.0, 1.0, 1.0, 1.0],
         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
         0.0),
        ([0.1, -0.3, 0.5, 0.2, 0.7, -1.2, 0.4, 0.3, -0.5, 2.0],
         [1.10517091807565, 0.740818220681718, 1.64872127070013, 1.22140275816017],
         [0.573462344363328, -0.744208407535251, 0.129822696722375, -0.223549070422891, -0.102809733924071, 0.386460569558761],
         3.66459690509413),
    ],
    'diag': [
        ([0.0, 0.0, 0.0, 0.0],
         [1.0, 1.0, 1.0, 1.0],
         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
         0.0),
        ([0.1, -0.3, 0.5, 0.2],
         [1.10517091807565, 0.740818220681718, 1.64872127070013, 1.22140275816017],
         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
         1.04647534964809),
    ],
    'cs': [
        ([0.0, 0.0, 0.0, 0.0, 0.0],
         [1.0, 1.0, 1.0, 1.0],
         [0.333333333333333, 0.333333333333333, 0.333333333333333, 0.333333333333333, 0.333333333333333, 0.333333333333333],
         0.0),
        ([0.1, -0.3, 0.5, 0.2, -0.8],
         [1.10517091807565, 0.740818220681718, 1.64872127070013, 1.22140275816017],
         [0.0800340251631834, 0.0800340251631834, 0.0800340251631834, 0.0800340251631834, 0.0800340251631834, 0.0800340251631834],
         1.08399132672965),
        ([0.1, -0.3, 0.5, 0.2, 1.3],
         [1.10517091807565, 0.740818220681718, 1.64872127070013, 1.22140275816017],
         [0.714446644056745, 0.714446644056745, 0.714446644056745, 0.714446644056745, 0.714446644056745, 0.714446644056745],
         1.03664785900422),
    ],
    'toep': [
        ([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
         [1.0, 1.0, 1.0, 1.0],
         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
         0.0),
        ([0.1, -0.3, 0.5, 0.2, 0.9, 0.3, -0.1],
         [1.10517091807565, 0.740818220681718, 1.64872127070013, 1.22140275816017],
         [0.66896473162245, 0.287347885566345, -0.0995037190209989, 0.66896473162245, 0.287347885566345, 0.66896473162245],
         -0.138982711219711),
    ],
    'ar1': [
        ([0.0, 0.0],
         [1.0, 1.0, 1.0, 1.0],
         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
         0.0),
        ([0.3, -0.9],
         [1.349858807576, 1.349858807576, 1.349858807576, 1.349858807576],
         [-0.66896473162245, 0.447513812154696, -0.299370957245406, -0.66896473162245, 0.447513812154696, -0.66896473162245],
         1.1847091002143),
        ([-0.2, 1.7],
         [0.818730753077982, 0.818730753077982, 0.818730753077982, 0.818730753077982],
         [0.861934215157769, 0.74293059125964, 0.640357296094075, 0.861934215157769, 0.74293059125964, 0.861934215157769],
         -1.11628067883535),
    ],
    'ou': [
        ([0.0, 0.0],
         [1.0, 1.0, 1.0, 1.0],
         [0.606530659712633, 0.182683524052735, 0.135335283236613, 0.301194211912202, 0.22313016014843, 0.740818220681718],
         0.0),
        ([0.3, -0.2],
         [1.349858807576, 1.349858807576, 1.349858807576, 1.349858807576],
         [0.664071551824788, 0.248616860542429, 0.194473084962244, 0.374382639731005, 0.292849594938762, 0.782220017330867],
         1.53253839445912),
    ],
    'exp': [
        ([0.0, 0.0],
         [1.0, 1.0, 1.0, 1.0],
         [0.367879441171442, 0.290273502702645, 0.0820849986238988, 0.249263577315189, 0.164840714546606, 0.177947333770697],
         0.0),
        ([0.3, 0.4],
         [1.349858807576, 1.349858807576, 1.349858807576, 1.349858807576],
         [0.511544833689042, 0.436424403817298, 0.187158371321119, 0.394065409518935, 0.298663831198191, 0.314380321596697],
         1.51917832355702),
    ],
    'gau': [
        ([0.0, 0.0],
         [1.0, 1.0, 1.0, 1.0],
         [0.367879441171442, 0.216535667316007, 0.00193045413622771, 0.145148198483624, 0.038774207831722, 0.0507928338648985],
         0.0),
        ([0.3, 0.1],
         [1.349858807576, 1.349858807576, 1.349858807576, 1.349858807576],
         [0.440991025942983, 0.28574426336856, 0.00599357506054514, 0.205944131468246, 0.0698870474887036, 0.0871767472004814],
         1.74967066721038),
    ],
    'mat': [
        ([0.0, 0.0, 0.0],
         [1.0, 1.0, 1.0, 1.0],
         [0.601907230197235, 0.507534060133554, 0.184727040869368, 0.452851073766761, 0.327993188617841, 0.348591465509735],
         0.0),
        ([0.3, 0.4, 0.7],
         [1.349858807576, 1.349858807576, 1.349858807576, 1.349858807576],
         [0.905529781949866, 0.863507971019945, 0.604754987558979, 0.834348534365463, 0.750107786662146, 0.766051166544175],
         0.282000939485528),
        ([0.3, -0.4, -1.3],
         [1.349858807576, 1.349858807576, 1.349858807576, 1.349858807576],
         [0.122940329688177, 0.0828780019402611, 0.0109230587030694, 0.0645454515429514, 0.0330587895362514, 0.0373824576395872],
         2.3634193512878),
        ([-0.1, 0.2, 1.9],
         [0.90483741803596, 0.90483741803596, 0.90483741803596, 0.90483741803596],
         [0.971046212940903, 0.956112152589749, 0.83460097100828, 0.945024557211438, 0.909518460928196, 0.916648682999156],
         33.4464678215844),
    ],
    'rr': [
        ([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
         [1.0, 1.4142135623731, 1.4142135623731, 1.4142135623731],
         [0.707106781186547, 0.707106781186547, 0.707106781186547, 1.0, 1.0, 1.0],
         0.0,
         [[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]),
        ([0.8, -0.5, 0.3, 0.2, -0.6, 1.1, 0.4],
         [0.8, 0.58309518948453, 1.11803398874989, 0.721110255092798],
         [0.514495755427527, 0.178885438199983, -0.832050294337844, -0.751625689070423, -0.903737838893539, 0.396911150685467],
         -8.24030269332359,
         [[0.8, 0.0], [0.3, -0.5], [0.2, 1.1], [-0.6, 0.4]]),
    ],
}

# glmmTMB 1.1.5 estimates (getME(fit, "theta")) for the reference cases.
REF_THETA = {
    "orthodont_ar1": [0.60996361828817525, 2.5364191148118946],
    "salamanders_cs": [-0.74506911402753218, 0.60022947125054771, 0.028514123164940265,
                       -0.92382052246279567, 0.031114061796123159, 0.035484189272525675,
                       0.29451001806804378, -0.46034575962558077],
    "salamanders_rr": [-0.36905826472697184, 0.44633942688129957, -0.56262783712273401,
                       0.1157780938435842, 0.68549615263932573, -0.44630596160876479,
                       0.67692839405263039],
    "sleepstudy_us_ml": [3.1688689475279346, 1.7434130442840012, 0.081596217684549305],
    "sleepstudy_us_reml": [3.2084406012835287, 1.7786953275787969, 0.065691336582369919],
    "sleepstudy_diag": [3.1851626958442556, 1.7577579399327612],
    "topo_exp": [4.157842471109241, 1.8117561047105919],
}

# VarCorr of the reference cases (from /work/shared/reference/cases/*.json), pinned
# so that the test runs without shared/; the full matrices are compared too when
# shared/ is found.
REF_VARCORR = {
    "orthodont_ar1": {"sd": [1.84036444195486] * 4,
                      "corr0": [1, 0.930307720787442, 0.865472455356725, 0.805155707347225]},
    "salamanders_cs": {"sd": [0.474701490274253, 1.82253697224766, 1.02892454240293,
                              0.396999394905825, 1.03160316368589, 1.03612126616759,
                              1.34246841224228],
                       "corr0": [1] + [0.284721103818007] * 6},
    "salamanders_rr": {"sd": [0.369058264726972, 0.4463394268813, 0.562627837122734,
                              0.115778093843584, 0.685496152639326, 0.446305961608765,
                              0.67692839405263],
                       "corr0": [1, -1, 1, -1, -1, 1, -1]},
    "sleepstudy_us_ml": {"sd": [23.7805720648696, 5.71682192966967],
                         "corr0": [1, 0.0813259351100496]},
    "sleepstudy_us_reml": {"sd": [24.7404758616331, 5.92212494307824],
                           "corr0": [1, 0.0655500530737442]},
    "sleepstudy_diag": {"sd": [24.1712206431063, 5.7994201587923], "corr0": [1, 0]},
    # topo: first row of the 52 x 52 correlation, entries 0, 1, 2, 3, 25, 51
    "topo_exp": {"sd": [63.9334354559192] * 52,
                 "corr0_at": {0: 1, 1: 0.75714237289328, 2: 0.622478699040987,
                              3: 0.869722727732469, 25: 0.535104953782095,
                              51: 0.333426858974221}},
}

# ---------------------------------------------------------------------------
# dense constructions straight from glmmTMB's formulas (numpy, independent of
# the package's code)

K = 4
COORDS = np.array([[0.0, 0.0], [1.0, 0.0], [0.3, 1.2], [2.0, 1.5]])  # as in R_CASES
TIMES = np.array([0.0, 0.3, 1.1, 1.15, 2.5])
_M = np.array([[2.0, 0.6, -0.3, 0.1], [0.6, 1.5, 0.2, 0.0], [-0.3, 0.2, 1.0, 0.4],
               [0.1, 0.0, 0.4, 0.8]])


def _dist(xy):
    return np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))


def _bounded(x):
    return x / np.sqrt(1.0 + x * x)


def _scale(sd, corr):
    return np.asarray(sd)[:, None] * corr * np.asarray(sd)[None, :]


def _lag(k):
    return np.abs(np.subtract.outer(np.arange(k), np.arange(k)))


def dense_us(th, k):
    lower = np.eye(k)
    lower[np.tril_indices(k, -1)] = th[k:]  # row-wise, TMB's UNSTRUCTURED_CORR
    llt = lower @ lower.T
    d = np.sqrt(np.diag(llt))
    return _scale(np.exp(th[:k]), llt / np.outer(d, d))


def _cs_corr(x, k):
    a = 1.0 / (k - 1)
    rho = sp.expit(x) * (1 + a) - a
    return np.where(np.eye(k, dtype=bool), 1.0, rho)


def dense_matern(th, xy):
    x = _dist(xy) / math.exp(th[1])
    kappa = math.exp(th[2])
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = 2 ** (1 - kappa) / sp.gamma(kappa) * x**kappa * sp.kv(kappa, x)
    return math.exp(2 * th[0]) * np.where(x > 0, rho, 1.0)


def dense_rr(th, k, d):
    lam = np.zeros((k, d))
    diag, lower = th[:d], th[d:]
    for j in range(d):
        for i in range(k):
            if i == j:
                lam[i, j] = diag[j]
            elif i > j:
                lam[i, j] = lower[j * k - (j + 1) * j // 2 + i - 1 - j]  # glmmTMB.cpp
    return lam @ lam.T


DENSE = {
    "us": lambda th, s: dense_us(th, s.dim),
    "diag": lambda th, s: np.diag(np.exp(2 * th)),
    "homdiag": lambda th, s: np.exp(2 * th[0]) * np.eye(s.dim),
    "identity": lambda th, s: np.exp(2 * th[0]) * np.eye(s.dim),
    "cs": lambda th, s: _scale(np.exp(th[: s.dim]), _cs_corr(th[-1], s.dim)),
    "homcs": lambda th, s: np.exp(2 * th[0]) * _cs_corr(th[-1], s.dim),
    "toep": lambda th, s: _scale(
        np.exp(th[: s.dim]), np.concatenate([[1.0], _bounded(th[s.dim:])])[_lag(s.dim)]),
    "homtoep": lambda th, s: np.exp(2 * th[0])
    * np.concatenate([[1.0], _bounded(th[1:])])[_lag(s.dim)],
    "ar1": lambda th, s: np.exp(2 * th[0]) * _bounded(th[1]) ** _lag(s.dim),
    "hetar1": lambda th, s: _scale(np.exp(th[: s.dim]), _bounded(th[-1]) ** _lag(s.dim)),
    "ou": lambda th, s: np.exp(2 * th[0] - np.exp(th[1]) * np.abs(np.subtract.outer(TIMES, TIMES))),
    "exp": lambda th, s: np.exp(2 * th[0]) * np.exp(-_dist(COORDS) * np.exp(-th[1])),
    "gau": lambda th, s: np.exp(2 * th[0]) * np.exp(-_dist(COORDS) ** 2 * np.exp(-2 * th[1])),
    "mat": lambda th, s: dense_matern(th, COORDS),
    "rr": lambda th, s: dense_rr(th, s.dim, s.d),
    "propto": lambda th, s: np.exp(th[0]) * _M,
    "equalto": lambda th, s: _M,
}


def make(name):
    kw = {"ou": {"times": TIMES}, "exp": {"coords": COORDS}, "gau": {"coords": COORDS},
          "mat": {"coords": COORDS}, "rr": {"d": 2}, "propto": {"matrix": _M},
          "equalto": {"matrix": _M}}.get(name, {})
    dim = 5 if name == "ou" else K
    return cs.get(name, dim=dim, **kw)


# (generic thetas, boundary thetas): correlations near +-1, variances near 0,
# independence, Matern smoothness large or small
THETAS = {
    "us": ([[0.1, -0.3, 0.5, 0.2, 0.7, -1.2, 0.4, 0.3, -0.5, 2.0]],
           [[-12.0, 0.0, 6.0, 1.0, 30.0, 0.5, -0.2, -25.0, 0.1, 3.0]]),
    "diag": ([[0.1, -0.3, 0.5, 0.2]], [[-15.0, 8.0, 0.0, 1.0]]),
    "homdiag": ([[0.4]], [[-15.0]]),
    "identity": ([[0.4]], [[9.0]]),
    "cs": ([[0.1, -0.3, 0.5, 0.2, -0.8], [0.1, -0.3, 0.5, 0.2, 1.3]],
           [[-9.0, 0.0, 1.0, 0.5, 18.0], [0.3, 0.0, 1.0, -0.5, -18.0]]),
    "homcs": ([[0.3, 0.7]], [[-10.0, 18.0], [2.0, -18.0]]),
    "toep": ([[0.1, -0.3, 0.5, 0.2, 0.9, 0.3, -0.1]],
             [[-9.0, 0.0, 0.5, 1.0, 4.925, 3.437, 2.784]]),
    "homtoep": ([[0.3, 0.9, 0.3, -0.1]], [[8.0, 4.925, 3.437, 2.784]]),
    "ar1": ([[0.3, -0.9], [-0.2, 1.7]], [[-10.0, 40.0], [3.0, -40.0]]),
    "hetar1": ([[0.1, -0.3, 0.5, 0.2, 0.8]], [[-8.0, 0.0, 3.0, 1.0, -40.0]]),
    "ou": ([[0.3, -0.2]], [[-5.0, -8.0], [0.5, 5.0]]),
    "exp": ([[0.3, 0.4]], [[-6.0, 4.0], [0.0, -6.0]]),
    "gau": ([[0.3, -0.4]], [[5.0, 0.2], [0.0, -3.0]]),
    "mat": ([[0.3, -0.3, 0.4], [0.1, 0.2, -1.0]], [[0.0, -2.66, 4.0], [-7.0, 0.5, -3.0]]),
    "rr": ([[0.8, -0.5, 0.3, 0.2, -0.6, 1.1, 0.4]],
           [[1e-4, -0.5, 0.0, 0.2, -0.6, 1.1, 1e-8]]),
    "propto": ([[0.7]], [[-20.0], [15.0]]),
    "equalto": ([[]], [[]]),
}

NAMES = cs.available()
ALL_THETAS = [(n, i, "generic") for n in NAMES for i in range(len(THETAS[n][0]))] + [
    (n, i, "boundary") for n in NAMES for i in range(len(THETAS[n][1]))
]


def theta_of(name, i, kind):
    return np.asarray(THETAS[name][0 if kind == "generic" else 1][i], dtype=float)


def test_every_registered_structure_has_a_test_case():
    assert set(NAMES) == set(THETAS) == set(DENSE)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_start_and_names(name):
    s = make(name)
    assert s.name == name or name == "identity"
    th = s.start()
    assert th.shape == (s.n_params,)
    expected = 1.0 if name == "rr" else 0.0  # glmmTMB's defaults
    np.testing.assert_array_equal(np.asarray(th), expected)
    names = s.param_names([f"t{i}" for i in range(s.dim)])
    assert len(names) == s.n_params and len(set(names)) == s.n_params
    assert len(s.param_names()) == s.n_params
    for method in ("cov", "factor", "precision"):
        assert getattr(s, method)(th).shape == (s.dim, s.dim)
    with pytest.raises(ValueError, match="theta of shape"):
        s.cov(jnp.zeros(s.n_params + 1))


@pytest.mark.parametrize("name,i,kind", ALL_THETAS)
def test_cov_factor_and_precision_match_dense(name, i, kind):
    s, th = make(name), theta_of(name, i, kind)
    dense = DENSE[name](th, s)
    cov = np.asarray(s.cov(th))
    scale = np.max(np.abs(dense))
    np.testing.assert_allclose(cov, dense, rtol=1e-12, atol=1e-13 * scale)
    t = np.asarray(s.factor(th))
    assert np.all(np.isfinite(t))
    np.testing.assert_allclose(t @ t.T, dense, rtol=1e-10, atol=1e-12 * scale)
    if kind == "generic":
        inv = np.linalg.pinv(dense) if name == "rr" else np.linalg.inv(dense)
        np.testing.assert_allclose(np.asarray(s.precision(th)), inv, rtol=1e-9,
                                   atol=1e-11 * np.max(np.abs(inv)))


SPARSE = [c for c in ALL_THETAS if isinstance(make(c[0]), cs.AbstractSparsePrecision)]


def test_structure_is_declared_by_type():
    sparse = {n for n in NAMES if isinstance(make(n), cs.AbstractSparsePrecision)}
    assert sparse == {"ar1", "hetar1", "ou", "diag", "homdiag", "identity"}
    assert {n for n in NAMES if isinstance(make(n), cs.AbstractDiagonal)} == {
        "diag", "homdiag", "identity"}


@pytest.mark.parametrize("name,i,kind", SPARSE)
def test_sparse_precision_bands(name, i, kind):
    s, th = make(name), theta_of(name, i, kind)
    d, e = (np.asarray(x) for x in s.precision_bands(th))
    q = np.diag(d) + np.diag(e, 1) + np.diag(e, -1)
    dense = DENSE[name](th, s)
    # Q Sigma = I is the check that stays accurate when Sigma is ill-conditioned
    np.testing.assert_allclose(q @ dense, np.eye(s.dim), atol=1e-8)
    if kind == "generic":
        np.testing.assert_allclose(q, np.linalg.inv(dense), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(float(s.log_det_precision(th)),
                                   -np.linalg.slogdet(dense)[1], rtol=1e-12)


@pytest.mark.parametrize("name,i,kind", [c for c in ALL_THETAS if c[2] == "generic"])
def test_log_density_matches_scipy(name, i, kind):
    s, th = make(name), theta_of(name, i, kind)
    dense = DENSE[name](th, s)
    b = np.asarray(s.sample(jax.random.PRNGKey(3), th, 6)).reshape(2, 3, s.dim)
    mvn = st.multivariate_normal(np.zeros(s.dim), dense, allow_singular=(name == "rr"))
    want = mvn.logpdf(b.reshape(-1, s.dim)).sum()
    got = float(s.log_density(th, b))
    assert abs(got - want) <= 1e-10 * max(1.0, abs(want))
    assert abs(float(s.log_density(th, b[0, 0])) - mvn.logpdf(b[0, 0])) <= 1e-10 * max(1, abs(want))


def _objective(s):
    def f(th, b, w1, w2):
        return s.log_density(th, b) + jnp.sum(w1 * s.factor(th)) + jnp.sum(w2 * s.cov(th))

    return f


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_finite_differences(name):
    s = make(name)
    thetas = np.array(THETAS[name][0] + THETAS[name][1], dtype=float)
    n, p = thetas.shape
    rng = np.random.default_rng(7)
    bs, w1s, w2s = [], [], []
    for th in thetas:  # effects and weights on the scale of each theta's factor
        bs.append(np.asarray(s.sample(jax.random.PRNGKey(1), th, 3)))
        t_scale = np.max(np.abs(np.asarray(s.factor(th))))
        w1s.append(rng.normal(size=(s.dim, s.dim)) / t_scale)
        w2s.append(rng.normal(size=(s.dim, s.dim)) / t_scale**2)
    # one compiled call: value and gradient at each theta and at theta +- h e_j
    h = 1e-5
    steps = np.concatenate([np.zeros((1, p)), h * np.eye(p), -h * np.eye(p)])  # (1 + 2p, p)
    points = (thetas[:, None, :] + steps[None]).reshape(n * (1 + 2 * p), p)
    rep = 1 + 2 * p
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(_objective(s))))(
        points, *(np.repeat(np.stack(a), rep, axis=0) for a in (bs, w1s, w2s)))
    if p == 0:  # equalto: nothing to differentiate
        assert grads.shape == (n, 0)
        return
    values, grads = np.asarray(values).reshape(n, rep), np.asarray(grads).reshape(n, rep, p)
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
    for th, v, g in zip(thetas, values, grads):
        fd = (v[1 : 1 + p] - v[1 + p :]) / (2 * h)
        scale = max([1.0] + list(np.abs(fd)))
        np.testing.assert_allclose(g[0], fd, rtol=2e-5, atol=2e-6 * scale, err_msg=f"theta = {th}")


@pytest.mark.parametrize("name", NAMES)
def test_samples_reproduce_covariance(name):
    s = make(name)
    th = theta_of(name, 0, "generic")
    n = 40_000
    x = np.asarray(s.sample(jax.random.PRNGKey(11), th, n))
    assert x.shape == (n, s.dim)
    sigma = DENSE[name](th, s)
    emp = x.T @ x / n  # mean zero is known
    mc_sd = np.sqrt((np.outer(np.diag(sigma), np.diag(sigma)) + sigma**2) / n)
    assert np.all(np.abs(emp - sigma) <= 5 * mc_sd + 1e-12)


# ---------------------------------------------------------------------------
# glmmTMB 1.1.5


@pytest.mark.parametrize("name", sorted(R_CASES))
def test_report_and_density_match_glmmtmb_115(name):
    s = cs.get(name, dim=4, **{"ou": {"times": [0, 0.5, 1.7, 2.0]},
                               "exp": {"coords": COORDS}, "gau": {"coords": COORDS},
                               "mat": {"coords": COORDS}, "rr": {"d": 2}}.get(name, {}))
    b = np.asarray(R_B).reshape(2, 4)  # column k of glmmTMB's U is level k
    ld0 = None
    for case in R_CASES[name]:
        th, sd, corr_upper, dnll = case[:4]
        rep = s.report(th)
        np.testing.assert_allclose(rep["sd"], sd, rtol=1e-12)
        np.testing.assert_allclose(rep["corr"][np.triu_indices(4, 1)], corr_upper,
                                   rtol=1e-12, atol=1e-14)
        ld = float(s.log_density(th, b))
        ld0 = ld if ld0 is None else ld0
        if name != "rr":  # glmmTMB's rr density is of the spherical u, not of b
            assert abs(-(ld - ld0) - dnll) <= 1e-10 * max(1.0, abs(dnll))
        if name == "rr":
            np.testing.assert_allclose(rep["loadings"], case[4], rtol=1e-14)


def _shared_case(case_id):
    """The reference case file, from a copy in tests/data or from shared/."""
    here = Path(__file__).resolve().parent
    for root in (here / "data" / "cases", here.parent.parent / "shared" / "reference" / "cases",
                 Path("/work/shared/reference/cases")):
        p = root / f"{case_id}.json"
        if p.is_file():
            return json.loads(p.read_text())
    return None


def _topo_coords():
    import tmbx

    df = tmbx.load_dataset("topo")
    xy = sorted({(float(x), float(y)) for x, y in zip(df["x"], df["y"])}, key=lambda p: (p[1], p[0]))
    return np.array(xy)  # numFactor(x, y)'s level order


def _reference_structure(case_id):
    if case_id == "orthodont_ar1":
        return cs.get("ar1", dim=4)
    if case_id == "salamanders_cs":
        return cs.get("cs", dim=7)
    if case_id == "salamanders_rr":
        return cs.get("rr", dim=7, d=1)
    if case_id == "sleepstudy_diag":
        return cs.get("diag", dim=2)
    if case_id == "topo_exp":
        return cs.get("exp", coords=_topo_coords(), dim=52)
    return cs.get("us", dim=2)


@pytest.mark.parametrize("case_id", sorted(REF_THETA))
def test_report_reproduces_reference_varcorr(case_id):
    s = _reference_structure(case_id)
    rep = s.report(REF_THETA[case_id])
    want = REF_VARCORR[case_id]
    np.testing.assert_allclose(rep["sd"], want["sd"], rtol=1e-10)
    if "corr0" in want:
        np.testing.assert_allclose(rep["corr"][0], want["corr0"], rtol=1e-10, atol=1e-12)
    else:
        for j, v in want["corr0_at"].items():
            assert rep["corr"][0, j] == pytest.approx(v, rel=1e-10)
    shared = _shared_case(case_id)
    if shared is not None:  # the whole matrix and the term names' coordinates
        (vc,) = shared["glmmTMB"]["varcorr"]
        np.testing.assert_allclose(rep["sd"], vc["sd"], rtol=1e-10)
        np.testing.assert_allclose(rep["corr"], vc["corr"], rtol=1e-10, atol=1e-12)
        if case_id == "topo_exp":
            parsed = np.array([ast.literal_eval(t[3:]) for t in vc["terms"]], dtype=float)
            np.testing.assert_array_equal(parsed, _topo_coords())
    if case_id == "orthodont_ar1":
        assert rep["rho"] == pytest.approx(want["corr0"][1], rel=1e-10)
    if case_id == "salamanders_cs":
        assert rep["rho"] == pytest.approx(want["corr0"][1], rel=1e-10)
    if case_id == "topo_exp":
        assert rep["range"] == pytest.approx(math.exp(REF_THETA[case_id][1]))


# ---------------------------------------------------------------------------
# pieces


def test_cs_cholesky_stays_finite_at_the_singular_ends():
    xs = jnp.array([-60.0, -30.0, 30.0, 60.0])  # rho -> -1/(k-1) and rho -> 1
    for k in (2, 7):
        s = cs.get("cs", dim=k)
        ths = jnp.concatenate([jnp.zeros((4, k)), xs[:, None]], axis=1)
        t, c, g = jax.jit(jax.vmap(lambda th: (s.factor(th), s.cov(th),
                                               jax.grad(lambda u: jnp.sum(s.factor(u)))(th))))(ths)
        t, c = np.asarray(t), np.asarray(c)
        assert np.all(np.isfinite(t)) and np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.einsum("nij,nkj->nik", t, t), c, atol=1e-12)


def test_log_bessel_k_against_scipy():
    nu = np.geomspace(1e-3, 80.0, 17)[:, None]
    x = np.geomspace(1e-8, 300.0, 23)[None, :]
    got = np.asarray(cs.log_bessel_k(nu, x))
    assert np.all(np.isfinite(got))
    with np.errstate(divide="ignore"):
        want = np.log(sp.kve(nu, x)) - x
    ok = np.isfinite(want)  # scipy overflows for large nu at small x
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-13, atol=1e-13)
    # there: log K_nu(x) -> lgamma(nu) + (nu - 1) log 2 - nu log x as x -> 0
    nu_b, x_b = np.broadcast_arrays(nu, x)
    small = ~ok & (x_b**2 < 1e-13 * nu_b)  # the next term is -x^2 / (4 (nu - 1))
    assert small.sum() > 5
    approx = sp.gammaln(nu_b) + (nu_b - 1) * np.log(2) - nu_b * np.log(x_b)
    np.testing.assert_allclose(got[small], approx[small], rtol=1e-12)
    # derivatives in the order and the argument, against central differences
    pts = [(0.5, 1.0), (2.3, 0.01), (0.05, 1e-6), (30.0, 2.0), (0.7, 300.0), (60.0, 40.0)]
    grad = jax.grad(cs.log_bessel_k, argnums=(0, 1))
    for n, z in pts:
        dn, dz = grad(n, z)
        h = 1e-5 * max(1.0, n)
        fd_n = (np.log(sp.kve(n + h, z)) - np.log(sp.kve(n - h, z))) / (2 * h)
        fd_z = (np.log(sp.kv(n, z * (1 + 1e-6))) - np.log(sp.kv(n, z * (1 - 1e-6)))) / (2e-6 * z)
        assert float(dn) == pytest.approx(fd_n, rel=1e-7, abs=1e-8)
        assert float(dz) == pytest.approx(fd_z, rel=1e-7)


def test_matern_with_smoothness_one_half_is_exponential():
    mat, ex = cs.get("mat", coords=COORDS, dim=4), cs.get("exp", coords=COORDS, dim=4)
    th = np.array([0.2, -0.4, math.log(0.5)])
    np.testing.assert_allclose(np.asarray(mat.cov(th)), np.asarray(ex.cov(th[:2])), rtol=1e-13)
    rep = mat.report(th)
    assert rep["range"] == pytest.approx(math.exp(-0.4)) and rep["smoothness"] == pytest.approx(0.5)


def test_unstructured_round_trip_with_put_cor():
    s = cs.get("us", dim=4)
    th = np.array(THETAS["us"][0][0])
    corr = s.report(th)["corr"]
    np.testing.assert_allclose(cs.corr_to_theta(corr), th[4:], rtol=1e-12)
    # k = 2: glmmTMB's rho = x / sqrt(1 + x^2)
    rep = cs.get("us", dim=2).report([0.0, 0.0, 0.75])
    assert rep["corr"][0, 1] == pytest.approx(0.6)


def test_known_matrix_glmmtmb_theta():
    s = cs.get("propto", dim=4, matrix=_M)
    full = s.glmmtmb_theta([0.3])
    assert full.shape == (4 + 6 + 1,)
    np.testing.assert_allclose(dense_us(full[:-1], 4), _M, rtol=1e-12, atol=1e-15)
    assert s.report([0.3])["lambda"] == pytest.approx(math.exp(0.3))


def test_structures_work_under_jit_and_vmap():

    s = make("ar1")
    b = np.ones((3, s.dim))
    f = eqx.filter_jit(lambda s, th: s.log_density(th, b))
    thetas = jnp.array([[0.0, 0.1], [0.3, -0.5]])
    v = jax.vmap(lambda th: f(s, th))(thetas)
    assert v.shape == (2,) and np.allclose(np.asarray(v)[1], float(s.log_density(thetas[1], b)))


# ---------------------------------------------------------------------------
# registry


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match="Did you mean 'ar1'"):
        cs.get("ar2", dim=3)
    with pytest.raises(TypeError):
        cs.get(3, dim=2)


def test_bad_arguments_fail_at_once():
    with pytest.raises(ValueError, match="dim"):
        cs.get("us", dim=0)
    with pytest.raises(ValueError, match="strictly increasing"):
        cs.get("ou", dim=3, times=[0.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="coords"):
        cs.get("exp", dim=3)
    with pytest.raises(ValueError, match="rank d"):
        cs.get("rr", dim=3, d=4)
    with pytest.raises(ValueError, match="positive definite"):
        cs.get("propto", dim=2, matrix=[[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match="shape"):
        make("us").log_density(jnp.zeros(10), jnp.zeros(3))


class _Linear(cs.CovStruct):
    """A user-defined structure: cov_ij = s^2 (1 + t_i t_j), theta = (log s,)."""

    dim: int
    t: np.ndarray
    name = "linear_test"

    def __init__(self, dim, t):
        self.dim, self.t = dim, np.asarray(t, dtype=float)

    @property
    def n_params(self):
        return 1

    def cov(self, theta):
        theta = self._theta(theta)
        return jnp.exp(2 * theta[0]) * (jnp.eye(self.dim) + jnp.outer(self.t, self.t))


def test_user_defined_structure_without_touching_tmbx():
    t = [0.0, 1.0, 2.0]
    s = cs.get(_Linear, dim=3, t=t)
    assert cs.get(s) is s
    th = jnp.array([0.2])
    dense = np.exp(0.4) * (np.eye(3) + np.outer(t, t))
    b = np.array([[0.1, -0.2, 0.3], [1.0, 0.0, -1.0]])
    want = st.multivariate_normal(np.zeros(3), dense).logpdf(b).sum()
    assert float(s.log_density(th, b)) == pytest.approx(want, rel=1e-12)
    tt = np.asarray(s.factor(th))
    np.testing.assert_allclose(tt @ tt.T, dense, rtol=1e-12)
    assert s.report(th)["sd"].shape == (3,)
    cs.register("linear_test")(_Linear)
    try:
        assert isinstance(cs.get("linear_test", dim=3, t=t), _Linear)
    finally:
        cs.registry._table.pop("linear_test")


def test_covstructs_reach_the_core_only_by_relative_import():
    root = Path(cs.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith(("tmbx", "families", "covstructs")), path
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module == "_internal", path
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] in ("tmbx", "families", "covstructs")
                               for a in node.names), path
