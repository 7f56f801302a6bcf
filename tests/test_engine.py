"""Engine core: TMB's examples, closed forms, implicit gradients, map, batches, errors."""

import importlib
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import jax.scipy.stats as jst
import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

import tmbx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
TMB = {r["id"]: r for r in json.load(open(os.path.join(HERE, "data", "tmb_examples.json")))}


def _rel(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.maximum(np.abs(np.asarray(b)), 1e-12))


# ------------------------------------------------------------------ TMB's examples
@pytest.mark.parametrize("case,module", [
    ("simple", "tmb_simple"), ("randomregression", "tmb_randomregression"), ("ar1xar1_50", "tmb_ar1xar1"),
])
def test_tmb_examples_match_tmb(case, module):
    ref = TMB[case]
    model = importlib.import_module(module).build()
    fit = model.fit()
    assert fit.converged, fit.message
    assert abs(fit.loglik - ref["logLik"]) < 1e-4
    rep = fit.sdreport()
    for name, val in ref["par"].items():
        assert _rel(fit.par[name], val) < 1e-3, name
        assert _rel(rep.se[name], ref["se"][name]) < 1e-3, name
    assert model.space.n_u == ref["n_random"]
    if "adreport" in ref:
        for name, est, se in zip(ref["adreport"]["names"], ref["adreport"]["est"], ref["adreport"]["se"]):
            assert _rel(rep.report_value[name], est) < 1e-3
            assert _rel(rep.report_se[name], se) < 1e-3


def test_ar1xar1_uses_a_banded_layout():
    model = importlib.import_module("tmb_ar1xar1").build()
    assert model.laplace.layout.kind == "banded"
    assert model.laplace.layout.s <= 60  # blocks of the lattice's bandwidth, not 2500


# ------------------------------------------------------------------ closed forms
def _lmm_data(seed=0, n_groups=12, per=6):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), per)
    x = rng.normal(size=g.size)
    y = 1.0 + 0.5 * x + rng.normal(scale=0.8, size=n_groups)[g] + rng.normal(scale=0.6, size=g.size)
    return dict(y=y, x=x, g=g), n_groups


def _lmm_nll(p, d):
    mu = p["beta"][0] + p["beta"][1] * d["x"] + p["b"][d["g"]]
    lik = -jnp.sum(jst.norm.logpdf(d["y"], mu, jnp.exp(p["logsd"])))
    return lik - jnp.sum(jst.norm.logpdf(p["b"], 0.0, jnp.exp(p["logsdb"])))


def _dense_marginal(d, beta, logsd, logsdb, ng):
    Z = np.eye(ng)[d["g"]]
    V = np.exp(2 * logsdb) * Z @ Z.T + np.exp(2 * logsd) * np.eye(len(d["y"]))
    mean = beta[0] + beta[1] * d["x"]
    return -st.multivariate_normal(mean, V).logpdf(d["y"])


def test_laplace_is_exact_for_gaussian_lmm():
    d, ng = _lmm_data()
    params = dict(beta=np.zeros(2), logsd=0.0, logsdb=0.0, b=np.zeros(ng))
    model = tmbx.Model(_lmm_nll, params, data=d, random=["b"])
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = rng.normal(size=4)
        expect = _dense_marginal(d, x[:2], x[2], x[3], ng)
        assert abs(model.fn(x) - expect) < 1e-8


def test_reml_by_integrating_fixed_effects():
    """beta in `random` gives the REML criterion: log|X'V^-1X|/2 added, flat prior on beta."""
    d, ng = _lmm_data(seed=3)
    params = dict(beta=np.zeros(2), logsd=0.0, logsdb=0.0, b=np.zeros(ng))
    model = tmbx.Model(_lmm_nll, params, data=d, random=["b", "beta"])
    x = np.array([0.2, -0.3])
    Z = np.eye(ng)[d["g"]]
    V = np.exp(2 * x[1]) * Z @ Z.T + np.exp(2 * x[0]) * np.eye(len(d["y"]))
    X = np.column_stack([np.ones_like(d["x"]), d["x"]])
    Vi = np.linalg.inv(V)
    bhat = np.linalg.solve(X.T @ Vi @ X, X.T @ Vi @ d["y"])
    ml = -st.multivariate_normal(X @ bhat, V).logpdf(d["y"])
    reml = ml + 0.5 * np.linalg.slogdet(X.T @ Vi @ X)[1] - 0.5 * 2 * math.log(2 * math.pi)
    assert abs(model.fn(x) - reml) < 1e-8


# ------------------------------------------------------------------ gradients
def _fd(fn, x, h=1e-5):
    x = np.asarray(x, float)
    return np.array([(fn(x + h * e) - fn(x - h * e)) / (2 * h) for e in np.eye(len(x))])


def _glmm_data(seed=0, ng=15, per=8):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(ng), per)
    x = rng.normal(size=g.size)
    eta = 0.3 + 0.4 * x + rng.normal(scale=0.7, size=ng)[g]
    return dict(y=rng.poisson(np.exp(eta)).astype(float), x=x, g=g), ng


