"""Priors (MAP fits): glmmTMB's priors interface and blme's Wishart.

References: blme 1.0.5's posterior modes on Dyestuff2
(tests/data/inference/singular_fits.json); posterior modes computed in R from
lme4's own objectives plus the prior (tests/reference_scripts/priors_map.R ->
tests/data/priors_extra.json): cbpp with normal and t priors on the fixed
effects (glmer's Laplace deviance), sleepstudy with blme's default Wishart
(lmer's REML deviance plus blme's Wishart term); log densities against
scipy.stats.
"""

import json
import math
import pathlib
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st

import tmbx
from tmbx.formula._design import build_design
from tmbx.formula._priors import build_prior_nll, parse_prior
from tmbx.formula._template import build_template

DATA = pathlib.Path(__file__).parent / "data"
DYE = json.loads((DATA / "inference" / "singular_fits.json").read_text())["dyestuff2"]
EXTRA = json.loads((DATA / "priors_extra.json").read_text())


def _glmm(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tmbx.glmm(*args, **kwargs)


@pytest.fixture(scope="module")
def sleep_template():
    des = build_design("Reaction ~ Days + (Days|Subject)", tmbx.load_dataset("sleepstudy"))
    return build_template(des, "gaussian")


def _resolve(tmpl, priors, random=()):
    return build_prior_nll(priors, params=tmpl.params, names=tmpl.names, terms=tmpl.terms,
                           family=tmpl.family, random=list(random))


# ---------------------------------------------------------------- blme's modes
@pytest.mark.parametrize("prior, key", [({"prior": "wishart()", "class": "cov"}, "blme_default_prior"),
                                        ({"prior": "gamma(1e8, 2.5)", "class": "ranef"}, "blme_gamma_prior")])
def test_dyestuff2_blme_modes(prior, key):
    fit = _glmm(DYE["python_formula"], data=tmbx.load_dataset("dyestuff2"), reml=True, priors=[prior])
    ref = DYE[key]
    assert fit.varcorr["Batch"].sd.iloc[0] == pytest.approx(ref["sd_Batch"], rel=1e-3)
    assert fit.sigma == pytest.approx(ref["sigma"], rel=1e-3)
    assert fit.fixef["cond"].iloc[0] == pytest.approx(ref["fixef"], rel=1e-3)
    assert not fit.is_singular()  # the prior keeps the variance away from zero
    if key == "blme_gamma_prior":  # (the summary compiles the sdreport: once is enough)
        text = str(fit.summary())
        assert "Posterior mode" in text and "gamma(1e8, 2.5) on theta: log_sd(Intercept)|Batch" in text


def test_sleepstudy_blme_default_mode():
    """blme 1.0.5 itself (blmer, converged with Nelder-Mead: its default optimizer
    stops early on this model, and the shared reference ``blme_wishart_REML``
    is that unconverged point, max|grad| = 0.32; see
    tests/reference_scripts/blme_sleepstudy.R)."""
    with open(DATA / "blme_sleepstudy.json") as fh:
        ref = json.load(fh)
    _check_sleepstudy_mode("wishart()", ref, fixef_rtol=1e-6)


def _check_sleepstudy_mode(prior, ref, fixef_rtol=1e-3):
    fit = _glmm("Reaction ~ Days + (Days|Subject)", data=tmbx.load_dataset("sleepstudy"), reml=True,
                priors=[{"prior": prior, "class": "cov"}])
    vc = fit.varcorr["Subject"]
    np.testing.assert_allclose(vc.sd.to_numpy(), ref["sd"], rtol=1e-3)
    assert vc.corr.iloc[1, 0] == pytest.approx(ref["cor"], abs=1e-3)
    assert fit.sigma == pytest.approx(ref["sigma"], rel=1e-3)
    np.testing.assert_allclose(fit.fixef["cond"].to_numpy(), list(ref["fixef"].values()), rtol=fixef_rtol)


@pytest.mark.slow
@pytest.mark.parametrize("df", ["4.5", "3.5"])
def test_sleepstudy_wishart_mode(df):
    ref = EXTRA["sleepstudy_wishart"][f"df={df}"]
    assert ref["python_formula"] == "Reaction ~ Days + (Days|Subject)"
    _check_sleepstudy_mode("wishart()" if df == "4.5" else f"wishart({df})", ref)


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["normal(0, 1)", "t(0, 1, 3)"])
def test_cbpp_fixef_priors(prior):
    ref = EXTRA["cbpp"][prior]
    fit = _glmm(ref["python_formula"], data=tmbx.load_dataset("cbpp"), family="binomial",
                priors=[{"prior": prior, "class": "fixef"}])
    np.testing.assert_allclose(fit.fixef["cond"].to_numpy(), list(ref["fixef"].values()), rtol=1e-3)
    assert fit.varcorr["herd"].sd.iloc[0] == pytest.approx(ref["sd_herd"], rel=1e-3)
    assert fit.loglik == pytest.approx(ref["log_posterior"], abs=1e-3)  # log posterior: lik + log prior


