"""Response families (tmbx.families) against scipy.stats, closed forms and glmmTMB 1.1.5.

One table (CASES) drives every check; adding a family adds one entry. Each
family's functions are jitted once (cached per case) and evaluated on a grid.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate as integrate
import scipy.optimize as optimize
import scipy.special as sp
import scipy.stats as st
import tmbx.families as F


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    """Strict JAX in these tests (float64 comes from importing tmbx)."""
    with jax.numpy_rank_promotion("raise"):
        yield


LINK_INV = {
    "identity": lambda e: e,
    "log": np.exp,
    "logit": sp.expit,
    "probit": st.norm.cdf,
    "cloglog": lambda e: -np.expm1(-np.exp(e)),
    "inverse": lambda e: 1.0 / e,
    "sqrt": lambda e: e * e,
}


# --------------------------------------------------------------- references
def _bell_numbers(n_max: int) -> np.ndarray:
    """log B_n for n <= n_max, exactly (Bell triangle in Python integers)."""
    out, row = [0.0], [1]
    for _ in range(n_max):
        new = [row[-1]]
        for v in row:
            new.append(new[-1] + v)
        row = new
        out.append(math.log(row[0]))
    return np.asarray(out)


LOG_BELL = _bell_numbers(400)


def _compois_ref(y, mu, nu):
    """COM-Poisson log pmf by direct summation; lambda by root finding on the mean."""
    ll, log_z = _compois_lambda(float(mu), float(nu))
    return y * ll - nu * sp.gammaln(y + 1.0) - log_z


@functools.cache
def _compois_lambda(mu, nu, n_terms=3000):
    j = np.arange(n_terms)
    lg = sp.gammaln(j + 1.0)

    def log_mean(ll):
        t = j * ll - nu * lg
        w = np.exp(t - sp.logsumexp(t))
        return np.log(np.sum(w * j))

    lo, hi = -60.0, 60.0
    ll = optimize.brentq(lambda a: log_mean(a) - np.log(mu), lo, hi, xtol=1e-15, rtol=1e-15)
    return ll, sp.logsumexp(j * ll - nu * lg)


def _tweedie_ref(y, mu, phi, p):
    """Tweedie log density by the Dunn-Smyth series summed directly over j = 1..20000."""
    if y == 0:
        return -(mu ** (2 - p)) / (phi * (2 - p))
    j = np.arange(1, 20000)
    s = (2 - p) / (p - 1)
    z = s * np.log(y) - s * np.log(p - 1) - (1 + s) * np.log(phi) - np.log(2 - p)
    log_w = sp.logsumexp(j * z - sp.gammaln(j + 1) - sp.gammaln(j * s))
    return log_w - np.log(y) - y * mu ** (1 - p) / (phi * (p - 1)) - mu ** (2 - p) / (phi * (2 - p))


def _genpois_ref(y, mu, phi):
    theta, lam = mu / np.sqrt(phi), 1 - 1 / np.sqrt(phi)
    return np.log(theta) + (y - 1) * np.log(theta + lam * y) - theta - lam * y - sp.gammaln(y + 1)


def _ordbeta_ref(y, eta, phi, k):
    mu = sp.expit(eta)
    if y == 0:
        return np.log1p(-sp.expit(eta - k[0]))
    if y == 1:
        return np.log(sp.expit(eta - k[1]))
    mid = sp.expit(eta - k[0]) - sp.expit(eta - k[1])
    return np.log(mid) + st.beta.logpdf(y, mu * phi, (1 - mu) * phi)


def _skewnorm_ref(y, mu, sigma, alpha):
    delta = alpha / np.sqrt(1 + alpha**2)
    omega = sigma / np.sqrt(1 - 2 / np.pi * delta**2)
    xi = mu - omega * delta * np.sqrt(2 / np.pi)
    return st.skewnorm.logpdf(y, alpha, loc=xi, scale=omega)


def _lognormal_ref(y, mu, sd):
    s2 = np.log1p((sd / mu) ** 2)
    return st.lognorm.logpdf(y, np.sqrt(s2), scale=np.exp(np.log(mu) - s2 / 2))


def _nb(y, size, mu):
    return st.nbinom.logpmf(y, size, size / (size + mu))


# ------------------------------------------------------------------- table
@dataclasses.dataclass(frozen=True)
class Case:
    """One family under test.

    make: builds the family; eta/disp/psi: parameter grid (psi: list of vectors);
    ys(mu): responses to evaluate at mean mu; ref(y, mu, eta, disp, psi, trials):
    reference log density (numpy, scalar); kind: "count", "continuous",
    "tweedie" or "ordbeta"; support: integration range for continuous
    families; samples: (eta, disp, psi) points for the sampling check;
    extreme: eta = +/-50 must stay finite.
    """

    name: str
    make: Callable
    eta: tuple
    disp: tuple
    ref: Callable
    kind: str
    ys: Callable
    psi: tuple = (None,)
    trials: float | None = None
    support: tuple = (-np.inf, np.inf)
    samples: tuple = ()
    extreme: bool = True
    n_samples: int = 50_000

    def __repr__(self):
        return self.name


def counts(mu):
    m = float(mu)
    return [0.0, 1.0, 2.0, float(np.floor(m)), float(np.floor(2 * m + 3))]


def positive(mu):
    return [0.01 * mu, 0.3 * mu, mu, 2.5 * mu]


def real_line(mu):
    return [mu - 3.0, mu - 0.4, mu, mu + 2.2]


def unit(mu):
    return [0.02, 0.3, float(mu), 0.97]


E_LOG = (-3.0, 0.0, 1.5, 4.0)
D_MOD = (-2.0, 0.0, 1.5)
TRIALS = 12.0

CASES = [
    Case("gaussian", F.Gaussian, (-2.0, 0.0, 3.0), (-4.0, 0.0, 3.0),
         lambda y, mu, e, d, p, n: st.norm.logpdf(y, mu, np.exp(d / 2)), "continuous", real_line,
         samples=((1.0, 0.5, None),)),
    Case("poisson", F.Poisson, E_LOG + (7.0,), (0.0,),
         lambda y, mu, e, d, p, n: st.poisson.logpmf(y, mu), "count", counts,
         samples=((1.2, 0.0, None),)),
    Case("binomial", F.Binomial, (-6.0, -1.0, 0.5, 4.0), (0.0,),
         lambda y, mu, e, d, p, n: st.binom.logpmf(y, n, mu), "count",
         lambda mu: [0.0, 1.0, float(np.floor(mu * TRIALS)), TRIALS], trials=TRIALS,
         samples=((0.3, 0.0, None),)),
    Case("betabinomial", F.BetaBinomial, (-3.0, 0.0, 2.0), (-2.0, 1.0, 5.0),
         lambda y, mu, e, d, p, n: st.betabinom.logpmf(y, n, mu * np.exp(d), (1 - mu) * np.exp(d)), "count",
         lambda mu: [0.0, 1.0, float(np.floor(mu * TRIALS)), TRIALS], trials=TRIALS,
         samples=((0.3, 0.5, None),)),
    Case("Gamma(link='log')", lambda: F.Gamma("log"), (-3.0, 0.0, 4.0), (-2.0, 0.0, 3.0),
         lambda y, mu, e, d, p, n: st.gamma.logpdf(y, np.exp(d), scale=mu / np.exp(d)), "continuous", positive,
         support=(0.0, np.inf), samples=((0.5, 0.7, None),)),
    Case("Gamma", F.Gamma, (0.1, 1.0, 5.0), (-2.0, 0.0, 3.0),
         lambda y, mu, e, d, p, n: st.gamma.logpdf(y, np.exp(d), scale=mu / np.exp(d)), "continuous", positive,
         support=(0.0, np.inf), extreme=False),
    Case("beta_family", F.Beta, (-4.0, 0.0, 2.5), (-1.0, 1.0, 4.0),
         lambda y, mu, e, d, p, n: st.beta.logpdf(y, mu * np.exp(d), (1 - mu) * np.exp(d)), "continuous", unit,
         support=(0.0, 1.0), samples=((0.4, 1.5, None),)),
    Case("ordbeta", F.OrderedBeta, (-2.0, 0.3, 2.5), (-1.0, 1.0, 3.0),
         lambda y, mu, e, d, p, n: _ordbeta_ref(y, e, np.exp(d), p), "ordbeta",
         lambda mu: [0.0, 0.2, float(mu), 0.9, 1.0], psi=((-1.0, 1.0), (-3.0, 0.5)),
         samples=((0.4, 1.5, (-1.0, 1.0)),)),
    Case("nbinom2", F.NegativeBinomial2, E_LOG + (7.0,), (-3.0, 0.0, 4.0),
         lambda y, mu, e, d, p, n: _nb(y, np.exp(d), mu), "count", counts,
         samples=((1.2, 0.3, None),)),
    Case("nbinom1", F.NegativeBinomial1, E_LOG + (7.0,), (-3.0, 0.0, 2.0),
         lambda y, mu, e, d, p, n: _nb(y, mu / np.exp(d), mu), "count", counts,
         samples=((1.2, 0.3, None),)),
    Case("nbinom12", F.NegativeBinomial12, E_LOG, (-2.0, 0.0, 1.0),
         lambda y, mu, e, d, p, n: _nb(y, mu / (np.exp(d) + mu / np.exp(p[0])), mu), "count", counts,
         psi=((0.0,), (3.0,)), samples=((1.2, -0.5, (0.5,)),)),
    Case("genpois", F.GeneralizedPoisson, E_LOG, (0.0, 0.7, 2.5),
         lambda y, mu, e, d, p, n: _genpois_ref(y, mu, np.exp(d)), "count", counts,
         samples=((1.2, 0.5, None),)),
    Case("compois", F.ConwayMaxwellPoisson, (-3.0, 0.0, 1.5, 3.5), (-1.5, 0.0, 1.2),
         lambda y, mu, e, d, p, n: _compois_ref(y, mu, np.exp(-d)), "count", counts,
         samples=((1.5, -1.0, None),), n_samples=20_000),
    Case("tweedie", F.Tweedie, (-2.0, 0.0, 2.0), (-2.0, 0.0, 1.0),
         lambda y, mu, e, d, p, n: _tweedie_ref(y, mu, np.exp(d), 1 + sp.expit(p[0])), "tweedie",
         lambda mu: [0.0, 0.05 * mu, mu, 3.0 * mu], psi=((0.0,), (-2.5,), (2.5,)),
         samples=((0.5, 0.2, (0.3,)),)),
    Case("lognormal", F.LogNormal, (-2.0, 0.0, 3.0), (-2.0, 0.0, 2.0),
         lambda y, mu, e, d, p, n: _lognormal_ref(y, mu, np.exp(d)), "continuous", positive,
         support=(0.0, np.inf), samples=((0.5, -0.3, None),)),
    Case("t_family", F.StudentT, (-2.0, 0.0, 3.0), (-2.0, 0.0, 2.0),
         lambda y, mu, e, d, p, n: st.t.logpdf(y, np.exp(p[0]), loc=mu, scale=np.exp(d)), "continuous",
         real_line, psi=((0.0,), (1.5,), (4.0,)), samples=((1.0, 0.5, (2.0,)),)),
    Case("skewnormal", F.SkewNormal, (-2.0, 0.0, 3.0), (-2.0, 0.0, 2.0),
         lambda y, mu, e, d, p, n: _skewnorm_ref(y, mu, np.exp(d), p[0]), "continuous", real_line,
         psi=((0.0,), (-3.0,), (6.0,)), samples=((1.0, 0.5, (3.0,)),)),
    Case("bell", F.Bell, (-3.0, 0.0, 1.5, 3.0), (0.0,),
         lambda y, mu, e, d, p, n: (y * np.log(sp.lambertw(mu).real) - np.expm1(sp.lambertw(mu).real)
                                    + LOG_BELL[int(y)] - sp.gammaln(y + 1)), "count", counts,
         samples=((1.2, 0.0, None),)),
    Case("truncated_poisson", lambda: F.get("truncated_poisson"), (-3.0, 0.0, 1.5, 4.0), (0.0,),
         lambda y, mu, e, d, p, n: st.poisson.logpmf(y, mu) - np.log(-np.expm1(-mu)), "count",
         lambda mu: [1.0, 2.0, float(np.floor(mu)) + 1, float(np.floor(2 * mu + 3))],
         samples=((0.2, 0.0, None),)),
    Case("truncated_nbinom2", lambda: F.get("truncated_nbinom2"), (-3.0, 0.0, 1.5, 4.0), (-2.0, 0.0, 3.0),
         lambda y, mu, e, d, p, n: _nb(y, np.exp(d), mu) - np.log1p(-np.exp(_nb(0, np.exp(d), mu))), "count",
         lambda mu: [1.0, 2.0, float(np.floor(mu)) + 1, float(np.floor(2 * mu + 3))],
         samples=((0.2, 0.3, None),)),
    Case("truncated_nbinom1", lambda: F.get("truncated_nbinom1"), (-3.0, 0.0, 1.5, 4.0), (-2.0, 0.0, 2.0),
         lambda y, mu, e, d, p, n: (_nb(y, mu / np.exp(d), mu)
                                    - np.log1p(-np.exp(_nb(0, mu / np.exp(d), mu)))), "count",
         lambda mu: [1.0, 2.0, float(np.floor(mu)) + 1, float(np.floor(2 * mu + 3))],
         samples=((0.2, 0.3, None),)),
    Case("truncated_genpois", lambda: F.get("truncated_genpois"), (-3.0, 0.0, 1.5, 3.0), (0.0, 0.7, 2.0),
         lambda y, mu, e, d, p, n: _genpois_ref(y, mu, np.exp(d)) - np.log(-np.expm1(-mu / np.sqrt(np.exp(d)))),
         "count",
         lambda mu: [1.0, 2.0, float(np.floor(mu)) + 1, float(np.floor(2 * mu + 3))],
         samples=((0.2, 0.3, None),)),
    Case("truncated_compois", lambda: F.get("truncated_compois"), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0),
         lambda y, mu, e, d, p, n: (_compois_ref(y, mu, np.exp(-d))
                                    - np.log1p(-np.exp(_compois_ref(0.0, mu, np.exp(-d))))), "count",
         lambda mu: [1.0, 2.0, float(np.floor(mu)) + 1, float(np.floor(2 * mu + 3))],
         samples=((0.2, 0.3, None),), n_samples=20_000),
]
CASE_IDS = [c.name for c in CASES]


def _base_name(name: str) -> str:
    return name.split("(")[0]


def test_table_covers_the_registry():
    """Every registered family name is under test (aliases count once)."""
    tested = {type(F.get(c.name)).__name__ + getattr(F.get(c.name), "base", F.get(c.name)).name for c in CASES}
    for name in F.registry.names():
        fam = F.get(name)
        assert type(fam).__name__ + getattr(fam, "base", fam).name in tested, name


# ------------------------------------------------------------ compiled bits
@functools.cache
def family(name):
    return next(c for c in CASES if c.name == name).make()


@functools.cache
def compiled(name):
    """One jitted function per family: per-observation log_prob and its gradients.

    Every test evaluates it on arrays of the family's grid size (``evaluate``
    pads), so each family compiles once.
    """
    fam = family(name)

    def lp(y, eta, disp, psi, trials):
        return fam.log_prob(y, eta, disp=disp, psi=psi, trials=trials)

    def both(y, eta, disp, psi, trials):
        total = lambda e, d, p: jnp.sum(lp(y, e, d, p, trials))  # noqa: E731
        return lp(y, eta, disp, psi, trials), jax.grad(total, argnums=(0, 1, 2))(eta, disp, psi)

    return jax.jit(both)


@functools.cache
def grid_size(name):
    return grid(next(c for c in CASES if c.name == name))[0][0].size


def evaluate(case, y, eta, disp, psi=None):
    """``(log_prob, d/deta, d/ddisp, d sum/dpsi)`` at any number of points, in
    chunks of the grid size (padded with the last point: no recompilation)."""
    size = grid_size(case.name)
    y, eta, disp = np.broadcast_arrays(*(np.atleast_1d(np.asarray(a, float)) for a in (y, eta, disp)))
    n = y.size
    chunks = []
    for start in range(0, n, size):
        idx = np.minimum(np.arange(start, start + size), n - 1)
        vals, (g_eta, g_disp, g_psi) = compiled(case.name)(
            y[idx], eta[idx], disp[idx], _psi(psi), _trials(case, size)
        )
        keep = slice(0, min(size, n - start))
        chunks.append((np.asarray(vals)[keep], np.asarray(g_eta)[keep], np.asarray(g_disp)[keep], g_psi))
    return tuple(np.concatenate([c[k] for c in chunks]) for k in range(3)) + (chunks[0][3],)


def density(case, eta, disp, psi):
    """Scalar density/mass function for scipy.integrate."""
    return lambda v: float(np.exp(evaluate(case, v, eta, disp, psi)[0][0]))


def grid(case):
    """All (y, eta, disp, psi) combinations of a case, as flat arrays per psi."""
    fam = family(case.name)
    out = []
    for psi in case.psi:
        psi_a = None if psi is None else jnp.asarray(psi, float)
        rows = []
        for eta in case.eta:
            for disp in case.disp:
                mu = float(fam.mean(eta, disp=disp, psi=psi_a, trials=case.trials))
                mu = mu if np.isfinite(mu) else float(fam.link.inverse(eta))  # t with df <= 1
                rows += [(y, eta, disp, mu) for y in case.ys(mu)]
        y, eta, disp, mu = (np.asarray(v, float) for v in zip(*rows))
        out.append((y, eta, disp, mu, psi))
    return out


def _psi(psi):
    return None if psi is None else jnp.asarray(psi, float)


def _trials(case, n):
    return None if case.trials is None else jnp.full((n,), case.trials)


# ------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_log_prob_matches_reference(case):
    fam = family(case.name)
    for y, eta, disp, mu, psi in grid(case):
        got = evaluate(case, y, eta, disp, psi)[0]
        mu_np = LINK_INV[fam.link.name](eta)  # the base family's mean for truncated ones
        ref = np.array([case.ref(*args, psi, case.trials) for args in zip(y, mu_np, eta, disp)])
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10, err_msg=f"{case.name} psi={psi}")


#: families whose log density splits off a data-only part (`Family.log_norm`)
SPLIT = {"poisson", "binomial", "nbinom1", "nbinom2", "nbinom12", "genpois", "bell", "betabinomial"}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_log_prob_with_precomputed_norm_matches_reference(case):
    """``log_prob(..., norm=log_norm(y))`` (what a fit evaluates) against scipy,
    and its derivative in eta against the plain `log_prob`'s."""
    fam = family(case.name)
    base = getattr(fam, "base", fam).name
    for y, eta, disp, mu, psi in grid(case):
        trials = None if case.trials is None else jnp.full(y.shape, case.trials)
        norm = fam.log_norm(y, trials)
        assert (norm is not None) == (base in SPLIT) == fam.has_norm, case.name
        if norm is None:
            continue
        kw = dict(disp=jnp.asarray(disp), psi=_psi(psi), trials=trials)
        got = fam.log_prob(y, eta, norm=norm, **kw)
        full = fam.log_prob(y, eta, **kw)
        np.testing.assert_allclose(got, full, rtol=1e-12, atol=1e-12, err_msg=case.name)
        mu_np = LINK_INV[fam.link.name](eta)
        ref = np.array([case.ref(*args, psi, case.trials) for args in zip(y, mu_np, eta, disp)])
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10, err_msg=case.name)
        finite = np.isfinite(np.asarray(full))
        grad = lambda nm: jax.grad(lambda e: jnp.sum(jnp.where(finite, fam.log_prob(y, e, norm=nm, **kw), 0.0)))
        np.testing.assert_allclose(grad(norm)(jnp.asarray(eta)), grad(None)(jnp.asarray(eta)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in CASES if c.disp != (0.0,)], ids=[c.name for c in CASES if c.disp != (0.0,)])
