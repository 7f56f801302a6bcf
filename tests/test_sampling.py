"""NUTS sampling (`fit.sample`, tmbstan's role): closed forms, calibration, diagnostics.

References: the GLS posterior of a Gaussian LMM with known variances (closed
form, numpy); simulation-based calibration (Talts et al. 2018) on a Poisson
GLMM template with proper priors; arviz's rank-normalized R-hat and ESS; the
LKJ normalizing constant (numpyro's LKJ distribution).
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

import tmbx
from tmbx import _sampling as smp

pytest.importorskip("numpyro")

# lme4's REML-free sleepstudy estimates, rounded: the held variance parameters
SD0, SD1, RHO, SIGMA = 24.7, 5.9, 0.07, 25.6


@pytest.fixture(scope="module")
def sleep():
    return tmbx.load_dataset("sleepstudy")


@pytest.fixture(scope="module")
def fixed_var_fit(sleep):
    """(Days | Subject) with theta and the residual variance held by map."""
    theta = [math.log(SD0), math.log(SD1), RHO / math.sqrt(1 - RHO**2)]  # glmmTMB's us parametrization
    return tmbx.glmm("Reaction ~ Days + (Days|Subject)", sleep,
                     start={"theta": theta, "betadisp": [2 * math.log(SIGMA)]},
                     map={"theta": [None] * 3, "betadisp": [None]})


@pytest.fixture(scope="module")
def fixed_var_posts(fixed_var_fit):
    """laplace -> posterior; shared by the tests below (each run compiles a sampler)."""
    return {lap: fixed_var_fit.sample(num_samples=1000, num_chains=4, seed=1, laplace=lap, progress_bar=False)
            for lap in (True, False)}


def _gls(sleep):
    """Posterior of beta under a flat prior with known V = Z G Z' + sigma^2 I."""
    X = np.column_stack([np.ones(len(sleep)), sleep["Days"].to_numpy(float)])
    y = sleep["Reaction"].to_numpy(float)
    G = np.array([[SD0**2, RHO * SD0 * SD1], [RHO * SD0 * SD1, SD1**2]])
    V = SIGMA**2 * np.eye(len(y))
    for s in sleep["Subject"].unique():
        i = np.nonzero((sleep["Subject"] == s).to_numpy())[0]
        V[np.ix_(i, i)] += X[i] @ G @ X[i].T
    P = np.linalg.solve(V, X)
    cov = np.linalg.inv(X.T @ P)
    return cov @ P.T @ y, cov


@pytest.mark.parametrize("laplace", [True, False])
def test_fixed_variance_lmm_matches_gls(sleep, fixed_var_posts, laplace):
    post = fixed_var_posts[laplace]
    mean, cov = _gls(sleep)
    s = post.summary()
    draws = np.stack([post.samples["Intercept"].ravel(), post.samples["Days"].ravel()], axis=1)
    for i, name in enumerate(["Intercept", "Days"]):
        mc_se = s.loc[name, "sd"] / math.sqrt(s.loc[name, "ess_bulk"])
        assert abs(s.loc[name, "mean"] - mean[i]) < 4 * mc_se
        assert s.loc[name, "sd"] == pytest.approx(math.sqrt(cov[i, i]), rel=0.1)
        assert s.loc[name, "prior"] == "flat"
    assert np.corrcoef(draws.T)[0, 1] == pytest.approx(cov[0, 1] / math.sqrt(cov[0, 0] * cov[1, 1]), abs=0.1)
    assert post.samples["Intercept"].shape == (4, 1000)
    if not laplace:
        assert post.samples["ranef:Subject"].shape == (4, 1000, 18, 2)
    assert s.loc["sigma", "prior"] == "held (map)"


