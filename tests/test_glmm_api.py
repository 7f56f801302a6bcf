"""tmbx.glmm's methods against glmmTMB (predict, ranef), closed forms and templates;
bad input."""

import json
import os

import jax.numpy as jnp
import jax.scipy.stats as jst
import numpy as np
import pandas as pd
import pytest

import tmbx

HERE = os.path.dirname(os.path.abspath(__file__))
SLEEP = json.load(open(os.path.join(HERE, "data", "inference", "sleepstudy_inference.json")))


@pytest.fixture(scope="module")
def sleep_fit():
    return tmbx.glmm("Reaction ~ Days + (Days|Subject)", data=tmbx.load_dataset("sleepstudy"))


def test_predict_matches_glmmtmb(sleep_fit):
    ref = SLEEP["predict"]
    new = pd.DataFrame(ref["newdata"])
    for kind, re_form in (("conditional", None), ("population", "NA")):
        out = sleep_fit.predict(newdata=new, re_form=re_form, se_fit=True)
        np.testing.assert_allclose(out["fit"], ref[kind]["fit"], rtol=1e-5)
        np.testing.assert_allclose(out["se_fit"], ref[kind]["se"], rtol=2e-3)


@pytest.mark.parametrize("layout", ["arrow", "dense", "banded"])
def test_prediction_se_from_row_effects_equals_reverse_mode(layout):
    """predict's standard errors take the random part P H^-1 P' from one forward
    derivative per term and column and the inverse Hessian's entries between each
    row's own effects (head-tail entries of the arrow layout among them); they
    equal the rows x rows reverse-mode computation to rounding, on a crossed
    Poisson GLMM with a random slope."""
    rng = np.random.default_rng(1)
    n, na, nb = 300, 30, 8
    a, b, x = rng.integers(0, na, n), rng.integers(0, nb, n), rng.normal(size=n)
    y = rng.poisson(np.exp(0.2 + 0.3 * x + 0.5 * rng.normal(size=na)[a] + 0.4 * rng.normal(size=nb)[b]))
    df = pd.DataFrame(dict(y=y.astype(float), x=x, a=pd.Categorical(a), b=pd.Categorical(b)))
    fit = tmbx.glmm("y ~ x + (1|a) + (1 + x|b)", data=df, family="poisson", layout=layout)
    assert fit.model.laplace.layout.kind == layout
    new = df.iloc[:40].assign(a=pd.Categorical(np.where(np.arange(40) < 5, 99, a[:40])))  # 5 new levels
    for kind in ("link", "response"):
        _, d = fit._newdata(new)
        prog = fit._predict_program(kind, False)
        phi = lambda xx, uu: prog(xx, uu, d)
        assert fit._row_effect_pairs(d) is not None  # (the layout gives the entries: not reverse mode twice)
        np.testing.assert_allclose(fit._delta_se(phi, d), fit._delta_se(phi), rtol=1e-10)


def test_prediction_se_of_a_structured_term_equals_reverse_mode():
    """An ar1 term (each row's prediction depends on all of its subject's four
    effects: 16 pairs a row) through the row-effects path equals reverse mode."""
    df = tmbx.load_dataset("orthodont")
    fit = tmbx.glmm("distance ~ age + Sex + ar1(C(age) + 0|Subject)", data=df)
    _, d = fit._newdata(None)
    prog = fit._predict_program("link", False)
    phi = lambda xx, uu: prog(xx, uu, d)
    assert fit._row_effect_pairs(d)[0].shape[1] == 4
    want = fit._delta_se(phi)
    np.testing.assert_allclose(fit._delta_se(phi, d), want, rtol=1e-10)