def test_a_scalar_dispersion_is_the_same_as_one_per_row(case):
    """The formula front end passes an intercept-only dispersion model as one value
    (glmmTMB's ``dispformula = ~1``): every family broadcasts it as a column of it."""
    fam = family(case.name)
    if not fam.has_disp:
        pytest.skip("no dispersion")
    for y, eta, disp, mu, psi in grid(case):
        trials = None if case.trials is None else jnp.full(y.shape, case.trials)
        kw = dict(psi=_psi(psi), trials=trials)
        d0 = float(disp[0])
        one = fam.log_prob(y, eta, disp=jnp.asarray(d0), **kw)
        rows = fam.log_prob(y, eta, disp=jnp.full(y.shape, d0), **kw)
        np.testing.assert_allclose(one, rows, rtol=1e-14, atol=1e-14, err_msg=case.name)


@pytest.mark.parametrize("wrapper", ["ZeroInflated", "Hurdle"])
def test_zero_wrappers_take_one_zero_probability(wrapper):
    """An intercept-only ``ziformula = ~1`` reaches the wrappers as one value."""
    from tmbx import families as F

    fam = getattr(F, wrapper)("nbinom2")
    rng = np.random.default_rng(4)
    y = np.where(rng.random(30) < 0.3, 0.0, rng.integers(1, 6, 30).astype(float))
    eta, disp = jnp.asarray(rng.normal(size=30)), jnp.asarray(0.3)
    np.testing.assert_allclose(fam.log_prob(y, eta, disp=disp, zi=jnp.asarray(-0.4)),
                               fam.log_prob(y, eta, disp=disp, zi=jnp.full(30, -0.4)), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("wrapper", ["ZeroInflated", "Hurdle"])
@pytest.mark.parametrize("base", ["poisson", "nbinom2", "binomial", "Gamma"])
def test_zero_wrappers_with_precomputed_norm(wrapper, base):
    """The wrappers' `log_norm` is the base's at positive responses and 0 at the
    zeros, where the wrapper's own zero mass stands."""
    from tmbx import families as F

    fam = getattr(F, wrapper)(base)
    rng = np.random.default_rng(3)
    y = np.where(rng.random(40) < 0.3, 0.0, rng.integers(1, 6, 40).astype(float))
    if base == "Gamma":
        y = np.where(y > 0, y + 0.37, 0.0)
    trials = jnp.full(y.shape, 7.0) if base == "binomial" else None
    kw = dict(disp=jnp.asarray(0.4), zi=jnp.asarray(rng.normal(size=40)), trials=trials)
    eta = jnp.asarray(rng.normal(size=40) * (0.5 if base == "binomial" else 1.0))
    norm = fam.log_norm(y, trials)
    assert fam.has_norm == (norm is not None)
    if base == "Gamma":
        assert norm is None
        return
    np.testing.assert_array_equal(np.asarray(norm)[y == 0], 0.0)
    np.testing.assert_allclose(fam.log_prob(y, eta, norm=norm, **kw), fam.log_prob(y, eta, **kw),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")  # the totals are asserted
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_normalized(case):
    """Masses sum to 1 over a long support; densities integrate to 1 (plus point masses)."""
    fam = family(case.name)
    psi = _psi(case.psi[0])
    points = [(case.eta[1], case.disp[0]), (case.eta[-2], case.disp[-1])]
    if case.kind == "count":
        top = 2000.0 if case.trials is None else case.trials
        y = jnp.arange(0.0, top + 1.0)
        for eta, disp in points:
            lp = fam.log_prob(y, eta, disp=disp, psi=psi, trials=case.trials)
            assert abs(float(jnp.sum(jnp.exp(lp))) - 1.0) < 1e-10, (eta, disp)
        return
    for eta, disp in points:
        dens = density(case, eta, disp, case.psi[0])
        mass = 0.0
        lo, hi = case.support
        if case.kind == "tweedie":
            mass += dens(0.0)
            lo, hi = 0.0, np.inf
        if case.kind == "ordbeta":
            mass += dens(0.0) + dens(1.0)
            lo, hi = 0.0, 1.0
        mean = float(fam.link.inverse(eta))  # a split point inside the support
        if np.isinf(lo) and np.isinf(hi):
            parts = [(-np.inf, mean), (mean, np.inf)]
        elif np.isinf(hi):
            parts = [(lo, mean), (mean, np.inf)]
        else:
            parts = [(lo, mean), (mean, hi)]
        for a, b in parts:
            mass += integrate.quad(dens, a, b, epsabs=1e-12, epsrel=1e-11, limit=200)[0]
        assert abs(mass - 1.0) < 1e-8, (eta, disp, mass)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_finite_and_match_finite_differences(case):
    for y, eta, disp, mu, psi in grid(case)[:2]:
        _, g_eta, g_disp, g_psi = evaluate(case, y, eta, disp, psi)
        assert np.all(np.isfinite(g_eta)) and np.all(np.isfinite(g_disp)), case.name

        def f(e, d, p):
            return evaluate(case, y, e, d, p)[0]

        h = 1e-5
        fd_eta = (f(eta + h, disp, psi) - f(eta - h, disp, psi)) / (2 * h)
        np.testing.assert_allclose(g_eta, fd_eta, rtol=2e-5, atol=2e-5 * (1 + np.abs(fd_eta).max()))
        if family(case.name).has_disp:
            fd_disp = (f(eta, disp + h, psi) - f(eta, disp - h, psi)) / (2 * h)
            np.testing.assert_allclose(g_disp, fd_disp, rtol=2e-5, atol=2e-5 * (1 + np.abs(fd_disp).max()))
        if psi is not None:
            assert np.all(np.isfinite(g_psi))
            for k in range(len(psi)):
                e_k = np.zeros(len(psi))
                e_k[k] = h
                fd = (f(eta, disp, np.add(psi, e_k)).sum() - f(eta, disp, np.subtract(psi, e_k)).sum()) / (2 * h)
                assert abs(float(g_psi[k]) - fd) < 2e-5 * (1 + abs(fd)), (k, g_psi, fd)


# eta = +/-50 matters for log and logit links (with the identity link eta is the mean).
EXTREME = [c for c in CASES if c.extreme and c.make().link.name in ("log", "logit")]


@pytest.mark.parametrize("case", EXTREME, ids=[c.name for c in EXTREME])
def test_extreme_linear_predictor_stays_finite(case):
    """eta = +/-50 (log/logit links): log_prob and its gradients are finite."""
    eta = jnp.array([-50.0, -50.0, 50.0, 50.0])
    disp = jnp.full((4,), case.disp[len(case.disp) // 2])
    if case.kind == "count":
        top = 1.0 if case.trials is None else case.trials
        y = jnp.array([1.0, 2.0, top, top + 5.0 if case.trials is None else top])
    elif case.kind == "ordbeta" or case.support == (0.0, 1.0):
        y = jnp.array([0.3, 0.01, 0.99, 0.5])
    else:
        y = jnp.array([0.5, 1e-3, 2.0, 1e20])
    val, g_eta, g_disp, _ = evaluate(case, y, eta, disp, case.psi[0])
    assert np.all(np.isfinite(val)), val
    assert np.all(np.isfinite(g_eta)) and np.all(np.isfinite(g_disp)), (g_eta, g_disp)


@pytest.mark.parametrize("case", [c for c in CASES if c.samples], ids=[c.name for c in CASES if c.samples])
def test_sample_matches_mean_and_variance(case):
    """Many draws (50,000; fewer for the slow samplers): sample mean and variance
    within 5 Monte Carlo standard errors."""
    fam = family(case.name)
    n = case.n_samples
    key = jax.random.PRNGKey(20240601)
    for eta, disp, psi in case.samples:
        psi_a = _psi(psi)
        draws = fam.sample(key, jnp.full((n,), eta), disp=disp, psi=psi_a, trials=case.trials)
        x = np.asarray(draws, dtype=float)
        if case.trials is not None:
            x = x / case.trials
        mean = float(fam.mean(eta, disp=disp, psi=psi_a, trials=case.trials))
        var = float(fam.variance(eta, disp=disp, psi=psi_a, trials=case.trials))
        se_mean = math.sqrt(var / n)
        m4 = np.mean((x - x.mean()) ** 4)
        se_var = math.sqrt(max(m4 - var**2, 1e-300) / n)
        assert abs(x.mean() - mean) < 5 * se_mean, (case.name, x.mean(), mean)
        assert abs(x.var() - var) < 5 * se_var, (case.name, x.var(), var)
        fam.check_support(np.asarray(draws), None if case.trials is None else np.full(n, case.trials))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cdf_agrees_with_log_prob(case):
    """cdf = running sum of the masses (counts) or the integral of the density."""
    fam = family(case.name)
    psi = _psi(case.psi[0])
    eta, disp = case.eta[1], case.disp[-1]
    if case.kind == "count":
        y = jnp.arange(0.0, 30.0)
        pmf = np.exp(np.asarray(fam.log_prob(y, eta, disp=disp, psi=psi, trials=case.trials)))
        cdf = np.asarray(fam.cdf(y, eta, disp=disp, psi=psi, trials=case.trials))
        np.testing.assert_allclose(cdf, np.minimum(np.cumsum(pmf), 1.0), rtol=1e-9, atol=1e-12)
        return
    dens = density(case, eta, disp, case.psi[0])
    mean = float(fam.link.inverse(eta))
    qs = [mean * 0.5, mean, mean + 1.0] if case.kind != "ordbeta" and case.support != (0.0, 1.0) else [0.3, 0.7]
    lo = case.support[0] if case.kind not in ("tweedie", "ordbeta") else 0.0
    point = 0.0
    if case.kind in ("tweedie", "ordbeta"):
        point = dens(0.0)
    for q in qs:
        got = float(fam.cdf(q, eta, disp=disp, psi=psi))
        ref = point + integrate.quad(dens, lo, q, epsabs=1e-12, limit=200)[0]
        assert abs(got - ref) < 1e-7, (q, got, ref)


# ------------------------------------------------------------------ limits
def test_zero_inflation_with_zero_probability_is_the_base():
    base = F.NegativeBinomial2()
    zi_fam = F.ZeroInflated(base)
    y = jnp.array([0.0, 0.0, 1.0, 5.0, 40.0])
    eta = jnp.array([-1.0, 2.0, 0.5, 1.0, 3.0])
    got = zi_fam.log_prob(y, eta, disp=0.3, zi=-jnp.inf)
    np.testing.assert_allclose(got, base.log_prob(y, eta, disp=0.3), rtol=1e-14)
    got = zi_fam.log_prob(y, eta, disp=0.3, zi=-40.0)
    np.testing.assert_allclose(got, base.log_prob(y, eta, disp=0.3), rtol=1e-12, atol=1e-12)
    assert np.allclose(zi_fam.mean(eta, disp=0.3, zi=-jnp.inf), base.mean(eta, disp=0.3))


def test_zero_inflation_formula():
    base, zi = F.Poisson(), 0.4
    pz = sp.expit(zi)
    fam = F.ZeroInflated(base)
    y = jnp.arange(0.0, 8.0)
    got = np.exp(np.asarray(fam.log_prob(y, 0.7, zi=zi)))
    ref = (1 - pz) * st.poisson.pmf(np.arange(8), np.exp(0.7)) + pz * (np.arange(8) == 0)
    np.testing.assert_allclose(got, ref, rtol=1e-13)
    # Gamma (glmmTMB's ziGamma): zeros get probability pz only.
    gz = F.ZeroInflated(F.Gamma("log"))
    assert abs(float(gz.log_prob(0.0, 0.3, disp=1.0, zi=zi)) - math.log(pz)) < 1e-14
    assert np.isfinite(jax.grad(lambda e: gz.log_prob(jnp.array([0.0, 2.0]), e, disp=1.0, zi=zi).sum())(0.3))


def test_nbinom2_with_huge_theta_is_poisson():
    y = jnp.array([0.0, 1.0, 4.0, 17.0, 60.0])
    eta = jnp.log(jnp.array([0.3, 2.0, 5.0, 15.0, 50.0]))
    pois = F.Poisson().log_prob(y, eta)
    for log_theta, tol in [(25.0, 1e-8), (40.0, 1e-12), (50.0, 1e-12)]:
        nb = F.NegativeBinomial2().log_prob(y, eta, disp=log_theta)
        np.testing.assert_allclose(nb, pois, rtol=tol, atol=tol)


def test_compois_with_nu_one_is_poisson():
    y = jnp.array([0.0, 1.0, 4.0, 17.0, 260.0])
    eta = jnp.log(jnp.array([0.3, 2.0, 5.0, 15.0, 250.0]))
    np.testing.assert_allclose(
        F.ConwayMaxwellPoisson().log_prob(y, eta, disp=0.0), F.Poisson().log_prob(y, eta), rtol=1e-12
    )


@pytest.mark.parametrize("name", ["truncated_poisson", "truncated_nbinom1", "truncated_nbinom2",
                                  "truncated_genpois", "truncated_compois"])
def test_truncated_renormalizes_and_hurdle_is_zero_inflated_truncated(name):
    fam = F.get(name)
    base = fam.base
    disp = 0.4 if base.has_disp else None
    y = jnp.arange(1.0, 400.0)
    eta = jnp.full(y.shape, 1.1)
    lp = fam.log_prob(y, eta, disp=disp)
    assert abs(float(jnp.sum(jnp.exp(lp))) - 1.0) < 1e-10
    log_p0 = base.log_prob(0.0, 1.1, disp=disp)
    np.testing.assert_allclose(lp, base.log_prob(y, eta, disp=disp) - np.log1p(-np.exp(log_p0)), rtol=1e-12)
    assert float(fam.log_prob(0.0, 1.1, disp=disp)) == -np.inf
    hurdle, zi_trunc = F.Hurdle(base), F.ZeroInflated(fam)
    yy = jnp.array([0.0, 1.0, 3.0, 9.0])
    np.testing.assert_allclose(hurdle.log_prob(yy, 0.2, disp=disp, zi=-0.6),
                               zi_trunc.log_prob(yy, 0.2, disp=disp, zi=-0.6), rtol=1e-13)
    # Truncated mean and variance: moments of the renormalized masses.
    pm = np.exp(np.asarray(lp))
    yn = np.asarray(y)
    assert abs(float(fam.mean(1.1, disp=disp)) - np.sum(pm * yn)) < 1e-9
    var = np.sum(pm * yn**2) - np.sum(pm * yn) ** 2
    assert abs(float(fam.variance(1.1, disp=disp)) - var) < 1e-8 * max(1.0, var)


def test_hurdle_moments_and_sampling():
    fam = F.Hurdle(F.NegativeBinomial2())
    y = jnp.arange(0.0, 600.0)
    lp = fam.log_prob(y, jnp.full(y.shape, 1.3), disp=0.2, zi=0.3)
    pm = np.exp(np.asarray(lp))
    assert abs(pm.sum() - 1.0) < 1e-10
    assert abs(float(fam.mean(1.3, disp=0.2, zi=0.3)) - np.sum(pm * np.asarray(y))) < 1e-9
    var = np.sum(pm * np.asarray(y) ** 2) - np.sum(pm * np.asarray(y)) ** 2
    assert abs(float(fam.variance(1.3, disp=0.2, zi=0.3)) - var) < 1e-8 * var
    x = np.asarray(fam.sample(jax.random.PRNGKey(3), jnp.full((40_000,), 1.3), disp=0.2, zi=0.3))
    assert abs(x.mean() - np.sum(pm * np.asarray(y))) < 5 * math.sqrt(var / x.size)
    assert abs((x == 0).mean() - sp.expit(0.3)) < 5 * math.sqrt(0.25 / x.size)


def test_log_link_count_families_use_log_mu_exactly():
    """glmmTMB's robust negative binomial: no overflow in exp(eta) at eta = 50."""
    y = jnp.array([5.2e21])
    v = F.NegativeBinomial2().log_prob(jnp.round(y), 50.0, disp=1.0)
    assert np.isfinite(v)
    v = F.Poisson().log_prob(jnp.round(y), 50.0)
    assert np.isfinite(v)


# --------------------------------------------------------------- glmmTMB 1.1.5
# Negative log-likelihoods from glmmTMB 1.1.5 (Debian r-cran-glmmtmb 1.1.5+dfsg-4),
# computed with
#   s <- glmmTMB(form, family = fam, data = d, ziformula = zi, dispformula = disp, doFit = FALSE)
#   obj <- with(s, TMB::MakeADFun(data.tmb, parameters, map = mapArg, random = randomArg, DLL = "glmmTMB"))
#   obj$fn(par)
# for d$x = c(-1, -0.5, 0, 0.5, 1, 1.5), eta = beta[1] + beta[2] * x, and the responses below;
# par = (beta, betazi, betad, psi) in glmmTMB's order.
X = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
CNT = np.array([0.0, 1.0, 3.0, 0.0, 7.0, 12.0])
POS = np.array([0.3, 1.2, 2.5, 0.8, 4.1, 9.3])
PROP = np.array([0.1, 0.35, 0.5, 0.62, 0.8, 0.93])
SUCC, SIZE = np.array([0.0, 2.0, 3.0, 1.0, 5.0, 6.0]), np.array([3.0, 4.0, 5.0, 6.0, 6.0, 7.0])
ZPOS = np.array([0.0, 1.2, 2.5, 0.0, 4.1, 9.3])
OB = np.array([0.0, 0.35, 0.5, 1.0, 0.8, 0.93])

GLMMTMB_115 = [
    # (family, response, beta, betad, psi, betazi, trials, glmmTMB nll)
    ("gaussian", POS, (0.5, 0.8), 0.3, None, None, None, 32.7793516732904),
    ("poisson", CNT, (0.5, 0.8), None, None, None, None, 14.3016929059162),
    ("binomial", SUCC, (-0.2, 1.1), None, None, None, SIZE, 8.55970701672652),  # cbind(y, n - y)
    ("Gamma(link='log')", POS, (0.5, 0.8), 0.3, None, None, None, 9.6892585901765),
    ("beta_family", PROP, (0.2, 1.1), 1.5, None, None, None, -4.03776462922552),
    ("betabinomial", SUCC, (-0.2, 1.1), 0.7, None, None, SIZE, 9.70626891472638),
    ("nbinom1", CNT, (0.5, 0.8), 0.3, None, None, None, 12.7305582417167),
    ("nbinom2", CNT, (0.5, 0.8), 0.3, None, None, None, 12.5624676327934),
    ("genpois", CNT, (0.5, 0.8), 0.3, None, None, None, 13.3818922373191),
    ("compois", CNT, (0.5, 0.8), 0.3, None, None, None, 13.4110008814674),
    ("compois", CNT, (0.5, 0.8), -0.7, None, None, None, 18.5868373122746),
    ("tweedie", ZPOS, (0.5, 0.8), 0.3, (0.4,), None, None, 13.0950484917375),
    ("t_family", POS, (0.5, 0.8), 0.3, (1.2,), None, None, 16.2619881686898),
    ("ordbeta", OB, (0.2, 1.1), 1.5, (-1.2, 1.4), None, None, 2.07624796991595),
    ("truncated_poisson", CNT + 1, (0.5, 0.8), None, None, None, None, 15.4427464303808),
    ("truncated_nbinom1", CNT + 1, (0.5, 0.8), 0.3, None, None, None, 13.2166890967751),
    ("truncated_nbinom2", CNT + 1, (0.5, 0.8), 0.3, None, None, None, 12.650416728343),
    ("truncated_genpois", CNT + 1, (0.5, 0.8), 0.3, None, None, None, 14.145615977719),
    ("truncated_compois", CNT + 1, (0.5, 0.8), 0.3, None, None, None, 14.2725972554439),
    ("poisson", CNT, (0.5, 0.8), None, None, -0.4, None, 14.3221682784661),  # ziformula = ~1
    ("truncated_nbinom2", CNT, (0.5, 0.8), 0.3, None, -0.4, None, 13.1374771481092),  # hurdle
    ("ziGamma(link='log')", ZPOS, (0.5, 0.8), 0.3, None, -0.4, None, 12.3128255308125),
    ("nbinom2", CNT, (0.5, 0.8), "0.3 - 0.2 x", None, None, None, 12.6175181424945),  # dispformula = ~x
]


@pytest.mark.parametrize("row", GLMMTMB_115, ids=[f"{r[0]}-{i}" for i, r in enumerate(GLMMTMB_115)])
def test_matches_glmmtmb_1_1_5(row):
    name, y, beta, betad, psi, betazi, trials, nll = row
    fam = F.get(name)
    if betazi is not None:
        fam = F.Hurdle(fam.base) if isinstance(fam, F.Truncated) else F.ZeroInflated(fam)
    disp = 0.3 - 0.2 * X if isinstance(betad, str) else betad
    eta = beta[0] + beta[1] * X
    ours = -float(jnp.sum(fam.log_prob(y, eta, disp=disp, psi=psi, zi=betazi, trials=trials)))
    # compois: TMB solves for lambda to a relative 1e-9 (calc_loglambda), hence 1e-11 there.
    tol = 1e-11 if "compois" in name else 1e-13
    assert abs(ours - nll) < tol * abs(nll), (ours, nll)


def test_sigma_and_dispersion_conventions():
    """glmmTMB 1.1.5's sigma(): gaussian exp(betad / 2), Gamma exp(-betad / 2), else exp(betad)."""
    d = 0.6
    assert math.isclose(float(F.Gaussian().sigma(d)), math.exp(d / 2))
    assert math.isclose(float(F.Gamma().sigma(d)), math.exp(-d / 2))
    for name in ("nbinom2", "nbinom1", "beta_family", "genpois", "compois", "tweedie", "t_family", "betabinomial"):
        assert math.isclose(float(F.get(name).sigma(d)), math.exp(d)), name
    for name in ("poisson", "binomial", "truncated_poisson", "bell"):
        assert F.get(name).sigma(d) == 1.0
    assert math.isclose(float(F.NegativeBinomial2().variance(math.log(4.0), disp=d)), 4 * (1 + 4 / math.exp(d)))
    assert math.isclose(float(F.NegativeBinomial1().variance(math.log(4.0), disp=d)), 4 * (1 + math.exp(d)))
    assert math.isclose(float(F.Gaussian().variance(0.0, disp=d)), math.exp(d))
    assert math.isclose(float(F.GeneralizedPoisson().variance(math.log(4.0), disp=d)), 4 * math.exp(d))
    p = 1 + sp.expit(0.4)
    assert math.isclose(float(F.Tweedie().variance(math.log(3.0), disp=d, psi=[0.4])), math.exp(d) * 3**p)
    # COM-Poisson variance: second cumulant (direct sum).
    nu, mu = math.exp(-d), 3.0
    j = np.arange(400)
    lp = _compois_ref(j, mu, nu)
    w = np.exp(lp)
    assert math.isclose(float(F.ConwayMaxwellPoisson().variance(math.log(mu), disp=d)),
                        np.sum(w * j**2) - np.sum(w * j) ** 2, rel_tol=1e-10)


def test_deviance_residuals_match_r_formulas():
    y = np.array([0.0, 1.0, 4.0, 9.0])
    eta = np.log(np.array([0.5, 2.0, 3.0, 12.0]))
    mu = np.exp(eta)
    pois = 2 * (np.where(y > 0, y * np.log(np.where(y > 0, y, 1) / mu), 0) - (y - mu))
    np.testing.assert_allclose(F.Poisson().deviance_residuals(y, eta), np.sign(y - mu) * np.sqrt(pois), rtol=1e-12)
    th = 2.5
    nb = 2 * (y * np.log(np.maximum(1, y) / mu) - (y + th) * np.log((y + th) / (mu + th)))
    np.testing.assert_allclose(F.NegativeBinomial2().deviance_residuals(y, eta, disp=np.log(th)),
                               np.sign(y - mu) * np.sqrt(nb), rtol=1e-12)
    yg = y + 0.5
    gam = -2 * (np.log(yg / mu) - (yg - mu) / mu)
    np.testing.assert_allclose(F.Gamma("log").deviance_residuals(yg, eta, disp=0.0),
                               np.sign(yg - mu) * np.sqrt(gam), rtol=1e-12)
    n, s, p = np.array([5.0, 5.0, 8.0]), np.array([0.0, 3.0, 8.0]), np.array([0.2, 0.5, 0.7])
    pr = s / n
    with np.errstate(divide="ignore", invalid="ignore"):
        dev = 2 * n * (np.where(pr > 0, pr * np.log(pr / p), 0)
                       + np.where(pr < 1, (1 - pr) * np.log((1 - pr) / (1 - p)), 0))
    np.testing.assert_allclose(F.Binomial().deviance_residuals(s, sp.logit(p), trials=n),
                               np.sign(pr - p) * np.sqrt(dev), rtol=1e-12)
    with pytest.raises(NotImplementedError):
        F.Tweedie().deviance_residuals(y, eta, disp=0.0, psi=[0.0])


# ----------------------------------------------------------- errors, registry
@pytest.mark.parametrize(
    "name, y, trials, message",
    [
        ("poisson", [0, 2, -1], None, "non-negative counts"),
        ("nbinom2", [0, 2.5], None, "integer counts"),
        ("binomial", [0, 3], [2, 2], "no larger than trials"),
        ("binomial", [0, 2], None, "no larger than trials"),
        ("beta_family", [0.2, 1.0], None, "strictly inside (0, 1)"),
        ("ordbeta", [0.2, 1.2], None, "in [0, 1]"),
        ("Gamma", [0.0, 1.0], None, "strictly positive"),
        ("lognormal", [-1.0, 1.0], None, "strictly positive"),
        ("tweedie", [-0.1], None, "non-negative"),
        ("truncated_poisson", [0, 1, 2], None, "Hurdle"),
        ("gaussian", [np.nan, 1.0], None, "missing"),
    ],
)
def test_check_support_raises(name, y, trials, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        F.get(name).check_support(np.asarray(y, float), trials)


def test_check_support_accepts_valid_responses():
    F.get("binomial").check_support([0, 2, 3], trials=[3, 3, 5])
    F.ZeroInflated(F.Gamma()).check_support([0.0, 1.0, 2.5])
    F.ZeroInflated(F.Beta()).check_support([0.0, 0.5])
    F.Hurdle(F.Poisson()).check_support([0, 0, 3])
    F.get("ordbeta").check_support([0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        F.Hurdle(F.Gamma()).check_support([0.0, -1.0])
    with pytest.raises(ValueError, match="strictly positive"):
        F.Gamma().check_support([0.0, 1.0])


def test_unknown_names_and_strings():
    with pytest.raises(ValueError, match="Did you mean 'nbinom2'"):
        F.get("nbinom3")
    with pytest.raises(ValueError, match="Did you mean 'poisson'"):
        F.get("possion")
    assert isinstance(F.get("Gamma(link='log')"), F.Gamma) and F.get("Gamma(link='log')").link.name == "log"
    assert F.get('binomial(link = "probit")').link.name == "probit"
    assert F.get("Gamma(log)").link.name == "log"
    assert F.get("nbinom2()").link.name == "log"
    assert F.get("Gamma").link.name == "inverse"  # R's default
    assert F.get("binomial", link="cloglog").link.name == "cloglog"
    assert F.get("truncated_nbinom2").name == "truncated_nbinom2"
    fam = F.NegativeBinomial2()
    assert F.get(fam) is fam and F.get(F.Poisson) == F.Poisson()
    with pytest.raises(ValueError, match="only the link"):
        F.get("Gamma(variance = 'mu')")
    with pytest.raises(ValueError, match="not available for the poisson"):
        F.Poisson(link="logit")
    with pytest.raises(ValueError, match="zero-inflation"):
        F.Poisson().log_prob(1.0, 0.0, zi=0.0)
    with pytest.raises(ValueError, match="dispersion"):
        F.NegativeBinomial2().log_prob(1.0, 0.0)
    with pytest.raises(ValueError, match="psi"):
        F.Tweedie().log_prob(1.0, 0.0, disp=0.0)
    with pytest.raises(TypeError, match="whole real line"):
        F.Truncated(F.Gaussian())
    with pytest.raises(ValueError, match="needs zi"):
        F.ZeroInflated(F.Poisson()).log_prob(0.0, 0.0)


def test_families_are_frozen_modules_with_glmmtmb_metadata():
    for name in F.registry.names():
        fam = F.get(name)
        with pytest.raises(Exception):
            fam.link = F.LogLink()
        assert fam.link.name in fam.allowed_links
        assert len(fam.psi_start) == fam.n_psi
        assert isinstance(fam.has_disp, bool) and isinstance(fam.discrete, bool)
    assert F.get("t_family").name == "t" and F.get("beta_family").name == "beta"
    assert F.Hurdle(F.Poisson()).name == "truncated_poisson"
    assert F.ZeroInflated(F.Poisson()).name == "poisson"


def test_links_round_trip_and_derivative():
    eta = jnp.array([-2.0, -0.3, 0.4, 1.7])
    for name in ("identity", "log", "logit", "probit", "cloglog", "inverse", "sqrt"):
        link = F.get_link(name)
        mu = link.inverse(eta if name not in ("inverse", "sqrt") else jnp.abs(eta) + 0.1)
        e2 = eta if name not in ("inverse", "sqrt") else jnp.abs(eta) + 0.1
        np.testing.assert_allclose(link(mu), e2, rtol=1e-12)
        np.testing.assert_allclose(link.mu_eta(e2), jax.vmap(jax.grad(link.inverse))(e2), rtol=1e-12)
        np.testing.assert_allclose(link.inverse(e2), LINK_INV[name](np.asarray(e2)), rtol=1e-12)
        if name in ("logit", "probit", "cloglog"):
            np.testing.assert_allclose(link.logit_inverse(e2), sp.logit(LINK_INV[name](np.asarray(e2))), rtol=1e-11)
    # Stable tails: logit(p) and log(1 - p) for probit/cloglog far out.
    assert np.isfinite(F.get_link("probit").logit_inverse(-40.0))
    assert float(F.get_link("cloglog").log1m_inverse(5.0)) == -math.exp(5.0)


# -------------------------------------------------------- user-defined family
class Exponential(F.Family):
    """A user's family: y ~ Exponential(rate = 1 / mu), nothing in tmbx changed."""

    name = "exponential"
    nonnegative = True
    default_link = "log"
    allowed_links = ("log",)

    def _log_prob(self, y, eta, disp, psi, trials):
        return -eta - y * jnp.exp(-eta)

    def _variance(self, eta, disp, psi, trials):
        return jnp.exp(2 * eta)

    def _sample(self, key, eta, disp, psi, trials):
        return jnp.exp(eta) * jax.random.exponential(key, eta.shape)


def test_user_defined_family_plugs_in():
    fam = Exponential()
    y = jnp.array([0.2, 1.0, 3.0])
    np.testing.assert_allclose(fam.log_prob(y, 0.3), st.expon.logpdf(np.asarray(y), scale=math.exp(0.3)), rtol=1e-13)
    assert F.get(fam) is fam
    assert float(fam.mean(0.3)) == pytest.approx(math.exp(0.3))
    hurdle = F.Hurdle(fam)  # wrappers need only _log_prob (and _log_prob_zero's default)
    lp = hurdle.log_prob(jnp.array([0.0, 1.0]), 0.3, zi=0.0)
    np.testing.assert_allclose(lp, [math.log(0.5), math.log(0.5) + st.expon.logpdf(1.0, scale=math.exp(0.3))],
                               rtol=1e-13)
    g = jax.grad(lambda e: jnp.sum(F.ZeroInflated(fam).log_prob(jnp.array([0.0, 2.0]), e, zi=0.2)))(0.3)
    assert np.isfinite(g)
