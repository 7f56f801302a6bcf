"""Template-level checks: TMB's checkConsistency, oneStepPredict and sdreport's bias
correction, against closed forms (Gaussian AR1 covariance, Gaussian posteriors,
numerical integration of a one-dimensional posterior) and simulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

import tmbx

T = 150


def _ar1_nll(u, phi, s):
    """-log density of a stationary AR1(phi) path with marginal sd s."""
    innov = (u[1:] - phi * u[:-1]) / (s * jnp.sqrt(1 - phi**2))
    return (0.5 * (u[0] / s) ** 2 + jnp.log(s) + 0.5 * jnp.sum(innov**2)
            + (u.shape[0] - 1) * jnp.log(s * jnp.sqrt(1 - phi**2)) + 0.5 * u.shape[0] * math.log(2 * math.pi))


def _ar1_draw(key, n, phi, s):
    e = jax.random.normal(key, (n,))
    first = s * e[0]

    def step(prev, ei):
        nxt = phi * prev + s * jnp.sqrt(1 - phi**2) * ei
        return nxt, nxt

    _, rest = jax.lax.scan(step, first, e[1:])
    return jnp.concatenate([first[None], rest])


def gauss_nll(p, d):
    phi, s, sig = jnp.tanh(p["tphi"]), jnp.exp(p["logs"]), jnp.exp(p["logsig"])
    obs = 0.5 * jnp.sum(((d["y"] - p["mu"] - p["u"]) / sig) ** 2) + d["y"].shape[0] * (jnp.log(sig) + 0.5 * math.log(2 * math.pi))
    return _ar1_nll(p["u"], phi, s) + obs


def gauss_sim(p, d, key):
    k1, k2 = jax.random.split(key)
    phi, s, sig = jnp.tanh(p["tphi"]), jnp.exp(p["logs"]), jnp.exp(p["logsig"])
    u = _ar1_draw(k1, d["y"].shape[0], phi, s)
    return {"y": p["mu"] + u + sig * jax.random.normal(k2, u.shape), "u": u}


TRUE = dict(mu=1.0, tphi=math.atanh(0.8), logs=0.0, logsig=math.log(0.5))


def _gauss_model(y):
    params = dict(mu=0.0, tphi=0.0, logs=0.0, logsig=0.0, u=np.zeros(y.shape[0]))
    return tmbx.Model(gauss_nll, params, data={"y": y}, random=["u"], simulate=gauss_sim)


@pytest.fixture(scope="module")
def gauss_fit():
    truth = _gauss_model(np.zeros(T))
    y = np.asarray(truth.simulate(seed=1, par={**TRUE, "u": np.zeros(T)})["y"])
    return _gauss_model(y).fit()


def test_osa_full_gaussian_closed_form(gauss_fit):
    """OSA residuals = L^-1 (y - mu) with L L' = s^2 R(phi) + sig^2 I."""
    osa = gauss_fit.one_step_predict("y", method="fullGaussian")
    p = gauss_fit.par
    phi, s, sig = math.tanh(p["tphi"]), math.exp(p["logs"]), math.exp(p["logsig"])
    lag = np.abs(np.subtract.outer(np.arange(T), np.arange(T)))
    cov = s**2 * phi**lag + sig**2 * np.eye(T)
    y = np.asarray(gauss_fit.data["y"])
    expected = np.linalg.solve(np.linalg.cholesky(cov), y - p["mu"])
    np.testing.assert_allclose(osa["residual"], expected, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(osa["mean"], p["mu"], atol=1e-8)
    # iid N(0, 1) under the model; residuals against the conditional modes are not
    assert stats.kstest(osa["residual"], "norm").pvalue > 0.05
    naive = (y - p["mu"] - gauss_fit.par_random["u"]) / sig
    assert stats.kstest(naive, "norm").pvalue < 0.01


def test_check_consistency_scores(gauss_fit):
    chk = gauss_fit.check_consistency(nsim=100, seed=3, estimate=False)
    # the Laplace approximation is exact here: neither score test rejects
    assert chk.marginal["p_value"] > 0.01
    assert chk.joint is not None and chk.joint["p_value"] > 0.01
    assert chk.estimate is None and chk.scores.shape == (100, 4)


@pytest.mark.slow
def test_check_consistency_refits(gauss_fit):
    chk = gauss_fit.check_consistency(nsim=100, seed=3)
    # the Laplace approximation is exact here: neither score test rejects
    assert chk.marginal["p_value"] > 0.01
    assert chk.joint is not None and chk.joint["p_value"] > 0.01
    tab = chk.summary()
    assert list(tab.index) == ["mu", "tphi", "logs", "logsig"]
    z = tab["bias (refit)"] / tab["se (refit)"]
    assert np.all(np.abs(z) < 4)


@pytest.mark.slow
def test_check_consistency_detects_laplace_bias():
    """Binary data, two observations per group and sd 2: the Laplace approximation is
    poor, so the marginal score test rejects while the joint one does not, and the
    estimated bias of log(sd) is negative (Laplace underestimates the sd)."""
    J, K = 100, 2
    g = np.repeat(np.arange(J), K)

    def nll(p, d):
        eta = p["a"] + jnp.exp(p["logsd"]) * p["u"][d["g"]]
        return (0.5 * jnp.sum(p["u"] ** 2) + 0.5 * J * math.log(2 * math.pi)
                - jnp.sum(d["y"] * eta - jnp.logaddexp(0.0, eta)))

    def sim(p, d, key):  # returns y and the latent u; g is kept from the data
        k1, k2 = jax.random.split(key)
        u = jax.random.normal(k1, (J,))
        eta = p["a"] + jnp.exp(p["logsd"]) * u[d["g"]]
        return {"y": jax.random.bernoulli(k2, jax.nn.sigmoid(eta)).astype(float), "u": u}

    par = dict(a=0.0, logsd=math.log(2.0), u=np.zeros(J))
    make = lambda y: tmbx.Model(nll, par, data={"y": y, "g": g}, random=["u"], simulate=sim)
    fit = make(np.asarray(make(np.zeros(J * K)).simulate(seed=0)["y"])).fit()
    chk = fit.check_consistency(nsim=200, seed=1, estimate=False)
    assert chk.marginal["p_value"] < 1e-6
    assert chk.joint["p_value"] > 0.01
    assert chk.marginal["bias"][1] < -0.1


def test_one_step_predict_errors(gauss_fit):
    with pytest.raises(ValueError, match="not in the data"):
        gauss_fit.one_step_predict("N")
    with pytest.raises(ValueError, match="keep"):
        gauss_fit.one_step_predict("y", method="oneStepGeneric")
    with pytest.raises(ValueError, match="method must be"):
        gauss_fit.one_step_predict("y", method="cdf")


# ------------------------------------------------------------------ Poisson AR1, generic OSA

def pois_nll(p, d):
    phi, s = jnp.tanh(p["tphi"]), jnp.exp(p["logs"])
    eta = p["mu"] + p["u"]
    obs = -jnp.sum(d["keep"] * (d["N"] * eta - jnp.exp(eta) - jax.scipy.special.gammaln(d["N"] + 1)))
    return _ar1_nll(p["u"], phi, s) + obs


@pytest.mark.slow
def test_osa_generic_poisson_ar1():
    n = 60
    rng = np.random.default_rng(5)
    u = np.asarray(_ar1_draw(jax.random.PRNGKey(2), n, 0.8, 0.7))
    N = rng.poisson(np.exp(1.0 + u)).astype(float)
    params = dict(mu=0.0, tphi=0.0, logs=0.0, u=np.zeros(n))
    fit = tmbx.Model(pois_nll, params, data={"N": N, "keep": np.ones(n)}, random=["u"]).fit()
    osa = fit.one_step_predict("N", method="oneStepGeneric", seed=1)
    assert np.all((osa["cdf"] > 0) & (osa["cdf"] < 1))
    assert stats.kstest(osa["residual"], "norm").pvalue > 0.05
    assert abs(np.corrcoef(osa["residual"][1:], osa["residual"][:-1])[0, 1]) < 0.3


# ------------------------------------------------------------------ bias correction

def test_bias_correction_gaussian_exact():
    """u_i ~ N(a, 1), y_i ~ N(u_i, 0.6^2): the posterior is N(m_i, v); the epsilon method is
    exact for phi quadratic in u (E[u^2] = m^2 + v) and gives exp(m) (1 + v / 2) for exp(u)."""
    rng = np.random.default_rng(0)
    y = rng.normal(1.0, 1.2, size=6)
    sig = 0.6

    def nll(p, d):
        u = p["u"]
        return 0.5 * jnp.sum((u - p["a"]) ** 2) + 0.5 * jnp.sum((d["y"] - u) ** 2) / sig**2

    rep = lambda p, d: {"e": jnp.exp(p["u"]), "sq": p["u"] ** 2, "total": jnp.sum(p["u"])}
    fit = tmbx.Model(nll, {"a": 0.0, "u": np.zeros(6)}, data={"y": y}, random=["u"], report=rep).fit()
    r = fit.sdreport(bias_correct=True)
    v = 1 / (1 + 1 / sig**2)
    m = v * (fit.par["a"] + y / sig**2)
    np.testing.assert_allclose(r.par_random_bc["u"], m, atol=1e-8)
    np.testing.assert_allclose(r.report_value_bc["sq"], m**2 + v, rtol=1e-8)
    np.testing.assert_allclose(r.report_value_bc["total"], m.sum(), rtol=1e-8)
    np.testing.assert_allclose(r.report_value_bc["e"], np.exp(m) * (1 + v / 2), rtol=1e-8)
    # second order in v from the exact E[exp(u)] = exp(m + v / 2)
    np.testing.assert_allclose(r.report_value_bc["e"], np.exp(m + v / 2), rtol=v**2)


def test_bias_correction_poisson_moves_towards_posterior_mean():
    """u ~ N(0, 1), y = 0 ~ Poisson(exp(u)): the correction brings the mode and exp(mode)
    close to the exact posterior means (numerical integration)."""
    def nll(p, d):
        u = p["u"]
        return 0.5 * p["c"] ** 2 + 0.5 * jnp.sum(u**2) - jnp.sum(d["y"] * u - jnp.exp(u))

    fit = tmbx.Model(nll, {"c": 0.0, "u": np.zeros(1)}, data={"y": np.zeros(1)}, random=["u"],
                     report=lambda p, d: {"e": jnp.exp(p["u"])}).fit()
    r = fit.sdreport(bias_correct=True)
    post = lambda u: np.exp(-0.5 * u * u - np.exp(u))
    Z = integrate.quad(post, -12, 12)[0]
    Eu = integrate.quad(lambda u: u * post(u), -12, 12)[0] / Z
    Ee = integrate.quad(lambda u: np.exp(u) * post(u), -12, 12)[0] / Z
    mode = fit.par_random["u"][0]
    assert abs(r.par_random_bc["u"][0] - Eu) < 0.1 * abs(mode - Eu)
    assert abs(r.report_value_bc["e"][0] - Ee) < 0.1 * abs(math.exp(mode) - Ee)
