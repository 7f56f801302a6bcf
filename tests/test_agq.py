"""Adaptive Gauss-Hermite quadrature (issue 9): `tmbx.glmm(..., nagq=)` and
`tmbx.Model(..., groups=, nagq=)`.

References: lme4's glmer nAGQ fits of cbpp (inference/cbpp_inference.json),
the `glmm` package's AGQ fits and a brute-force marginal likelihood of a
logistic random intercept and slope (inference/agq_vector.json), and
brute-force integration with scipy for families neither has.
"""

import itertools
import json
from pathlib import Path

import jax.numpy as jnp
import jax.scipy.special as jsp
import numpy as np
import pandas as pd
import pytest
import scipy.special as sps
import scipy.stats as st

import tmbx
from tmbx.formula._design import build_design
from tmbx.formula._template import build_template

INF = Path(__file__).parent / "data" / "inference"
CBPP = json.loads((INF / "cbpp_inference.json").read_text())
VEC = json.loads((INF / "agq_vector.json").read_text())
CBPP_FORMULA = "cbind(incidence, size - incidence) ~ period + (1|herd)"


def _lme4(q):
    return next(r for r in CBPP["agq_lme4"] if r["nAGQ"] == q)


def _glmm_pkg(q):
    return next(r for r in VEC["glmm_agq"] if r["nagq"] == q)


@pytest.fixture(scope="module")
def cbpp():
    return tmbx.load_dataset("cbpp")


@pytest.fixture(scope="module")
def cbpp_fits(cbpp):
    return {q: tmbx.glmm(CBPP_FORMULA, cbpp, family="binomial", nagq=q) for q in (5, 25)}


# ------------------------------------------------------------------ lme4 (cbpp)
def _check_cbpp(fits):
    # standard errors of the fixed effects: glmmTMB's Wald intervals (Laplace), the scale of the tolerance
    w = CBPP["wald_ci_glmmTMB"]
    se = {n: (u - l) / (2 * st.norm.ppf(0.975)) for n, l, u in zip(w["names"], w["lower"], w["upper"])}
    for q, fit in fits.items():
        ref = _lme4(q)
        assert fit.converged
        for name, val in fit.fixef["cond"].items():
            rname = "(Intercept)" if name == "Intercept" else name.replace("[T.", "").replace("]", "")
            assert abs(val - ref["fixef"][rname]) < 1e-3 * se[rname], (q, name)
        assert fit.varcorr["herd"].sd.iloc[0] == pytest.approx(ref["sd_herd"], rel=1e-4)
    # lme4 drops the binomial coefficients at nAGQ > 1: compare differences between orders
    orders = sorted(fits)
    for a, b in itertools.combinations(orders, 2):
        ours = fits[a].loglik - fits[b].loglik
        theirs = _lme4(a)["logLik"] - _lme4(b)["logLik"]
        assert ours == pytest.approx(theirs, abs=2e-6)


def test_cbpp_matches_lme4_nagq(cbpp_fits):
    _check_cbpp(cbpp_fits)


@pytest.mark.slow
def test_cbpp_matches_lme4_nagq10(cbpp, cbpp_fits):
    _check_cbpp({**cbpp_fits, 10: tmbx.glmm(CBPP_FORMULA, cbpp, family="binomial", nagq=10)})


def test_cbpp_agq_standard_errors(cbpp_fits):
    """Wald standard errors from the Hessian of the AGQ marginal: close to glmmTMB's
    (Laplace) ones, as the estimates barely move on cbpp."""
    w = CBPP["wald_ci_glmmTMB"]
    se_ref = [(u - l) / (2 * st.norm.ppf(0.975)) for l, u in zip(w["lower"][:4], w["upper"][:4])]
    se = np.sqrt(np.diag(np.asarray(cbpp_fits[25].vcov()["cond"])))
    np.testing.assert_allclose(se, se_ref, rtol=0.02)


# ------------------------------------------------------------ template API
def _cbpp_data(df):
    period = pd.Categorical(df["period"].astype(str), categories=["1", "2", "3", "4"])
    X = np.column_stack([np.ones(len(df))] + [(period == c).astype(float) for c in ["2", "3", "4"]])
    herd = pd.Categorical(df["herd"].astype(str)).codes
    return {"y": df["incidence"].to_numpy(float), "n": df["size"].to_numpy(float), "X": X,
            "herd": jnp.asarray(herd, jnp.int32)}


def _binom_ll(y, n, eta):
    const = jsp.gammaln(n + 1) - jsp.gammaln(y + 1) - jsp.gammaln(n - y + 1)
    return const + y * eta - n * jnp.logaddexp(0.0, eta)