def _poisson_nll(p, d):
    eta = p["beta"][0] + p["beta"][1] * d["x"] + p["b"][d["g"]]
    lik = -jnp.sum(d["y"] * eta - jnp.exp(eta) - jax.scipy.special.gammaln(d["y"] + 1))
    return lik - jnp.sum(jst.norm.logpdf(p["b"], 0.0, jnp.exp(p["logsdb"])))


def _nb_nll(p, d):
    eta = p["beta"][0] + p["beta"][1] * d["x"] + p["b"][d["g"]]
    theta = jnp.exp(p["logtheta"])
    mu = jnp.exp(eta)
    lik = -jnp.sum(jst.nbinom.logpmf(d["y"], theta, theta / (theta + mu)))
    return lik - jnp.sum(jst.norm.logpdf(p["b"], 0.0, jnp.exp(p["logsdb"])))


@pytest.mark.parametrize("kind", ["poisson", "nbinom", "ar1xar1"])
def test_gradient_matches_finite_differences(kind):
    if kind == "ar1xar1":
        model = importlib.import_module("tmb_ar1xar1").build()
        x = np.array([0.9, 1.2])
    else:
        d, ng = _glmm_data()
        params = dict(beta=np.zeros(2), logsdb=0.0, b=np.zeros(ng))
        nll = _poisson_nll
        if kind == "nbinom":
            params["logtheta"] = 1.0
            nll = _nb_nll
        model = tmbx.Model(nll, params, data=d, random=["b"])
        x = np.array([0.2, 0.3, -0.4] + ([0.8] if kind == "nbinom" else []))
    g = model.gr(x)
    fd = _fd(model.fn, x)
    np.testing.assert_allclose(g, fd, rtol=2e-6, atol=2e-6)