# ---------------------------------------------------------------- densities and scales
def test_elementwise_densities_match_scipy(sleep_template):
    tm = sleep_template
    p = {k: jnp.asarray(v, float) for k, v in tm.params.items()}
    p["beta"] = jnp.array([250.0, 10.0])
    p["theta"] = jnp.array([np.log(20.0), np.log(5.0), 0.3])
    sds = np.array([20.0, 5.0])
    cases = [
        ({"prior": "normal(1, 3)", "class": "fixef"}, st.norm(1, 3).logpdf(10.0)),  # intercept left out
        ({"prior": "t(0, 2, 4)", "class": "fixef", "coef": "(Intercept)"}, st.t(4, 0, 2).logpdf(250.0)),
        ({"prior": "cauchy(0, 2.5)", "class": "fixef", "coef": 2}, st.cauchy(0, 2.5).logpdf(10.0)),
        ({"prior": "normal(0, 1)", "class": "ranef"}, st.norm(0, 1).logpdf(np.array(p["theta"])).sum()),
        ({"prior": "gamma(1e8, 2.5)", "class": "ranef_sd"}, st.gamma(2.5, scale=1e8 / 2.5).logpdf(sds).sum()),
        ({"prior": "half_normal(10)", "class": "ranef"}, st.halfnorm(scale=10).logpdf(sds).sum()),
        ({"prior": "half_t(10, 3)", "class": "ranef_sd", "coef": "Subject"},
         (np.log(2) + st.t(3, 0, 10).logpdf(sds)).sum()),
        ({"prior": "half_cauchy(5)", "class": "ranef"}, st.halfcauchy(scale=5).logpdf(sds).sum()),
        ({"prior": "normal(0, 2)", "class": "ranef_cor"}, st.norm(0, 2).logpdf(0.3)),
        ({"prior": "normal(0, 2)", "class": "ranef", "coef": 3}, st.norm(0, 2).logpdf(0.3)),  # 1-based
        ({"prior": "gamma(2, 3)", "class": "ranef", "coef": "1+Days|Subject"},  # mean 2, shape 3
         st.gamma(3, scale=2 / 3).logpdf(sds).sum()),
    ]
    for prior, expected in cases:
        _, nll = _resolve(tm, [prior])
        assert -float(nll(p)) == pytest.approx(float(expected), rel=1e-10), prior


def test_lkj_and_wishart_densities(sleep_template):
    tm = sleep_template
    p = {k: jnp.asarray(v, float) for k, v in tm.params.items()}
    p["theta"] = jnp.array([np.log(20.0), np.log(5.0), 0.3])
    p["betadisp"] = jnp.array([np.log(25.0**2)])
    rho = 0.3 / math.sqrt(1 + 0.3**2)  # glmmTMB's 2x2 correlation transform
    S = np.array([[400.0, rho * 100], [rho * 100, 25.0]]) / 625.0
    _, nll = _resolve(tm, [{"prior": "lkj(2.5)", "class": "ranef_cor"}])
    assert -float(nll(p)) == pytest.approx(1.5 * math.log(1 - rho**2), rel=1e-10)
    _, nll = _resolve(tm, [{"prior": "wishart()", "class": "cov"}])  # df = k + 2.5
    assert -float(nll(p)) == pytest.approx(0.75 * np.linalg.slogdet(S)[1], rel=1e-10)
    _, nll = _resolve(tm, [{"prior": "wishart(6)", "class": "cov", "coef": "Days|Subject"}])
    assert -float(nll(p)) == pytest.approx(1.5 * np.linalg.slogdet(S)[1], rel=1e-10)


def test_priors_accepts_dataframe_and_sums(sleep_template):
    import pandas as pd

    tm = sleep_template
    p = {k: jnp.asarray(v, float) for k, v in tm.params.items()}
    df = pd.DataFrame({"prior": ["normal(0, 3)", "normal(250, 10)"], "class": ["fixef", "fixef"],
                       "coef": ["", "(Intercept)"]})
    specs, nll = _resolve(tm, df)
    assert [list(s.labels) for s in specs] == [["Days"], ["Intercept"]]
    expected = st.norm(0, 3).logpdf(0.0) + st.norm(250, 10).logpdf(float(p["beta"][0]))
    assert -float(nll(p)) == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("prior, match", [
    ({"prior": "laplace(0, 1)", "class": "fixef"}, "unknown prior distribution 'laplace'"),
    ({"prior": "normal(0)", "class": "fixef"}, "takes"),
    ({"prior": "normal(0, -1)", "class": "fixef"}, "positive"),
    ({"prior": "normal(0, 1)", "class": "fixed"}, "unknown prior class"),
    ({"prior": "normal(0, 1)", "class": "fixef_zi"}, "no betazi parameters"),
    ({"prior": "normal(0, 1)", "class": "fixef", "coef": "Weeks"}, "no coefficient 'Weeks'"),
    ({"prior": "normal(0, 1)", "class": "fixef", "coef": 7}, "out of range"),
    ({"prior": "normal(0, 1)", "class": "ranef", "coef": "Batch"}, "no random-effect term 'Batch'"),
    ({"prior": "half_normal(1)", "class": "fixef"}, "not for fixed effects"),
    ({"prior": "wishart(3)", "class": "ranef"}, "use class 'cov'"),
    ({"prior": "normal(0, 1)", "class": "cov"}, "wishart"),
    ({"prior": "wishart(0.5)", "class": "cov"}, "df must exceed"),
    ("normal(0, 1)", "DataFrame, a list of dicts"),
])
def test_bad_priors(sleep_template, prior, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _resolve(sleep_template, prior if isinstance(prior, str) else [prior])


def test_reml_fixef_prior_refused():
    with pytest.raises(ValueError, match="REML"):
        tmbx.glmm("Reaction ~ Days + (Days|Subject)", data=tmbx.load_dataset("sleepstudy"), reml=True,
                  priors=[{"prior": "normal(0, 3)", "class": "fixef"}])


def test_parse_prior():
    assert parse_prior("gamma(1e8, 2.5)") == ("gamma", (1e8, 2.5))
    assert parse_prior(" t( 0 , 3, 3 ) ") == ("t", (0.0, 3.0, 3.0))
    assert parse_prior("wishart()") == ("wishart", ())