def _eta(p, d):  # spherical random effects: b = sd * u, u ~ N(0, 1) (lme4's and tmbx.glmm's choice)
    return d["X"] @ p["beta"] + jnp.exp(p["logsd"]) * p["u"][d["herd"]]


def _cbpp_nll(p, d):
    return -jnp.sum(_binom_ll(d["y"], d["n"], _eta(p, d))) + 0.5 * jnp.sum(p["u"] ** 2) \
        + 0.5 * p["u"].size * np.log(2 * np.pi)


def _cbpp_params():
    return {"beta": jnp.zeros(4), "logsd": 0.0, "u": jnp.zeros(15)}


@pytest.fixture(scope="module")
def cbpp_template_data(cbpp):
    return _cbpp_data(cbpp)


def test_nagq1_with_groups_is_laplace(cbpp_template_data):
    d = cbpp_template_data
    lap = tmbx.Model(_cbpp_nll, _cbpp_params(), data=d, random=["u"])
    agq1 = tmbx.Model(_cbpp_nll, _cbpp_params(), data=d, random=["u"], groups={"u": np.arange(15)})
    for x in (np.zeros(5), np.array([-1.4, -1.0, -1.1, -1.6, -0.4]), np.array([0.5, 1, -2, 0, 1.0])):
        assert agq1.fn(x) == pytest.approx(lap.fn(x), abs=1e-11, rel=1e-13)


def test_template_api_equals_formula(cbpp_fits, cbpp_template_data):
    """A hand-written nll with groups= (generic path: one nll call per block and node) and
    the same model declared as a LatentGaussian (batched path) give glmm's AGQ fit."""
    d, ref = cbpp_template_data, cbpp_fits[5]
    x_ref = np.concatenate([ref.fixef["cond"].to_numpy(), np.log(ref.varcorr["herd"].sd.to_numpy())])
    generic = tmbx.Model(_cbpp_nll, _cbpp_params(), data=d, random=["u"], groups={"u": np.arange(15)},
                         nagq=5)
    assert -generic.fn(x_ref) == pytest.approx(ref.loglik, abs=1e-9)
    lg = tmbx.LatentGaussian(
        eta=_eta, obs_nll=lambda e, p, d: -_binom_ll(d["y"], d["n"], e),
        latent_nll=lambda p, d: 0.5 * jnp.sum(p["u"] ** 2) + 0.5 * p["u"].size * np.log(2 * np.pi))
    batched = tmbx.Model(None, _cbpp_params(), data=d, random=["u"], latent_gaussian=lg,
                         groups={"u": np.arange(15)}, nagq=5)
    assert batched.agq.lg is not None and batched.agq.latent_quadratic
    assert batched.fn(x_ref) == pytest.approx(generic.fn(x_ref), abs=1e-9)
    assert batched.fn(x_ref + 0.2) == pytest.approx(generic.fn(x_ref + 0.2), abs=1e-9)
    # the formula fit's optimum is a stationary point of the template's marginal
    np.testing.assert_allclose(batched.gr(x_ref), 0.0, atol=2e-4)
    # exact gradient (AD through the quadrature, the block factors and u*(x)) against differences
    x, h = x_ref + 0.2, 1e-5
    fd = [(batched.fn(x + h * e) - batched.fn(x - h * e)) / (2 * h) for e in np.eye(len(x))]
    np.testing.assert_allclose(batched.gr(x), fd, rtol=1e-6, atol=1e-7)


def test_non_gaussian_latent_density(cbpp_template_data):
    """A latent density that is not quadratic (Student-t random effects) takes the
    block-by-block path in a LatentGaussian template; it must agree with the generic path."""
    d = cbpp_template_data
    lat = lambda p, d: -jnp.sum(jax_t_logpdf(p["u"], 4.0))
    nll = lambda p, d: -jnp.sum(_binom_ll(d["y"], d["n"], _eta(p, d))) + lat(p, d)
    lg = tmbx.LatentGaussian(eta=_eta, obs_nll=lambda e, p, d: -_binom_ll(d["y"], d["n"], e), latent_nll=lat)
    kw = {"data": d, "random": ["u"], "groups": {"u": np.arange(15)}, "nagq": 7}
    a = tmbx.Model(None, _cbpp_params(), latent_gaussian=lg, **kw)
    b = tmbx.Model(nll, _cbpp_params(), **kw)
    assert not a.agq.latent_quadratic
    x = np.array([-1.4, -1.0, -1.1, -1.6, -0.4])
    assert a.fn(x) == pytest.approx(b.fn(x), abs=1e-9)