@pytest.mark.parametrize("layout", [None, "banded"])
def test_ranef_matches_glmmtmb(sleep_fit, layout):
    """The modes and conditional sds, on the chosen layout and on a banded one
    (the conditional covariance blocks from its selected inverse)."""
    ref = SLEEP["ranef"]
    fit = sleep_fit if layout is None else tmbx.glmm("Reaction ~ Days + (Days|Subject)",
                                                     data=tmbx.load_dataset("sleepstudy"), layout=layout)
    assert layout is None or fit.model.laplace.layout.kind == layout
    re = fit.ranef()["Subject"]
    modes = pd.DataFrame(ref["mode"]).set_index("_row")
    np.testing.assert_allclose(re["Intercept"].to_numpy(), modes["(Intercept)"].to_numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(re["Days"].to_numpy(), modes["Days"].to_numpy(), rtol=1e-4, atol=1e-4)
    sds = np.asarray(ref["cond_sd"])  # glmmTMB's condVar sds, rows = levels, cols = terms
    np.testing.assert_allclose(re["se:Intercept"].to_numpy(), sds[:, 0], rtol=2e-3)
    np.testing.assert_allclose(re["se:Days"].to_numpy(), sds[:, 1], rtol=2e-3)


def test_summary_and_basic_methods(sleep_fit):
    text = str(sleep_fit.summary())
    assert "Subject" in text and "Days" in text and "Conditional model" in text
    assert sleep_fit.nobs == 180
    assert abs(sleep_fit.aic - (-2 * sleep_fit.loglik + 2 * 6)) < 1e-9
    r = sleep_fit.residuals()
    np.testing.assert_allclose(r, tmbx.load_dataset("sleepstudy")["Reaction"] - sleep_fit.fitted())
    pr = sleep_fit.residuals("pearson")
    np.testing.assert_allclose(pr, r / sleep_fit.sigma, rtol=1e-10)
    sims = sleep_fit.simulate(nsim=200, seed=1)
    assert sims.shape == (200, 180)
    # simulated data vary around the population mean with the marginal variance
    vc = sleep_fit.varcorr["Subject"].cov.to_numpy()
    X = np.column_stack([np.ones(180), tmbx.load_dataset("sleepstudy")["Days"]])
    marg = np.einsum("ij,jk,ik->i", X, vc, X) + sleep_fit.sigma**2
    assert abs(sims.var(axis=0).mean() / marg.mean() - 1) < 0.1
    ci = sleep_fit.confint()
    assert list(ci.columns) == ["estimate", "lower", "upper"]
    assert "sd_Intercept|Subject" in ci.index and "sigma" in ci.index
    with pytest.raises(ValueError, match="not parameters"):
        sleep_fit.confint(parm="nope")


def test_wald_ci_matches_glmmtmb(sleep_fit):
    ref = SLEEP["wald_ci_glmmTMB"]
    ci = sleep_fit.confint()
    names = {"(Intercept)": "Intercept", "Std.Dev.(Intercept)|Subject": "sd_Intercept|Subject",
             "Std.Dev.Days|Subject": "sd_Days|Subject", "sigma": "sigma", "Days": "Days"}
    for rname, lo, hi in zip(ref["names"], ref["lower"], ref["upper"]):
        if rname not in names:
            continue
        row = ci.loc[names[rname]]
        width = hi - lo
        assert abs(row["lower"] - lo) < 1e-3 * width, rname
        assert abs(row["upper"] - hi) < 1e-3 * width, rname


def test_formula_fit_equals_handwritten_template():
    """The formula layer's Poisson random-slope GLMM equals the same model written
    as a template (different parameterization of the random effects: Laplace is
    invariant to it)."""
    rng = np.random.default_rng(3)
    ng, per = 25, 12
    g = np.repeat(np.arange(ng), per)
    x = rng.normal(size=g.size)
    b0, b1 = rng.normal(0, 0.6, ng), rng.normal(0, 0.3, ng)
    y = rng.poisson(np.exp(0.4 + b0[g] + (0.2 + b1[g]) * x))
    df = pd.DataFrame({"y": y, "x": x, "g": g.astype(str)})
    fit = tmbx.glmm("y ~ x + (1 + x || g)", data=df, family="poisson")

    def nll(p, d):
        eta = p["beta"][0] + p["beta"][1] * d["x"] + p["b0"][d["g"]] + p["b1"][d["g"]] * d["x"]
        lik = jst.poisson.logpmf(d["y"], jnp.exp(eta)).sum()
        pri = jst.norm.logpdf(p["b0"], 0, jnp.exp(p["ls"][0])).sum() + jst.norm.logpdf(p["b1"], 0, jnp.exp(p["ls"][1])).sum()
        return -(lik + pri)

    codes = pd.Categorical(df["g"]).codes
    m = tmbx.Model(nll, dict(beta=np.zeros(2), ls=np.zeros(2), b0=np.zeros(ng), b1=np.zeros(ng)),
                   data=dict(y=y.astype(float), x=x, g=codes), random=["b0", "b1"])
    ref = m.fit()
    assert abs(fit.loglik - ref.loglik) < 1e-6
    np.testing.assert_allclose(fit.fixef["cond"].to_numpy(), ref.par["beta"], atol=1e-4)
    np.testing.assert_allclose(fit.varcorr["g"].sd.to_numpy(), np.exp(ref.par["ls"]), rtol=1e-4)
    np.testing.assert_allclose(fit.se()["cond"].to_numpy(), ref.sdreport().se["beta"], rtol=1e-3)


def test_simulate_and_refit_recovers_truth():
    rng = np.random.default_rng(5)
    ng, per = 60, 10
    g = np.repeat(np.arange(ng), per)
    x = rng.normal(size=g.size)
    y = rng.binomial(1, 1 / (1 + np.exp(-(-0.3 + 0.8 * x + rng.normal(0, 1.0, ng)[g]))))
    df = pd.DataFrame({"y": y, "x": x, "g": g})
    fit = tmbx.glmm("y ~ x + (1|g)", data=df, family="binomial")
    est = fit.fixef["cond"]
    se = fit.se()["cond"]
    assert abs(est["x"] - 0.8) < 3 * se["x"]
    assert abs(est["Intercept"] + 0.3) < 3 * se["Intercept"]
    assert 0.5 < fit.varcorr["g"].sd.iloc[0] < 1.6


def test_anova_lrt():
    df = tmbx.load_dataset("sleepstudy")
    f0 = tmbx.glmm("Reaction ~ Days + (1|Subject)", data=df)
    f1 = tmbx.glmm("Reaction ~ Days + (Days|Subject)", data=df)
    tab = tmbx.anova(f0, f1)
    assert list(tab["npar"]) == [4, 6]
    assert abs(tab["Chisq"].iloc[1] - 2 * (f1.loglik - f0.loglik)) < 1e-9
    ref = SLEEP["lrt"][0]["table"][1]
    assert abs(tab["Chisq"].iloc[1] - ref["Chisq"]) < 1e-3 * ref["Chisq"]
    assert abs(np.log(tab["Pr(>Chisq)"].iloc[1]) - np.log(ref["Pr(>Chisq)"])) < 1e-3 * abs(np.log(ref["Pr(>Chisq)"]))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(formula="Reaction ~ Dayz + (1|Subject)"), "Dayz"),
    (dict(formula="Reaction ~ Days + (1|Subject", ), "parse|parenthes|\\)"),
    (dict(formula="Reaction ~ Days + (1|Subject)", family="poissson"), "poisson"),
    (dict(formula="Reaction ~ Days + foo(Days|Subject)"), "structure|foo"),
    (dict(formula="Reaction ~ Days + ar1(Days + 0|Subject)"), "factor"),
    (dict(formula="Reaction ~ Days + (1|Subject)", layout="block"), "layout must be one of"),
    (dict(formula="Reaction ~ Days + (1|Subject)", start={"beta": [1.0, 2.0, 3.0]}),
     "start\\['beta'\\] has 3 value.*beta has 2 \\(Intercept, Days\\)"),
])
def test_bad_input_is_refused_clearly(kwargs, match):
    df = tmbx.load_dataset("sleepstudy")
    with pytest.raises(ValueError, match=match):
        tmbx.glmm(data=df, **kwargs)


