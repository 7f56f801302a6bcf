"""Gaussian LMMs by profiled least squares on cross-products (tmbx.formula._lmm).

The criterion is checked against the closed-form marginal likelihood of a linear
mixed model (a dense multivariate normal, scipy), whole fits against the general
Laplace path, and the glmmTMB reference cases go through it in
test_reference_cases.py.
"""

import math
import warnings

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

import tmbx
from tmbx.formula._design import build_design
from tmbx.formula._lmm import ProfiledLMM, lmm_applicable
from tmbx.formula._template import build_template, resolve_family


def _data(seed=1, n=240):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 12, n)
    h = rng.integers(0, 7, n)
    x = rng.normal(size=n)
    b = rng.normal(size=(12, 2)) * [1.0, 0.5]
    c = rng.normal(size=7) * 0.7
    y = 1.0 + 0.5 * x + b[g, 0] + b[g, 1] * x + c[h] + rng.normal(size=n) * 0.8 + 100.0
    return pd.DataFrame(dict(y=y, x=x, g=[f"g{i}" for i in g], h=[f"h{i}" for i in h],
                             w=rng.uniform(0.5, 2.0, n), off=rng.normal(size=n)))


def _template(df, formula, reml, weights=None, offset=None):
    design = build_design(formula, df, weights=weights, offset=offset)
    return build_template(design, resolve_family("gaussian", False), reml=reml)


def _closed_form(tpl, z, weights, reml):
    """-loglik: y ~ N(X beta + offset, diag(sigma^2 / w) + Z Sigma Z'), beta profiled
    (ML) or integrated (REML), and glmmTMB's weighting of each row's log density
    (w log N(y; mu, sigma^2) = log N(y; mu, sigma^2 / w) + its w-dependent constant)."""
    design = tpl.design
    cond = design.components["cond"]
    y = design.y - cond.offset
    X = cond.X
    n, p = X.shape
    nth = z.shape[0] - 1
    theta, d = z[:nth], float(z[nth])
    s2 = math.exp(d)
    V = np.diag(s2 / weights)
    for j, t in enumerate(tpl.terms):
        T = np.asarray(t.struct.factor(jnp.asarray(theta[t.theta_slice]))).reshape(t.k, t.k)
        Sig = T @ T.T
        Zt = np.zeros((n, t.m * t.k))
        idx = cond.re[j].index
        for a in range(t.k):
            Zt[np.arange(n), idx * t.k + a] = cond.re[j].Z[:, a]
        V += Zt @ np.kron(np.eye(t.m), Sig) @ Zt.T
    Vi = np.linalg.inv(V)
    beta = np.linalg.solve(X.T @ Vi @ X, X.T @ Vi @ y)
    r = y - X @ beta
    const = np.sum(-0.5 * weights * math.log(2 * math.pi * s2) + 0.5 * np.log(2 * math.pi * s2 / weights))
    if not reml:
        return -(st.multivariate_normal(X @ beta, V).logpdf(y) + const)
    _, logdet_v = np.linalg.slogdet(V)
    _, logdet_x = np.linalg.slogdet(X.T @ Vi @ X)
    return 0.5 * (logdet_v + logdet_x + r @ Vi @ r + (n - p) * math.log(2 * math.pi)) - const


@pytest.mark.parametrize("reml", [False, True])
def test_criterion_equals_closed_form_marginal(reml):
    df = _data()
    w = df["w"].to_numpy()
    tpl = _template(df, "y ~ x + (1 + x|g) + (1|h)", reml, weights=w, offset=df["off"].to_numpy())
    assert lmm_applicable(tpl)
    lmm = ProfiledLMM(tpl)
    rng = np.random.default_rng(3)
    for _ in range(3):
        z = np.concatenate([rng.normal(size=lmm.space.starts["theta"].size) * 0.5, [rng.normal() * 0.3]])
        ours = float(lmm.profiled(jnp.asarray(z), lmm.data)[0])
        assert ours == pytest.approx(_closed_form(tpl, z, w, reml), rel=1e-10, abs=1e-8)