def jax_t_logpdf(u, df):
    import jax.scipy.stats as jst

    return jst.t.logpdf(u, df)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("nagq", [0, -3, 2.5, "10"])
def test_bad_nagq(cbpp, cbpp_template_data, nagq):
    with pytest.raises(ValueError, match="nagq must be"):
        tmbx.glmm(CBPP_FORMULA, cbpp, family="binomial", nagq=nagq)
    with pytest.raises(ValueError, match="nagq must be"):
        tmbx.Model(_cbpp_nll, _cbpp_params(), data=cbpp_template_data, random=["u"],
                   groups={"u": np.arange(15)}, nagq=nagq)


def test_bad_groups(cbpp_template_data):
    d = cbpp_template_data
    kw = {"data": d, "random": ["u"], "nagq": 5}
    with pytest.raises(ValueError, match="needs the blocks"):
        tmbx.Model(_cbpp_nll, _cbpp_params(), **kw)
    with pytest.raises(ValueError, match="shape"):
        tmbx.Model(_cbpp_nll, _cbpp_params(), groups={"u": np.arange(14)}, **kw)
    with pytest.raises(ValueError, match="integer"):
        tmbx.Model(_cbpp_nll, _cbpp_params(), groups={"u": np.arange(15) * 1.0}, **kw)
    with pytest.raises(ValueError, match="not random parameters"):
        tmbx.Model(_cbpp_nll, _cbpp_params(), groups={"u": np.arange(15), "beta": np.zeros(4, int)}, **kw)
    with pytest.raises(ValueError, match="no blocks"):
        tmbx.Model(_cbpp_nll, dict(_cbpp_params(), beta=jnp.zeros(4)), data=d, random=["u", "beta"],
                   groups={"u": np.arange(15)}, nagq=5)


def test_interacting_blocks_rejected(cbpp_template_data):
    """Two crossed sets of effects: blocks that share observations are not independent."""
    d = dict(cbpp_template_data, period=jnp.asarray(np.argmax(cbpp_template_data["X"][:, 1:], 1) +
                                                     cbpp_template_data["X"][:, 1:].any(1), jnp.int32))

    def nll(p, d):
        eta = p["beta"][0] + p["u"][d["herd"]] + p["v"][d["period"]]
        return -jnp.sum(_binom_ll(d["y"], d["n"], eta)) + 0.5 * jnp.sum(p["u"] ** 2) + 0.5 * jnp.sum(p["v"] ** 2)

    params = {"beta": jnp.zeros(1), "u": jnp.zeros(15), "v": jnp.zeros(4)}
    with pytest.raises(ValueError, match="interact.*conditionally independent.*nagq=1.*sample"):
        tmbx.Model(nll, params, data=d, random=["u", "v"], nagq=5,
                   groups={"u": np.arange(15), "v": 100 + np.arange(4)})


def test_formula_rejects_two_factors():
    df = tmbx.load_dataset("penicillin")
    with pytest.raises(ValueError, match=r"one grouping factor.*nagq=1.*fit.sample"):
        tmbx.glmm("diameter ~ 1 + (1|plate) + (1|sample)", df, family="poisson", nagq=5)
    with pytest.raises(ValueError, match="REML"):
        tmbx.glmm("diameter ~ 1 + (1|plate)", df, reml=True, nagq=5)


def test_too_many_nodes(cbpp):
    df = tmbx.load_dataset("agq_vector")
    with pytest.raises(ValueError, match="lower nagq"):
        tmbx.glmm("y ~ x + (1 + x + I(x**2) + I(x**3) + I(x**4)|g)", df, family="binomial", nagq=11)


# ------------------------------------------- vector random effects (agq_vector)
@pytest.fixture(scope="module")
def vec_data():
    return tmbx.load_dataset("agq_vector")


@pytest.fixture(scope="module")
def vec15(vec_data):
    return tmbx.glmm(VEC["python_formula"], vec_data, family="binomial", nagq=15)


def _vec_x(ref):
    """glmm's estimates as tmbx's x: beta, then us theta (log sds, x with corr = x / sqrt(1 + x^2))."""
    v1, v2, c = ref["cov"]["var_(Intercept)"], ref["cov"]["var_x"], ref["cov"]["cov"]
    rho = c / np.sqrt(v1 * v2)
    return np.array([ref["fixef"]["(Intercept)"], ref["fixef"]["x"], 0.5 * np.log(v1), 0.5 * np.log(v2),
                     rho / np.sqrt(1 - rho**2)])