def test_exact_hessian_matches_finite_differences_of_gradient():
    d, ng = _glmm_data(seed=2)
    model = tmbx.Model(_poisson_nll, dict(beta=np.zeros(2), logsdb=0.0, b=np.zeros(ng)), data=d,
                       random=["b"])
    x = np.array([0.1, 0.2, -0.5])
    H = model.he(x)
    fd = np.stack([(model.gr(x + 1e-5 * e) - model.gr(x - 1e-5 * e)) / 2e-5 for e in np.eye(3)])
    np.testing.assert_allclose(H, fd, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ map, batch, simulate
def test_mode_predictor_is_the_implicit_derivative_of_the_mode(monkeypatch):
    """The fit's warm start ``u* + J dx``: ``J`` from `Laplace.objective_with_jac`
    equals central differences of the inner mode ``u*(x)``, and a fit that uses it
    reaches the same optimum as one that does not. (Models compiled fully
    optimized use it: ``TMBX_FAST_COMPILE=0`` makes this small one such a model.)"""
    monkeypatch.setenv("TMBX_FAST_COMPILE", "0")
    d, ng = _glmm_data(seed=4)
    params = dict(beta=np.zeros(2), logsdb=0.0, b=np.zeros(ng))
    model = tmbx.Model(_poisson_nll, params, data=d, random=["b"])
    lap, x = model.laplace, jnp.asarray([0.2, 0.3, -0.4])
    u0 = jnp.zeros(ng)
    val, (u, status, J) = jax.jit(lap.objective_with_jac)(x, u0, model.data)
    assert int(status) == 0 and J.shape == (ng, 3)
    assert float(val) == pytest.approx(float(model.fn(np.asarray(x))), abs=1e-12)
    mode = lambda xx: np.asarray(lap.newton(jnp.asarray(xx), u, model.data)[0])
    fd = np.stack([(mode(x + 1e-5 * e) - mode(x - 1e-5 * e)) / 2e-5 for e in np.eye(3)], axis=1)
    np.testing.assert_allclose(np.asarray(J), fd, rtol=1e-6, atol=1e-8)
    assert model._predicts(3)
    fit = model.fit()
    model.PREDICT_MAX_X = 0  # the plain warm start (previous mode) for comparison
    model._compile()
    plain = model.fit()
    assert fit.loglik == pytest.approx(plain.loglik, abs=1e-9)
    np.testing.assert_allclose(fit.x, plain.x, atol=1e-6)


def test_mode_jacobian_path_differentiates_like_the_plain_objective():
    """`objective_with_jac` takes du* = J dx from the mode's Jacobian when only x
    is differentiated, and solves as the plain objective does when the data are
    differentiated too: both derivatives equal the plain objective's."""
    d, ng = _glmm_data(seed=6, ng=25)
    model = tmbx.Model(_poisson_nll, dict(beta=np.zeros(2), logsdb=0.0, b=np.zeros(ng)), data=d,
                       random=["b"])
    lap, x, u0 = model.laplace, jnp.asarray([0.2, 0.3, -0.4]), jnp.zeros(ng)
    data = model.data
    plain = lambda xx, dd: lap.objective(xx, u0, dd)[0]
    with_jac = lambda xx, dd: lap.objective_with_jac(xx, u0, dd)[0]
    g_plain = jax.jit(jax.grad(plain))(x, data)
    g_jac = jax.jit(jax.grad(with_jac))(x, data)
    np.testing.assert_allclose(np.asarray(g_jac), np.asarray(g_plain), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.asarray(g_jac), _fd(lambda xx: float(plain(jnp.asarray(xx), data)), x),
                               rtol=1e-6, atol=1e-6)
    # a tangent in the covariate as well as in x
    plain_c = lambda xx, cov: plain(xx, dict(data, x=cov))
    with_jac_c = lambda xx, cov: with_jac(xx, dict(data, x=cov))
    cov, dcov = data["x"], jnp.cos(jnp.arange(data["x"].size))
    dx = jnp.asarray([0.3, -0.2, 0.1])
    t_plain = jax.jvp(plain_c, (x, cov), (dx, dcov))[1]
    t_jac = jax.jvp(with_jac_c, (x, cov), (dx, dcov))[1]
    assert float(t_jac) == pytest.approx(float(t_plain), rel=1e-10, abs=1e-10)
    h = 1e-6
    fd = (float(plain_c(x + h * dx, cov + h * dcov)) - float(plain_c(x - h * dx, cov - h * dcov))) / (2 * h)
    assert float(t_jac) == pytest.approx(fd, rel=1e-5)


def test_single_precision_newton_steps_fit_like_double_precision():
    """ar1xar1 on a 30 x 30 lattice (a banded Hessian) with its Newton steps
    factorized in single precision (`InnerOptions.mixed_min_cost` = 0) fits as
    in double precision: the mode, value and gradient stay in double precision
    and the converging step is refined."""
    ex = importlib.import_module("tmb_ar1xar1")
    counts = ex.simulate_lattice(30, seed=3)
    fits = {}
    for mixed in (0.0, None):
        start = dict(eta=np.zeros(counts.shape), transf_phi1=math.atanh(0.5), transf_phi2=math.atanh(0.5))
        model = tmbx.Model(ex.nll, start, data=ex.lattice_data(counts), random=["eta"],
                           inner=tmbx.InnerOptions(mixed_min_cost=mixed))
        assert model.laplace._mixed_precision() == (mixed is not None)
        if mixed is not None:  # the single-precision steps do run (no pivot lost)
            x0, u0 = model._starts(None)
            assert bool(model.laplace._newton_factor(x0, u0, model.data, 0.0, True)[0])
        fits[mixed] = model.fit()
    lo, hi = fits[0.0], fits[None]
    assert lo.converged and hi.converged
    assert lo.loglik == pytest.approx(hi.loglik, abs=1e-9)
    np.testing.assert_allclose(lo.x, hi.x, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(lo.u, hi.u, rtol=1e-7, atol=1e-9)
    se_lo, se_hi = lo.sdreport().se, hi.sdreport().se
    for k in se_hi:
        np.testing.assert_allclose(se_lo[k], se_hi[k], rtol=1e-6)


def _ar1_poisson_nll(p, d):
    u, phi = p["u"], d["phi"]
    z = jnp.concatenate([u[:1], (u[1:] - phi * u[:-1]) / jnp.sqrt(1 - phi**2)])
    eta = p["beta"] + u
    return 0.5 * jnp.sum(z**2) - jnp.sum(d["y"] * eta - jnp.exp(eta))


def test_newton_goes_on_in_double_precision_where_single_fails():
    """An AR1 effect with phi = 1 - 1e-9: the precision's entries are 5e8 and its
    Cholesky pivots about 1, below single precision's rounding of 5e8 (30), so the
    single-precision factor loses a pivot. The solve goes on in double precision
    and finds the same mode as a double-precision solve; vmapped over three
    intercepts too."""
    rng = np.random.default_rng(0)
    n = 200
    d = dict(y=rng.poisson(2.0, size=n).astype(float), phi=1 - 1e-9)
    lap = {}
    for mixed in (0.0, None):
        model = tmbx.Model(_ar1_poisson_nll, dict(beta=0.5, u=np.zeros(n)), data=d, random=["u"],
                           inner=tmbx.InnerOptions(mixed_min_cost=mixed))
        lap[mixed] = model.laplace
        assert lap[mixed]._mixed_precision() == (mixed is not None)
    x, u0, data = jnp.asarray([0.5]), jnp.zeros(n), model.data
    # (compiled, as in a fit: the Hessian's rounding at 5e8 decides the pivot)
    ok_single = jax.jit(lambda xx: lap[0.0]._newton_factor(xx, u0, data, 0.0, True)[0])(x)
    assert not bool(ok_single)
    double = jax.jit(lambda xx: lap[None].newton(xx, u0, data))
    u_lo, status_lo, _ = jax.jit(lambda xx: lap[0.0].newton(xx, u0, data))(x)
    u_hi, status_hi, _ = double(x)
    assert int(status_lo) == 0 and int(status_hi) == 0
    np.testing.assert_allclose(np.asarray(u_lo), np.asarray(u_hi), rtol=1e-9, atol=1e-9)
    xs = jnp.asarray([[0.2], [0.5], [0.9]])
    batched = jax.jit(jax.vmap(lambda xx: lap[0.0].newton(xx, u0, data)))(xs)
    for i in range(3):
        single = double(xs[i])
        assert int(batched[1][i]) == 0
        np.testing.assert_allclose(np.asarray(batched[0][i]), np.asarray(single[0]), rtol=1e-9, atol=1e-9)


def test_inner_newton_confirms_convergence_with_a_chord_step():
    """Near the mode one factorization does: the Newton step from the start and a
    chord step with the same factor, whose decrement is below tolerance, end the
    solve in one iteration. The chord step leaves the error of the Newton step
    shrunk by the Hessian's relative change over that step (here 1e-3 per
    effect: from about 1e-6 to under 1e-9)."""
    d, ng = _glmm_data(seed=5, ng=40)
    model = tmbx.Model(_poisson_nll, dict(beta=np.zeros(2), logsdb=0.0, b=np.zeros(ng)), data=d,
                       random=["b"])
    lap, x = model.laplace, jnp.asarray([0.2, 0.3, -0.4])
    newton = jax.jit(lambda u0: lap.newton(x, u0, model.data))
    mode, status, it_far = newton(jnp.zeros(ng))
    assert int(status) == 0 and int(it_far) >= 3
    grad = lambda u: np.abs(np.asarray(lap.grad_u(x, u, model.data))).max()
    assert grad(mode) < 1e-10
    for scale, error in [(1e-3, 1e-9), (1e-5, 1e-12)]:
        u, status, it = newton(mode + scale * jnp.sin(jnp.arange(ng)))
        assert int(status) == 0 and int(it) == 1
        np.testing.assert_allclose(np.asarray(u), np.asarray(mode), atol=error)


def test_large_model_outer_loop_forward_hessian_and_gauss_newton_start(monkeypatch):
    """With the mode predictor (a model compiled fully optimized) the fit's Hessian
    comes from forward differences of the exact gradient at step 1e-5 and BFGS
    starts from the Gauss-Newton diagonal (asked for: a general template's default
    is the identity, a formula model's the Gauss-Newton diagonal): the Hessian still matches the exact one
    (forward-over-reverse through the implicit derivatives) and central
    differences, and the fit reaches the optimum of a fit with central
    differences and the identity start. Its search goes to the Hessian early
    (``early_hessian``), and the Hessian of that point still matches the exact one
    at the optimum."""
    monkeypatch.setenv("TMBX_FAST_COMPILE", "0")
    d, ng = _glmm_data(seed=6, ng=40, per=10)
    params = dict(beta=np.zeros(2), logsdb=0.0, b=np.zeros(ng))
    assert not tmbx.Model(_poisson_nll, params, data=d, random=["b"])._gauss_newton_start()
    model = tmbx.Model(_poisson_nll, params, data=d, random=["b"], outer=tmbx.BFGSOptions(gauss_newton_start=True))
    assert model._predicts(3) and model._outer_options().fd_forward and model._outer_options().early_hessian > 0
    assert model._gauss_newton_start()
    df = pd.DataFrame(dict(y=d["y"], x=d["x"], g=[f"g{i}" for i in d["g"]]))
    assert tmbx.glmm("y ~ x + (1|g)", data=df, family="poisson").model._gauss_newton_start()
    fit = model.fit()
    assert fit.converged, fit.message
    H_exact = fit.exact_hessian()
    np.testing.assert_allclose(fit.hessian, H_exact, rtol=1e-4, atol=1e-4 * np.max(np.abs(H_exact)))
    se = np.sqrt(np.diag(np.linalg.inv(fit.hessian)))
    np.testing.assert_allclose(se, np.sqrt(np.diag(np.linalg.inv(H_exact))), rtol=1e-4)
    # the Gauss-Newton curvature is the marginal's Hessian for the fixed effects
    # up to the log-determinant's share (small against the data's information)
    lap = model.laplace
    x = jnp.asarray(fit.x)
    _, (u, _, J) = jax.jit(lap.objective_with_jac)(x, jnp.asarray(fit.u), model.data)
    gn = np.asarray(model._gauss_newton(x, (u, x, J), model.data))
    np.testing.assert_allclose(gn[:2, :2], H_exact[:2, :2], rtol=0.1)
    # reference: central differences (an fd_step set by the user is kept) and the
    # identity start (no mode predictor)
    ref = tmbx.Model(_poisson_nll, params, data=d, random=["b"], outer=tmbx.BFGSOptions(fd_step=2e-4))
    ref.PREDICT_MAX_X = 0
    ref._compile()
    assert not ref._outer_options().fd_forward
    plain = ref.fit()
    assert fit.loglik == pytest.approx(plain.loglik, abs=1e-9)
    np.testing.assert_allclose(fit.x, plain.x, atol=1e-5)
    np.testing.assert_allclose(fit.hessian, plain.hessian, rtol=1e-4, atol=1e-4 * np.max(np.abs(H_exact)))


def test_map_fixes_and_shares_parameters():
    d, ng = _lmm_data(seed=5)
    params = dict(beta=np.array([0.0, 0.5]), logsd=0.0, logsdb=0.0, b=np.zeros(ng))
    # hold beta[1] at 0.5
    fixed = tmbx.Model(_lmm_nll, params, data=d, random=["b"], map={"beta": [0, None]}).fit()
    assert fixed.par["beta"][1] == 0.5
    offset = dict(d, y=d["y"] - 0.5 * d["x"])
    params0 = dict(params, beta=np.zeros(2))
    ref = tmbx.Model(_lmm_nll, params0, data=offset, random=["b"], map={"beta": [0, None]}).fit()
    assert abs(fixed.loglik - ref.loglik) < 1e-8
    # share (TMB's map levels within a parameter): beta[0] == beta[1], i.e. one
    # coefficient on (1 + x)
    shared = tmbx.Model(_lmm_nll, params, data=d, random=["b"], map={"beta": ["s", "s"]})
    assert shared.space.n_x == 3
    fit = shared.fit()
    assert fit.par["beta"][0] == fit.par["beta"][1]
    rep = fit.sdreport()
    assert rep.se["beta"][0] == rep.se["beta"][1]
    one = lambda p, d: _lmm_nll(dict(p, beta=jnp.stack([p["c"], p["c"]])), d)
    ref = tmbx.Model(one, dict(c=0.0, logsd=0.0, logsdb=0.0, b=np.zeros(ng)), data=d, random=["b"]).fit()
    assert abs(ref.loglik - fit.loglik) < 1e-8
    assert abs(ref.sdreport().se["c"] - rep.se["beta"][0]) < 1e-5


def _sim_poisson(p, d, key):
    k1, k2 = jax.random.split(key)
    b = jnp.exp(p["logsdb"]) * jax.random.normal(k1, p["b"].shape)
    eta = p["beta"][0] + p["beta"][1] * d["x"] + b[d["g"]]
    return dict(d, y=jax.random.poisson(k2, jnp.exp(eta)).astype(jnp.float64))


def test_batch_fit_equals_single_fits():
    d, ng = _glmm_data(seed=7)
    params = dict(beta=np.zeros(2), logsdb=0.0, b=np.zeros(ng))
    model = tmbx.Model(_poisson_nll, params, data=d, random=["b"], simulate=_sim_poisson)
    sims = model.simulate(nsim=8, seed=1, par=dict(beta=np.array([0.3, 0.4]), logsdb=np.log(0.7)))
    assert sims["y"].shape == (8, d["y"].size)
    batch = model.fit_batch(sims)
    assert batch.converged.all()
    for i in range(8):
        di = jax.tree_util.tree_map(lambda a: np.asarray(a[i]), sims)
        single = tmbx.Model(_poisson_nll, params, data=di, random=["b"]).fit()
        assert abs(single.loglik - batch.loglik[i]) < 1e-6
        np.testing.assert_allclose(single.x, batch.x[i], atol=1e-4)
        assert abs(batch[i].loglik - single.loglik) < 1e-6


def test_simulate_then_refit_recovers_parameters():
    d, ng = _glmm_data(seed=11, ng=60, per=10)
    params = dict(beta=np.zeros(2), logsdb=0.0, b=np.zeros(ng))
    model = tmbx.Model(_poisson_nll, params, data=d, random=["b"], simulate=_sim_poisson)
    truth = dict(beta=np.array([0.5, -0.3]), logsdb=np.log(0.6))
    sims = model.simulate(nsim=16, seed=3, par=truth)
    est = model.fit_batch(sims).par
    assert abs(est["beta"][:, 0].mean() - 0.5) < 0.1
    assert abs(est["beta"][:, 1].mean() + 0.3) < 0.05
    assert abs(np.exp(est["logsdb"]).mean() - 0.6) < 0.1


# ------------------------------------------------------------------ latent-Gaussian path
def test_latent_gaussian_path_matches_colored_path():
    rng = np.random.default_rng(4)
    na, nb, N = 40, 7, 400
    a, b = rng.integers(0, na, N), rng.integers(0, nb, N)
    y = rng.poisson(np.exp(0.2 + rng.normal(0, 0.5, na)[a] + rng.normal(0, 0.5, nb)[b])).astype(float)
    d = dict(y=y, a=a, b=b)
    params = dict(beta=0.0, lsa=0.0, lsb=0.0, u=np.zeros(na + nb))
    eta = lambda p, d: p["beta"] + p["u"][d["a"]] + p["u"][na + d["b"]]
    obs = lambda e, p, d: -(d["y"] * e - jnp.exp(e))
    lat = lambda p, d: -jnp.sum(jst.norm.logpdf(p["u"][:na], 0, jnp.exp(p["lsa"]))) - jnp.sum(
        jst.norm.logpdf(p["u"][na:], 0, jnp.exp(p["lsb"])))
    lg = tmbx.LatentGaussian(eta=eta, obs_nll=obs, latent_nll=lat)
    m1 = tmbx.Model(None, params, data=d, random=["u"], latent_gaussian=lg, layout="arrow")
    m2 = tmbx.Model(lg.nll, params, data=d, random=["u"], layout="dense")
    assert m1.laplace.layout.kind == "arrow" and m1.laplace.layout.t == nb
    x = np.array([0.1, -0.2, 0.3])
    assert abs(m1.fn(x) - m2.fn(x)) < 1e-9
    np.testing.assert_allclose(m1.gr(x), m2.gr(x), rtol=1e-8, atol=1e-9)
    f1, f2 = m1.fit(), m2.fit()
    assert abs(f1.loglik - f2.loglik) < 1e-8
    np.testing.assert_allclose(f1.sdreport().se_random["u"], f2.sdreport().se_random["u"], rtol=1e-6)


def test_latent_gaussian_block_products_match_colored_path():
    """A user's template whose rows each load on all 12 effects of their group
    (asdex reads J's pattern): the latent Hessian's blocks as matrix products
    of each group's rows give the plain template's (coloured) values, fit and
    random-effect standard errors."""
    from tmbx._hessian import LatentGaussianHessian

    rng = np.random.default_rng(5)
    ng, k, per = 6, 12, 30
    g = np.repeat(np.arange(ng), per)
    Z = rng.normal(size=(ng * per, k)) / np.sqrt(k)
    y = rng.poisson(np.exp(0.3 + np.sum(Z * rng.normal(0, 0.6, (ng, k))[g], axis=1))).astype(float)
    d = dict(y=y, g=g, Z=Z)
    params = dict(beta=0.0, ls=0.0, u=np.zeros(ng * k))
    eta = lambda p, d: p["beta"] + jnp.sum(d["Z"] * p["u"].reshape(ng, k)[d["g"]], axis=1)
    obs = lambda e, p, d: -(d["y"] * e - jnp.exp(e))
    lat = lambda p, d: -jnp.sum(jst.norm.logpdf(p["u"], 0, jnp.exp(p["ls"])))
    lg = tmbx.LatentGaussian(eta=eta, obs_nll=obs, latent_nll=lat)
    m1 = tmbx.Model(None, params, data=d, random=["u"], latent_gaussian=lg, layout="arrow")
    m2 = tmbx.Model(lg.nll, params, data=d, random=["u"], layout="dense")
    h = m1.laplace.hessian
    assert isinstance(h, LatentGaussianHessian) and h.blocks == (ng, per, k) and h.n_scattered == 0
    x = np.array([0.1, -0.2])
    assert abs(m1.fn(x) - m2.fn(x)) < 1e-9
    np.testing.assert_allclose(m1.gr(x), m2.gr(x), rtol=1e-8, atol=1e-9)
    f1, f2 = m1.fit(), m2.fit()
    assert abs(f1.loglik - f2.loglik) < 1e-8
    np.testing.assert_allclose(f1.sdreport().se_random["u"], f2.sdreport().se_random["u"], rtol=1e-6)


# ------------------------------------------------------------------ bad input
def test_bad_templates_give_clear_errors():
    d, ng = _lmm_data()
    params = dict(beta=np.zeros(2), logsd=0.0, logsdb=0.0, b=np.zeros(ng))
    with pytest.raises(ValueError, match="scalar"):
        tmbx.Model(lambda p, d: p["b"] ** 2, params, data=d, random=["b"])
    with pytest.raises(ValueError, match="start values"):
        tmbx.Model(lambda p, d: _lmm_nll(p, d) + jnp.log(p["logsd"]), params, data=d, random=["b"])
    with pytest.raises(ValueError, match="not parameters"):
        tmbx.Model(_lmm_nll, params, data=d, random=["u"])
    with pytest.raises(ValueError, match="not parameters"):
        tmbx.Model(_lmm_nll, params, data=d, random=["b"], map={"sigma": [None]})
    with pytest.raises(ValueError, match="entries"):
        tmbx.Model(_lmm_nll, params, data=d, random=["b"], map={"beta": [0]})


def test_inner_problem_without_finite_optimum_is_reported():
    d, ng = _glmm_data()
    # the random effects enter linearly and without a prior: no finite minimum in b
    nll = lambda p, d: jnp.sum((d["y"] - p["beta"]) ** 2) - jnp.sum(p["b"][d["g"]])
    model = tmbx.Model(nll, dict(beta=0.0, b=np.zeros(ng)), data=d, random=["b"])
    with pytest.warns(RuntimeWarning, match="random effects"):
        model.fn(np.array([0.0]))
    with pytest.warns(RuntimeWarning, match="did not converge"):
        fit = model.fit()
    assert not fit.converged


def test_joint_precision_is_sparse_and_matches_dense_hessian():
    d, ng = _glmm_data(seed=9)
    model = tmbx.Model(_poisson_nll, dict(beta=np.zeros(2), logsdb=0.0, b=np.zeros(ng)), data=d, random=["b"])
    fit = model.fit()
    rep = fit.sdreport(joint_precision=True)
    P = rep.joint_precision
    assert P.shape == (3 + ng, 3 + ng)
    x, u = jnp.asarray(fit.x), jnp.asarray(fit.u)
    Huu = np.asarray(jax.hessian(model.f, argnums=1)(x, u, model.data))
    np.testing.assert_allclose(P[3:, 3:].toarray(), Huu, rtol=1e-8, atol=1e-10)
    # the (x, x) block's inverse Schur complement is the fixed-effect covariance
    Pd = P.toarray()
    Vx = np.linalg.inv(Pd[:3, :3] - Pd[:3, 3:] @ np.linalg.solve(Pd[3:, 3:], Pd[3:, :3]))
    np.testing.assert_allclose(Vx, rep.cov_fixed, rtol=1e-6)


# ------------------------------------------------------------------ layouts
def _crossed_matrix(rng, na, nb, N, k=1):
    a, b = rng.integers(0, na, N), rng.integers(0, nb, N)
    Z = np.zeros((N, na * k + nb))
    for j in range(k):
        Z[np.arange(N), a * k + j] = rng.normal(size=N) if j else 1.0
    Z[np.arange(N), na * k + b] = 1.0
    return Z.T @ Z + np.eye(na * k + nb)


def _lattice_matrix(rng, n):
    T = np.diag(np.full(n, 2.2)) - np.diag(np.ones(n - 1), 1) - np.diag(np.ones(n - 1), -1)
    return np.kron(T, T)


@pytest.mark.parametrize("kind", ["dense", "arrow_k1", "arrow_k2", "arrow_wide", "banded"])
def test_layouts_factorize_like_dense_linear_algebra(kind, monkeypatch):
    """Every layout's factor against NumPy. ``arrow_wide``: a tail of 260 levels,
    above `_dense.BLOCK` (set to 128 here), so it goes through the recursive
    blocking, two levels deep."""
    from tmbx import _dense
    from tmbx._sparse import DenseLayout, arrow_layout, banded_layout

    monkeypatch.setattr(_dense, "BLOCK", 128)

    rng = np.random.default_rng(0)
    if kind == "banded":
        A = _lattice_matrix(rng, 12)
    elif kind == "arrow_wide":
        A = _crossed_matrix(rng, 300, 260, 3000)
    else:
        A = _crossed_matrix(rng, 60, 6, 400, k=2 if kind == "arrow_k2" else 1)
    n = A.shape[0]
    r, c = np.nonzero(A)
    if kind == "dense":
        lay = DenseLayout(n=n)
    elif kind == "banded":
        lay = banded_layout(n, r, c)
    else:
        lay = arrow_layout(n, r, c, np.arange(n - (260 if kind == "arrow_wide" else 6), n))
    sl = lay.slots(r, c)
    keep = sl >= 0
    flat = jnp.asarray(lay.padding()).at[sl[keep]].add(A[r[keep], c[keep]])
    np.testing.assert_allclose(np.asarray(lay.to_dense(flat)), A, atol=1e-12)
    F = lay.factor(flat)
    b = rng.normal(size=(n, 3))
    Ainv = np.linalg.inv(A)
    assert abs(float(F.logdet()) - np.linalg.slogdet(A)[1]) < 1e-9
    np.testing.assert_allclose(np.asarray(F.solve(b)), Ainv @ b, atol=1e-10)
    np.testing.assert_allclose(np.asarray(F.solve(b[:, 0])), Ainv @ b[:, 0], atol=1e-10)
    np.testing.assert_allclose(np.asarray(F.diag_inverse()), np.diag(Ainv), atol=1e-12)
    # H^-1 on H's own pattern (the selected inverse), either order of each pair
    np.testing.assert_allclose(np.asarray(F.inverse_entries(r, c)), Ainv[r, c], atol=1e-12)
    np.testing.assert_allclose(np.asarray(F.inverse_entries(c, r)), Ainv[c, r], atol=1e-12)
    # the log-determinant's derivative through the factorization is tr(A^-1 dA)
    i, j = r[len(r) // 2], c[len(c) // 2]
    dA = np.zeros_like(A)
    dA[i, j] += 1.0
    dA[j, i] += 1.0 if i != j else 0.0
    tangent = jnp.zeros_like(flat).at[sl[keep]].add(dA[r[keep], c[keep]])
    _, dlogdet = jax.jvp(lambda v: lay.factor(v).logdet(), (flat,), (tangent,))
    assert abs(float(dlogdet) - np.trace(Ainv @ dA)) < 1e-10


def test_arrow_with_tail_first_and_a_padded_last_block():
    """Head and tail indexed by slices where they are runs of consecutive indices,
    here with the padding's dummies extending the head's run (tail {0, 1}, head
    blocks {2, 3}, {4, 5}, {6} padded to 2): solve, its transpose, the inverse's
    diagonal and the log-determinant against NumPy."""
    from tmbx._sparse import _head_index, _run_start, arrow_layout

    n = 7
    A = np.eye(n) * 5.0
    for i, j in [(2, 3), (4, 5)]:
        A[i, j] = A[j, i] = 1.0
    A[2:, :2] = 0.3
    A[:2, 2:] = 0.3
    r, c = np.nonzero(A)
    lay = arrow_layout(n, r, c, np.array([0, 1]))
    assert _run_start(_head_index(lay)[0]) == 2 and _head_index(lay)[1] == 1
    sl = lay.slots(r, c)
    keep = sl >= 0
    flat = jnp.asarray(lay.padding()).at[sl[keep]].add(A[r[keep], c[keep]])
    F = lay.factor(flat)
    b = np.random.default_rng(0).normal(size=n)
    x, vjp = jax.vjp(F.solve, jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(A, b), atol=1e-12)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(b))[0]), np.linalg.solve(A, b), atol=1e-12)
    np.testing.assert_allclose(np.asarray(F.diag_inverse()), np.diag(np.linalg.inv(A)), atol=1e-12)
    assert abs(float(F.logdet()) - np.linalg.slogdet(A)[1]) < 1e-12