def test_to_arviz_and_diagnostics(fixed_var_posts):
    az = pytest.importorskip("arviz")
    post = fixed_var_posts[False]
    idata = post.to_arviz()
    assert set(idata.posterior.data_vars) >= {"Intercept", "Days", "sigma"}
    assert idata.sample_stats["diverging"].shape == (4, 1000)
    assert idata.posterior["ranef:Subject"].shape == (4, 1000, 18, 2)
    a = post.samples["Days"]
    s = post.summary().loc["Days"]
    assert s["r_hat"] == pytest.approx(float(az.rhat(a, method="rank")), abs=1e-6)
    assert s["ess_bulk"] == pytest.approx(float(az.ess(a, method="bulk")), rel=1e-6)
    assert s["ess_tail"] == pytest.approx(float(az.ess(a, method="tail")), rel=1e-6)
    assert s["2.5%"] == pytest.approx(np.quantile(a, 0.025))


def test_diagnostics_match_arviz_on_autocorrelated_chains():
    az = pytest.importorskip("arviz")
    rng = np.random.default_rng(3)
    a = np.zeros((4, 500))
    for t in range(1, 500):  # AR(1) chains with shifted means: R-hat > 1
        a[:, t] = 0.9 * a[:, t - 1] + rng.standard_normal(4)
    a += np.array([0.0, 0.0, 0.5, 1.0])[:, None]
    assert smp.rhat(a) == pytest.approx(float(az.rhat(a, method="rank")), rel=1e-9)
    assert smp.ess_bulk(a) == pytest.approx(float(az.ess(a, method="bulk")), rel=1e-9)
    assert smp.ess_tail(a) == pytest.approx(float(az.ess(a, method="tail")), rel=1e-9)


@pytest.mark.parametrize("k", [2, 3])
def test_lkj_prior_integrates_to_lkj_constant(k):
    dist = pytest.importorskip("numpyro.distributions")
    st_us = tmbx.covstructs.get("us", dim=k)
    corr_of_x = lambda x: smp._corr(st_us.cov(jnp.concatenate([jnp.zeros(k), x])))
    logp = jax.jit(jax.vmap(smp._lkj_corr_log_density(corr_of_x, k, eta=2.0)))
    m = k * (k - 1) // 2
    # importance sampling with a multivariate t proposal: E[p / q] = integral of p
    prop = st.multivariate_t(loc=np.zeros(m), shape=np.eye(m), df=3)
    x = prop.rvs(size=40_000, random_state=7).reshape(-1, m)
    w = np.exp(np.asarray(logp(jnp.asarray(x))) - prop.logpdf(x))
    C = np.eye(k)
    log_z = float(dist.LKJ(k, 2.0).log_prob(jnp.asarray(C)))  # = (eta-1) log det I - log Z = -log Z
    assert math.log(w.mean()) == pytest.approx(-log_z, abs=4 * w.std() / w.mean() / math.sqrt(w.size) + 1e-3)
    if k == 2:  # closed form: corr = x / sqrt(1 + x^2), density in x proportional to (1 + x^2)^-2.5
        xs = jnp.linspace(-3, 3, 7)[:, None]
        diff = np.asarray(logp(xs)) + 2.5 * np.log1p(np.asarray(xs[:, 0]) ** 2)
        assert np.ptp(diff) < 1e-12


def test_priors_named_fit_priors_and_defaults(sleep):
    """the fit's priors where given (named), defaults elsewhere: flat intercept,
    LKJ(2) on the correlation, half-t with brms' scale max(2.5, mad(y)) on sigma."""
    fit = tmbx.glmm("Reaction ~ Days + (Days|Subject)", sleep,
                    priors=[{"prior": "normal(0, 10)", "class": "fixef"},
                            {"prior": "half_normal(30)", "class": "ranef_sd"}])
    _, table, _ = smp.default_priors(fit)
    scale = st.median_abs_deviation(sleep["Reaction"], scale="normal")
    assert table == {"Intercept": "flat", "Days": "normal(0, 10) (fit's)",
                     "sd_Intercept|Subject": "half_normal(30) (fit's)", "sd_Days|Subject": "half_normal(30) (fit's)",
                     "cor_Days.Intercept|Subject": "LKJ(2)", "sigma": f"half-t(3, 0, {scale:.3g})"}