@pytest.mark.parametrize("reml", [False, True])
def test_fit_equals_general_laplace_path(reml):
    df = _data(seed=5)
    kw = dict(data=df, reml=reml, weights=df["w"].to_numpy(), offset=df["off"].to_numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = tmbx.glmm("y ~ x + (1 + x|g) + (1|h)", **kw)
        b = tmbx.glmm("y ~ x + (1 + x|g) + (1|h)", method="laplace", **kw)
    assert getattr(a._fit, "_lmm", None) is not None and getattr(b._fit, "_lmm", None) is None
    assert a.loglik == pytest.approx(b.loglik, abs=1e-7)
    for comp in ("cond", "disp"):
        np.testing.assert_allclose(a.fixef[comp], b.fixef[comp], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.vcov()[comp].to_numpy(), b.vcov()[comp].to_numpy(), rtol=1e-4, atol=1e-8)
    for g in ("g", "h"):
        np.testing.assert_allclose(a.varcorr[g].sd, b.varcorr[g].sd, rtol=1e-5)
        np.testing.assert_allclose(a.ranef()[g].to_numpy(), b.ranef()[g].to_numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reml", [False, True])
def test_large_model_hessian_by_forward_differences(monkeypatch, reml):
    """A model compiled as a large one (``TMBX_FAST_COMPILE=0``) differences the
    gradient forward for its Hessian (n evaluations, not 2n); the Hessian, and so
    every standard error, matches central differences' (a small model's)."""
    df = _data(seed=5)
    kw = dict(data=df, reml=reml, weights=df["w"].to_numpy(), offset=df["off"].to_numpy())
    fits = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("TMBX_FAST_COMPILE", flag)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits[flag] = tmbx.glmm("y ~ x + (1 + x|g) + (1|h)", **kw)
        assert fits[flag]._fit._lmm._polish_options().fd_forward == (flag == "0")
    a, b = fits["0"], fits["1"]
    assert a.loglik == pytest.approx(b.loglik, abs=1e-9)
    H_a, H_b = a._fit.hessian, b._fit.hessian
    np.testing.assert_allclose(H_a, H_b, rtol=1e-4, atol=1e-4 * np.max(np.abs(H_b)))
    for comp in ("cond", "disp"):
        np.testing.assert_allclose(a.vcov()[comp].to_numpy(), b.vcov()[comp].to_numpy(), rtol=1e-4, atol=1e-10)


def test_not_used_where_it_does_not_apply():
    df = _data()
    design = build_design("y ~ x + (1|g)", df, dispformula="~x")
    tpl = build_template(design, resolve_family("gaussian", False))
    assert not lmm_applicable(tpl)  # dispersion model with a covariate
    design = build_design("y ~ x + (1|g)", df)
    tpl = build_template(design, resolve_family("Gamma(link='log')", False))
    assert not lmm_applicable(tpl)
    tpl = _template(df, "y ~ x + (1|g)", False)
    assert lmm_applicable(tpl) and not lmm_applicable(tpl, map={"theta": [None]})


@pytest.mark.parametrize("family", ["gaussian", "poisson"])
def test_refit_to_new_response_equals_fresh_fit(family):
    df = _data(seed=7)
    rng = np.random.default_rng(8)
    if family == "poisson":
        df["y"] = rng.poisson(np.exp(0.3 + 0.4 * df["x"]))
    y2 = (df["y"] + rng.normal(size=len(df))) if family == "gaussian" else rng.poisson(np.exp(0.2 + 0.5 * df["x"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = tmbx.glmm("y ~ x + (1|g)", data=df, family=family)
        r = a.refit(newresp=np.asarray(y2, float))
        b = tmbx.glmm("y ~ x + (1|g)", data=df.assign(y=y2), family=family)
        same = a.refit()
    assert r.loglik == pytest.approx(b.loglik, abs=1e-7)
    np.testing.assert_allclose(r.fixef["cond"], b.fixef["cond"], rtol=1e-6, atol=1e-8)
    assert same.loglik == pytest.approx(a.loglik, abs=1e-8)
    with pytest.raises(ValueError, match="rows"):
        a.refit(newresp=np.ones(3))


def test_laplace_machinery_built_inside_a_trace_is_the_same():
    """A least-squares fit never builds the general Laplace machinery; its first use
    may come inside a jit trace (profiles, bootstraps of other statistics), where the
    sparsity detection must still see the whole pattern."""
    import jax

    df = _data(seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = tmbx.glmm("y ~ x + (1 + x|g) + (1|h)", data=df)
        b = tmbx.glmm("y ~ x + (1 + x|g) + (1|h)", data=df, method="laplace")
    assert a.model._laplace is None
    x, u = jnp.asarray(a._fit.x), jnp.asarray(a._fit.u)
    val_a, g_a = jax.jit(jax.value_and_grad(lambda xx: a.model._objective(xx, u, a.model.data)[0]))(x)
    assert a.model._laplace is not None
    np.testing.assert_array_equal(a.model.laplace.hessian.rows, b.model.laplace.hessian.rows)
    val_b, g_b = jax.jit(jax.value_and_grad(lambda xx: b.model._objective(xx, u, b.model.data)[0]))(x)
    assert float(val_a) == pytest.approx(-a.loglik, abs=1e-7)
    assert float(val_a) == pytest.approx(float(val_b), abs=1e-9)
    np.testing.assert_allclose(g_a, g_b, atol=1e-7)


@pytest.mark.parametrize("reml", [False, True])
def test_sigma_as_a_parameter_gives_the_same_fit(reml):
    """Where a structure has no log sds to take relative to sigma, the optimizer keeps
    log sigma^2 as a parameter (`_fit_impl`): same optimum, Hessian and REML blocks."""
    df = _data(seed=13)
    fits = []
    for relative in (True, False):
        lmm = ProfiledLMM(_template(df, "y ~ x + (1 + x|g) + (1|h)", reml))
        assert lmm.relative
        lmm.relative = relative
        fits.append(lmm.fit_model())
    a, b = fits
    assert a.loglik == pytest.approx(b.loglik, abs=1e-8)
    np.testing.assert_allclose(a.x, b.x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.hessian, b.hessian, rtol=1e-3, atol=1e-6)
    if reml:
        for pa, pb in zip(a._reml_beta, b._reml_beta):
            np.testing.assert_allclose(pa, pb, rtol=1e-4, atol=1e-8)


def test_moment_start_for_crossed_random_intercepts():
    """Random intercepts start from one-factor-at-a-time analyses of variance
    (`ProfiledLMM._moment_start`): near the simulated sds, and the fit reaches the
    same optimum as from glmmTMB's start (all sds 1) in fewer evaluations; a start
    the user gives is kept."""
    rng = np.random.default_rng(11)
    n, na, nb = 6000, 300, 40
    a, b = rng.integers(0, na, n), rng.integers(0, nb, n)
    x = rng.normal(size=n)
    ua, ub, e = 0.8 * rng.normal(size=na), 0.4 * rng.normal(size=nb), rng.normal(size=n)
    y = 2.0 + 0.3 * x + ua[a] + ub[b] + e
    df = pd.DataFrame(dict(y=y, x=x, a=[f"a{i}" for i in a], b=[f"b{i}" for i in b]))
    form = "y ~ x + (1|a) + (1|b)"
    fit = tmbx.glmm(form, data=df)
    lmm = fit._fit._lmm
    zeta0, hinv0 = lmm._moment_start(lmm._y)
    # against the drawn effects' own sds relative to the drawn residuals'
    np.testing.assert_allclose(zeta0, np.log([ua.std(), ub.std()]) - np.log(e.std()), atol=0.15)
    assert hinv0.shape == (2, 2) and np.all(np.diag(hinv0) > 0)
    glmmtmb_start = tmbx.glmm(form, data=df, start={"theta": [0.0, 0.0]})
    assert fit.loglik == pytest.approx(glmmtmb_start.loglik, abs=1e-7)
    np.testing.assert_allclose(fit._fit.x, glmmtmb_start._fit.x, atol=1e-4)
    assert fit._fit.iterations < glmmtmb_start._fit.iterations
    # random slopes: no moment start (the template's start, as before)
    slopes = ProfiledLMM(_template(_data(), "y ~ x + (1 + x|g)", False))
    assert slopes._intercepts is None