def _index_ops(jaxpr, out):
    """(primitive, operand shape, indices shape) of every gather and scatter in a
    jaxpr, sub-jaxprs (loops, conditionals, custom rules) included."""
    for e in jaxpr.eqns:
        if e.primitive.name == "gather" or e.primitive.name.startswith("scatter"):
            out.append((e.primitive.name, e.invars[0].aval.shape, e.invars[1].aval.shape))
        for p in e.params.values():
            for q in p if isinstance(p, (list, tuple)) else [p]:
                sub = getattr(q, "jaxpr", q)
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    _index_ops(sub, out)
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_arrow_solve_indexes_with_flat_arrays(k):
    """The arrow solve and its transpose gather and scatter with one flat index
    array each: on an H100 the head-to-tail scatter written with the (m, c)
    coupling index array took 29 ms at 1e5 crossed rows (most of a fit), the
    same sum over a flat index array 0.13 ms (`tmbx._sparse._coupled_to_tail`)."""
    from tmbx._sparse import arrow_layout

    rng = np.random.default_rng(0)
    A = _crossed_matrix(rng, 60, 6, 400, k=k)
    n = A.shape[0]
    r, c = np.nonzero(A)
    lay = arrow_layout(n, r, c, np.arange(n - 6, n))
    assert lay.c > 1
    sl = lay.slots(r, c)
    keep = sl >= 0
    flat = jnp.asarray(lay.padding()).at[sl[keep]].add(A[r[keep], c[keep]])
    b = jnp.asarray(rng.normal(size=n))

    def solve_and_transpose(flat, b):
        x, vjp = jax.vjp(lambda bb: lay.factor(flat).solve(bb), b)
        return x, vjp(x)

    x, (xt,) = solve_and_transpose(flat, b)
    np.testing.assert_allclose(np.asarray(xt), np.linalg.solve(A, np.linalg.solve(A, np.asarray(b))), atol=1e-10)
    ops = _index_ops(jax.make_jaxpr(solve_and_transpose)(flat, b).jaxpr, [])
    assert any(op.startswith("scatter") for op, _, _ in ops)
    multi = [o for o in ops if len(o[2]) > 2]
    assert not multi, f"gathers/scatters with multi-dimensional index arrays: {multi}"