def test_half_t_prior_on_log_sd_is_normalized():
    """half-t(3, 0, s) at sd = exp(theta) times the Jacobian integrates to 1 over theta,
    and matches scipy's t density folded at 0."""
    th = np.linspace(-20, 15, 70_001)
    one = lambda t: -smp._half_t_term({"theta": t[None]}, "theta", np.array([0]), 3.0)
    dens = np.exp(np.asarray(jax.vmap(one)(jnp.asarray(th))))
    assert np.trapezoid(dens, th) == pytest.approx(1.0, abs=1e-6)
    assert float(smp._log_half_t(2.0, 3.0, 3.0)) == pytest.approx(math.log(2 * st.t.pdf(2.0, 3, scale=3.0)))


# ---------------------------------------------------------------------- bad input
def test_bad_num_samples(fixed_var_fit):
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        fixed_var_fit.sample(num_samples=0)
    with pytest.raises(ValueError, match="num_chains must be a positive integer"):
        fixed_var_fit.sample(num_chains=0)


def test_separation_is_an_improper_posterior():

    x = np.repeat([0.0, 1.0], 20)
    df = pd.DataFrame({"y": (x > 0.5).astype(float), "x": x, "g": np.tile(list("abcde"), 8)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = tmbx.glmm("y ~ x + (1|g)", df, family="binomial")
    with pytest.raises(ValueError, match=r"separate the successes.*improper.*proper prior"):
        fit.sample(num_samples=10)


@pytest.mark.slow
def test_all_zero_level_is_an_improper_posterior():
    """counts: a factor level whose counts are all zero (the Poisson analogue)."""

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"y": np.r_[rng.poisson(3, 20), np.zeros(10)], "f": np.repeat(["a", "b"], [20, 10]),
                       "g": np.tile(list("abcde"), 6)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = tmbx.glmm("y ~ f + (1|g)", df, family="poisson")
    with pytest.raises(ValueError, match=r"all-zero counts.*improper"):
        fit.sample(num_samples=10)


# ---------------------------------------------------------------------- templates
J, NPER = 6, 3  # a small Poisson GLMM: 6 groups of 3 counts


def _poisson_nll(p, d):
    eta = p["beta"] + jnp.exp(p["logsd"]) * p["u"][d["g"]]
    return -jnp.sum(jax.scipy.stats.poisson.logpmf(d["y"], jnp.exp(eta))) + 0.5 * jnp.sum(p["u"] ** 2) \
        + 0.5 * J * math.log(2 * math.pi)


def _poisson_prior(p):
    """beta ~ N(1, 0.5); sd ~ half-normal(1) on the log-sd scale (with its Jacobian)."""
    sd = jnp.exp(p["logsd"])
    return 0.5 * ((p["beta"] - 1.0) / 0.5) ** 2 + 0.5 * sd**2 - p["logsd"]


def _poisson_model(y):
    g = np.repeat(np.arange(J), NPER)
    return tmbx.Model(_poisson_nll, {"beta": 1.0, "logsd": math.log(0.5), "u": np.zeros(J)},
                      data={"y": y, "g": g}, random=["u"])


def _prior_draws(R, seed):
    rng = np.random.default_rng(seed)
    beta = rng.normal(1.0, 0.5, R)
    sd = np.abs(rng.standard_normal(R))
    u = rng.standard_normal((R, J))
    g = np.repeat(np.arange(J), NPER)
    y = rng.poisson(np.exp(beta[:, None] + sd[:, None] * u[:, g]))
    return beta, sd, u, y.astype(float)


def _sbc(R, chains, warmup, draws, thin, seed=11, **opts):
    """Simulation-based calibration: ranks of the true values among thinned
    posterior draws, every replicate's chains in one vectorized NUTS run."""
    beta, sd, u, y = _prior_draws(R, seed)
    model = _poisson_model(y[0])
    gen = smp._potential_gen(model, False, _poisson_prior, np.zeros(J))
    data = {"y": jnp.asarray(y), "g": jnp.tile(jnp.asarray(model.data["g"]), (R, 1))}
    z_start = np.r_[1.0, math.log(0.5), np.zeros(J)]
    z0 = z_start + 0.3 * np.random.default_rng(seed).standard_normal((R, chains, J + 2))
    res = smp.nuts(gen, z0, data, seed=seed, num_warmup=warmup, num_samples=draws, batched_data=True, **opts,
                   progress_bar=False)
    z = res["z"][:, :, ::thin].reshape(R, -1, J + 2)
    truth = np.column_stack([beta, np.log(sd), u[:, 0]])
    ranks = np.sum(z[:, :, [0, 1, 2]] < truth[:, None, :], axis=1)
    return ranks, z.shape[1], res


def _uniform_pvalues(ranks, L, bins):
    counts = np.stack([np.histogram(r, bins=np.linspace(0, L + 1, bins + 1))[0] for r in ranks.T])
    return st.chisquare(counts, axis=1).pvalue


def test_sbc_poisson_glmm_small():
    ranks, L, res = _sbc(R=100, chains=1, warmup=150, draws=200, thin=2, max_tree_depth=6)
    assert L == 100
    p = _uniform_pvalues(ranks, L, bins=10)
    assert np.all(p > 0.01), p
    assert res["diverging"].mean() < 0.01


@pytest.mark.slow
def test_sbc_poisson_glmm_large():
    ranks, L, res = _sbc(R=500, chains=2, warmup=300, draws=500, thin=10, max_tree_depth=(8, 6))
    assert L == 100 and res["diverging"].mean() < 0.01
    p = _uniform_pvalues(ranks, L, bins=20)
    assert np.all(p > 0.01), p


def test_template_sample_and_errors():
    _, _, _, y = _prior_draws(1, 5)
    model = _poisson_model(y[0])
    fit = model.fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short chains: the R-hat / ESS warnings are expected
        post = fit.sample(num_samples=300, num_chains=2, seed=0, priors=_poisson_prior, progress_bar=False)
    assert post.samples["u"].shape == (2, 300, J)
    assert post.samples["beta"].shape == (2, 300)
    assert {"beta", "logsd", "u[0]"} <= set(post.summary().index)
    assert post.summary().loc["beta", "prior"] == "priors="
    with pytest.raises(TypeError, match="priors must be a callable"):
        fit.sample(priors="normal")
    with pytest.raises(ValueError, match="fixed parameters only"):
        fit.sample(laplace=True, priors=lambda p: _poisson_prior(p) + jnp.sum(p["u"] ** 2))
    # a parameter the nll ignores: improper under the default flat prior
    nll = lambda p, d: -jnp.sum(jax.scipy.stats.poisson.logpmf(d["y"], jnp.exp(p["beta"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unidentified z makes the Hessian singular
        bad_fit = tmbx.Model(nll, {"beta": 1.0, "z": 0.0}, data={"y": y[0]}).fit()
    with pytest.warns(UserWarning, match="flat priors"), \
            pytest.raises(ValueError, match=r"does not depend on \['z'\].*improper"):
        bad_fit.sample(num_samples=10)


# ---------------------------------------------------------------------- sleepstudy R-hat
@pytest.mark.slow
@pytest.mark.parametrize("laplace", [False, True])
def test_sleepstudy_rhat(sleep, laplace):
    fit = tmbx.glmm("Reaction ~ Days + (Days|Subject)", sleep)
    post = fit.sample(num_samples=1000, num_chains=4, seed=0, laplace=laplace, progress_bar=False)
    s = post.summary()
    assert (s["r_hat"] < 1.01).all(), s
    assert post.num_divergent == 0
    assert {"Intercept", "Days", "sd_Intercept|Subject", "sd_Days|Subject", "cor_Days.Intercept|Subject",
            "sigma"} == set(s.index)


def test_missing_numpyro_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "numpyro.infer.hmc", None)
    with pytest.raises(ImportError, match=r'pip install "tmbx\[sample\]"'):
        smp._require("numpyro.infer.hmc")