def test_vector_agq_matches_brute_force_and_glmm(vec15):
    ref = _glmm_pkg(15)
    brute = VEC["brute_force_logLik_at_nagq15_estimates"]
    assert vec15.converged
    assert vec15.loglik == pytest.approx(brute, abs=1e-5)
    assert vec15.loglik == pytest.approx(ref["logLik"], abs=1e-4)
    np.testing.assert_allclose(vec15.fixef["cond"].to_numpy(), list(ref["fixef"].values()), rtol=1e-3)
    cov = vec15.varcorr["g"].cov.to_numpy()
    np.testing.assert_allclose([cov[0, 0], cov[0, 1], cov[1, 1]],
                               [ref["cov"]["var_(Intercept)"], ref["cov"]["cov"], ref["cov"]["var_x"]], atol=1e-3)
    # the quadrature itself, at glmm's estimates: the brute-force integral
    assert -vec15.model.fn(_vec_x(ref)) == pytest.approx(brute, abs=5e-6)


@pytest.mark.slow
@pytest.mark.parametrize("q", [7, 11])
def test_vector_agq_orders_match_glmm(vec_data, q):
    fit = tmbx.glmm(VEC["python_formula"], vec_data, family="binomial", nagq=q)
    assert fit.loglik == pytest.approx(_glmm_pkg(q)["logLik"], abs=1e-4)


# ----------------------------------- families neither lme4 nor glmm integrate
def _simulate(family, seed=1, G=30, n=4):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), n)
    x = rng.standard_normal(G * n)
    b = 0.9 * rng.standard_normal(G)[g]
    mu = np.exp(0.4 + 0.5 * x + b)
    df = pd.DataFrame({"x": x, "g": [f"g{i:02d}" for i in g]})
    if family == "nbinom1":
        phi = 1.5  # Var = mu (1 + phi)
        df["y"] = rng.negative_binomial(mu / phi, 1 / (1 + phi))
    elif family == "betabinomial":
        p = sps.expit(-0.2 + 0.5 * x + b)
        df["n"] = 10
        df["y"] = rng.binomial(10, rng.beta(p * 4.0, (1 - p) * 4.0))
    else:  # zero-inflated Poisson, random effect in the conditional model
        df["y"] = np.where(rng.random(G * n) < 0.3, 0, rng.poisson(mu))
    return df


FAMILY_CASES = {
    "nbinom1": {"formula": "y ~ x + (1|g)", "family": "nbinom1"},
    "betabinomial": {"formula": "cbind(y, n - y) ~ x + (1|g)", "family": "betabinomial"},
    "zip": {"formula": "y ~ x + (1|g)", "family": "poisson", "ziformula": "~1"},
}


def _brute_force_loglik(case, df, beta, sd, phi=None, zi=None):
    """Marginal log-likelihood by a dense grid (trapezoid, spectrally accurate here) over each
    group's random intercept, with scipy.stats densities."""
    grid = np.linspace(-12 * sd, 12 * sd, 4001)
    X = np.column_stack([np.ones(len(df)), df["x"]])
    eta = (X @ beta)[:, None] + grid[None, :]
    y = df["y"].to_numpy()[:, None]
    if case == "nbinom1":
        mu = np.exp(eta)
        ll = st.nbinom.logpmf(y, mu / phi, 1 / (1 + phi))
    elif case == "betabinomial":
        mu, n = sps.expit(eta), df["n"].to_numpy()[:, None]
        ll = st.betabinom.logpmf(y, n, mu * phi, (1 - mu) * phi)
    else:
        log_p0, log_p1 = -np.logaddexp(0, -zi), -np.logaddexp(0, zi)
        ll = np.where(y == 0, np.logaddexp(log_p0, log_p1 - np.exp(eta)),
                      log_p1 + st.poisson.logpmf(y, np.exp(eta)))
    codes = pd.Categorical(df["g"]).codes
    per_group = np.zeros((codes.max() + 1, grid.size))
    np.add.at(per_group, codes, ll)
    per_group += st.norm.logpdf(grid, 0, sd)[None, :]
    return float(np.sum(sps.logsumexp(per_group, axis=1) + np.log(grid[1] - grid[0])))


def _fit_family(case, nagq):
    spec = FAMILY_CASES[case]
    df = _simulate(case)
    return df, tmbx.glmm(spec["formula"], df, family=spec["family"], ziformula=spec.get("ziformula"),
                         nagq=nagq)