def test_every_fixed_parameter_held_by_map():
    """All fixed parameters held: the fit is one evaluation of the Laplace marginal,
    here exact (Gaussian): the closed-form multivariate normal density."""
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(6), 4)
    y = rng.normal(size=24) + rng.normal(size=6)[g]

    def nll(p, d):
        u, sd, s = p["u"], jnp.exp(p["logsd"]), jnp.exp(p["logs"])
        r = d["y"] - p["mu"] - u[d["g"]]
        return (0.5 * jnp.sum(r**2) / s**2 + r.size * jnp.log(s) + 0.5 * jnp.sum(u**2) / sd**2
                + u.size * jnp.log(sd) + 0.5 * (r.size + u.size) * np.log(2 * np.pi))

    m = tmbx.Model(nll, {"u": jnp.zeros(6), "mu": 0.3, "logsd": 0.2, "logs": -0.1}, data={"y": y, "g": g},
                   random=["u"], map={"mu": [None], "logsd": [None], "logs": [None]})
    fit = m.fit()
    Z = np.eye(6)[g]
    V = np.exp(-0.2) * np.eye(24) + np.exp(0.4) * Z @ Z.T
    assert fit.converged
    assert fit.loglik == pytest.approx(st.multivariate_normal(np.full(24, 0.3), V).logpdf(y), abs=1e-9)