def test_empty_data_and_bad_devices_are_refused_clearly():
    df = tmbx.load_dataset("sleepstudy")
    with pytest.raises(ValueError, match="no rows"):
        tmbx.glmm("Reaction ~ Days + (1|Subject)", data=df.iloc[:0])
    with pytest.raises(TypeError, match="list of JAX devices"):
        tmbx.glmm("Reaction ~ Days + (1|Subject)", data=df, devices="gpu")


def test_response_outside_support_and_single_level():
    df = tmbx.load_dataset("sleepstudy")
    with pytest.raises(ValueError, match="negative|count|integer"):
        tmbx.glmm("Reaction ~ Days + (1|Subject)", data=df.assign(Reaction=-df["Reaction"]), family="poisson")
    one = df.assign(G="a")
    with pytest.raises(ValueError, match="level"):
        tmbx.glmm("Reaction ~ Days + (1|G)", data=one)


def test_missing_values_are_dropped_with_a_message():
    df = tmbx.load_dataset("sleepstudy").copy()
    df.loc[3, "Days"] = np.nan
    with pytest.warns(UserWarning, match="missing|NA|dropp"):
        fit = tmbx.glmm("Reaction ~ Days + (1|Subject)", data=df)
    assert fit.nobs == 179


def _count_primitive(jaxpr, name, where=lambda eqn: True):
    """Equations of primitive ``name`` in ``jaxpr`` and its sub-jaxprs (those for
    which ``where(eqn)`` holds)."""
    from jax.extend.core import jaxprs_in_params

    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name and bool(where(eqn))
        for sub in jaxprs_in_params(eqn.params):
            n += _count_primitive(sub, name, where)
    return n