def test_nbinom1_quadrature_is_exact_at_high_order():
    """At fixed parameters (no fit), nagq=25 on nbinom1 gives the brute-force integral."""
    df = _simulate("nbinom1")
    spec = FAMILY_CASES["nbinom1"]
    design = build_design(spec["formula"], df)
    model = build_template(design, "nbinom1", nagq=25).model
    beta, sd, phi = np.array([0.4, 0.5]), 0.9, 1.5
    x = np.array([*beta, np.log(phi), np.log(sd)])  # beta, betadisp (log phi), theta (log sd)
    assert model.space.labels["x"] == ["beta[0]", "beta[1]", "betadisp[0]", "theta[0]"]
    assert -model.fn(x) == pytest.approx(_brute_force_loglik("nbinom1", df, beta, sd, phi), abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["nbinom1", "betabinomial", "zip"])
def test_families_converge_to_brute_force(case):
    """Fit at nagq=25; at the estimates the AGQ error shrinks with the order (Laplace is
    visibly off on clusters of 4) and vanishes at 25."""
    df, fit = _fit_family(case, 25)
    assert fit.converged
    exact = _brute_force_loglik(case, df, fit.fixef["cond"].to_numpy(), fit.varcorr["g"].sd.iloc[0],
                                phi=fit.sigma, zi=fit.fixef["zi"].iloc[0] if "zi" in fit.fixef else None)
    # 25 points leave ~3e-6 on the zero-inflated Poisson's kinked integrand (1e-9 at 51)
    assert fit.loglik == pytest.approx(exact, abs=1e-5)
    errors = [abs(-build_template(fit.design, fit.family, nagq=q).model.fn(fit._fit.x) - exact)
              for q in (1, 5, 15)] + [abs(fit.loglik - exact)]
    assert errors[0] > 1e-3
    assert all(b < a for a, b in itertools.pairwise(errors)), errors


# ------------------------------------------------- bias on small binary clusters
@pytest.mark.slow
def test_agq_less_biased_than_laplace_on_small_clusters():
    """benchmarks/bench_agq.py's study (clusters of 3-5, random-intercept sd 1.75), on fewer
    data sets: Laplace shrinks the sd; AGQ's estimate is closer to the truth."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "bench_agq.py"
    spec = importlib.util.spec_from_file_location("bench_agq", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tab = bench.bias_table(nsim=60, seed=1).set_index(["parameter", "method"])
    lap, agq = tab.loc[("sd", "Laplace")], tab.loc[("sd", "AGQ (nagq=15)")]
    assert lap["converged"] >= 55 and agq["converged"] >= 55
    assert lap["bias"] < 0 and abs(agq["bias"]) < abs(lap["bias"])


@pytest.mark.slow
def test_zero_inflation_random_effects_on_the_same_factor():
    """(1|g) in the conditional and in the zero-inflation model: blocks of two effects that
    enter different linear predictors; AGQ at nagq=15 equals a 2-D brute-force integral."""
    df = _simulate("zip")
    design = build_design("y ~ x + (1|g)", df, ziformula="~(1|g)")
    model = build_template(design, "poisson", nagq=15).model
    assert model.space.labels["x"] == ["beta[0]", "beta[1]", "betazi[0]", "theta[0]", "thetazi[0]"]
    beta, zi, sd_c, sd_z = np.array([0.4, 0.5]), -0.8, 0.9, 0.7
    x = np.array([*beta, zi, np.log(sd_c), np.log(sd_z)])
    bc, bz = np.meshgrid(np.linspace(-10 * sd_c, 10 * sd_c, 401), np.linspace(-10 * sd_z, 10 * sd_z, 401),
                         indexing="ij")
    area = (bc[1, 0] - bc[0, 0]) * (bz[0, 1] - bz[0, 0])
    prior = st.norm.logpdf(bc, 0, sd_c) + st.norm.logpdf(bz, 0, sd_z)
    total = 0.0
    for _, rows in df.groupby("g"):
        lp = prior.copy()
        for y, xv in zip(rows["y"], rows["x"]):
            eta, ez = beta[0] + beta[1] * xv + bc, zi + bz
            log_p0, log_p1 = -np.logaddexp(0, -ez), -np.logaddexp(0, ez)
            lp += (np.logaddexp(log_p0, log_p1 - np.exp(eta)) if y == 0
                   else log_p1 + st.poisson.logpmf(y, np.exp(eta)))
        total += sps.logsumexp(lp) + np.log(area)
    assert -model.fn(x) == pytest.approx(total, abs=1e-5)