@pytest.mark.parametrize("n", [5, 300, 700])
def test_dense_inverse_from_cholesky_factor(n, monkeypatch):
    """`_chol_inverse` (one ``cho_solve`` up to `_dense.BLOCK`, recursive blocking
    above it) is S^-1, and its derivative is -S^-1 dS S^-1: at 300 with the block
    set to 128 (two levels of recursion), at 700 with the shipped block."""
    from tmbx import _dense
    from tmbx._sparse import _chol_inverse

    if n == 300:
        monkeypatch.setattr(_dense, "BLOCK", 128)
    assert 5 < _dense.BLOCK < n or n == 5
    rng = np.random.default_rng(n)
    A = rng.normal(size=(n, n + 3))
    S = A @ A.T / n + 0.1 * np.eye(n)
    L = np.linalg.cholesky(S)
    Sinv = np.linalg.inv(S)
    np.testing.assert_allclose(np.asarray(_chol_inverse(jnp.asarray(L))), Sinv, rtol=1e-9, atol=1e-9)
    dL = np.tril(rng.normal(size=(n, n)))
    _, dinv = jax.jvp(_chol_inverse, (jnp.asarray(L),), (jnp.asarray(dL),))
    dS = dL @ L.T + L @ dL.T
    np.testing.assert_allclose(np.asarray(dinv), -Sinv @ dS @ Sinv, rtol=1e-7, atol=1e-7)