def test_a_fit_computes_the_familys_data_only_terms_once():
    """``log(n choose y)`` (binomial with trials) depends on the data alone: the fit
    program computes it once (`Family.log_norm`), not in each evaluation of the
    objective (30 ``lgamma`` calls before); a refit to a new response recomputes it
    (its log-likelihood is a fresh fit's, which a stale one would miss by the
    difference of the two responses' ``sum(log(n choose y))``)."""
    import jax

    cbpp = tmbx.load_dataset("cbpp")
    form = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
    fit = tmbx.glmm(form, data=cbpp, family="binomial")
    m = fit.model
    x0, u0 = m._starts(None)
    in_fit = _count_primitive(jax.make_jaxpr(m._fit_impl)(x0, u0, m.data).jaxpr, "lgamma")
    y, n = np.asarray(m.data["y"]), np.asarray(m.data["trials"])
    in_norm = _count_primitive(jax.make_jaxpr(fit.family.log_norm)(y, n).jaxpr, "lgamma")
    assert in_norm > 0 and in_fit == in_norm
    rng = np.random.default_rng(5)
    y2 = rng.binomial(cbpp["size"].to_numpy(), 0.25)
    refit = fit.refit(newresp=y2.astype(float))
    fresh = tmbx.glmm(form, data=cbpp.assign(incidence=y2), family="binomial")
    assert refit.loglik == pytest.approx(fresh.loglik, abs=1e-7)
    assert abs(refit.loglik - fit.loglik) > 1.0


def test_an_intercept_only_dispersion_is_one_value_per_evaluation():
    """glmmTMB's default ``dispformula = ~1`` gives the family one dispersion, not
    one per row: the Gamma model's ``lgamma(1 / phi)`` is then computed on a scalar
    (it was an N-vector, half of a 1e5-row refit's time); the fit agrees with the
    same model whose dispersion design is not recognized as intercept-only."""
    import jax

    from tmbx.formula._api import build_design, build_template

    cake = tmbx.load_dataset("cake")
    form = "angle ~ temperature + (1 | replicate)"
    fit = tmbx.glmm(form, data=cake, family="Gamma(link='log')")
    m = fit.model
    x0, u0 = m._starts(None)
    n = len(cake)

    row_length = lambda eqn: n in eqn.outvars[0].aval.shape
    assert _count_primitive(jax.make_jaxpr(m._fit_impl)(x0, u0, m.data).jaxpr, "lgamma", row_length) == 0
    # the same dispersion as a per-row design (an offset of zeros added by hand)
    design = build_design(form, cake, dispformula="~1")
    disp = design.components["disp"]
    disp.offset[:] = 0.0
    disp.offset[0] = 1e-300  # not recognized as intercept-only: the per-row path
    per_row = build_template(design, "Gamma(link='log')").model.fit()
    assert per_row.loglik == pytest.approx(fit.loglik, abs=1e-8)
    np.testing.assert_allclose(per_row.x, fit._fit.x, rtol=1e-6, atol=1e-8)
