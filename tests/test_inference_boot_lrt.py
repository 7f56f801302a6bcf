"""Parametric bootstrap, likelihood-ratio tables and the bootstrap LRT.

References: lme4's bootMer percentile intervals and anova tables
(tests/data/inference/sleepstudy_inference.json), the chi-bar-square test of
cbpp's herd variance and the Poisson vs zero-inflated NB2 table of Salamanders;
closed forms for a balanced one-way LMM (scipy.stats).
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

import tmbx

INF = Path(__file__).parent / "data" / "inference"
SLEEP = json.loads((INF / "sleepstudy_inference.json").read_text())
CBPP = json.loads((INF / "cbpp_inference.json").read_text())
SAL = json.loads((INF / "salamanders_inference.json").read_text())
R_COLS = ["npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df", "Pr(>Chisq)"]


def _rel(a, b, tol=1e-3):
    return abs(a - b) <= tol * max(abs(b), 1e-12)


# ------------------------------------------------------------------ bootstrap
@pytest.fixture(scope="module")
def oneway():
    """Balanced one-way layout y_ij = mu + a_i + e_ij, m = 12 groups of n = 6."""
    rng = np.random.default_rng(11)
    m, n = 12, 6
    g = np.repeat(np.arange(m), n)
    y = 10.0 + rng.normal(0, 2.0, m)[g] + rng.normal(0, 1.0, m * n)
    df = pd.DataFrame({"y": y, "g": [f"g{i:02d}" for i in g]})
    return tmbx.glmm("y ~ 1 + (1|g)", df, reml=True), m, n


@pytest.fixture(scope="module")
def oneway_boot(oneway):
    return oneway[0].bootstrap(nsim=600, seed=3, progress=False)


def test_bootstrap_matches_closed_form(oneway, oneway_boot):
    """Given the true (fitted) parameters, the REML estimator of mu is the grand mean,
    exactly N(mu, (sd_a^2 + sigma^2 / n) / m), and sigma^2-hat is the within mean
    square, sigma^2 chi2_{m(n-1)} / (m(n-1)) (whenever the between variance is
    interior, which the chosen parameters make almost sure)."""
    fit, m, n = oneway
    boot = oneway_boot
    assert boot.n_failed == 0
    mu = fit.fixef["cond"]["Intercept"]
    sa, s = fit.varcorr["g"].sd.iloc[0], fit.sigma
    mu_star = boot.draws["Intercept"]
    assert st.kstest(mu_star, st.norm(mu, np.sqrt((sa**2 + s**2 / n) / m)).cdf).pvalue > 0.01
    dfw = m * (n - 1)
    s2_star = boot.draws["sigma"] ** 2
    assert st.kstest(s2_star * dfw / s**2, st.chi2(dfw).cdf).pvalue > 0.01
    # percentile interval of mu close to the exact normal quantiles (Monte Carlo error)
    ci = boot.confint(level=0.9, parm="Intercept")
    exact = st.norm(mu, np.sqrt((sa**2 + s**2 / n) / m)).ppf([0.05, 0.95])
    width = exact[1] - exact[0]
    assert abs(ci.loc["Intercept", "lower"] - exact[0]) < 0.15 * width
    assert abs(ci.loc["Intercept", "upper"] - exact[1]) < 0.15 * width


def test_bootstrap_fn_and_layout(oneway, oneway_boot):
    fit = oneway[0]
    boot = fit.bootstrap(nsim=40, seed=3, batch_size=250, progress=False,  # the fixture's program
                         fn=lambda p: {"icc": p["sd_Intercept|g"] ** 2 / (p["sd_Intercept|g"] ** 2 + p["sigma"] ** 2)})
    assert list(boot.draws.columns) == ["icc"] and len(boot.draws) == 40
    assert ((boot.draws["icc"] > 0) & (boot.draws["icc"] < 1)).all()
    ci = boot.confint()
    assert list(ci.columns) == ["estimate", "lower", "upper"] and ci.index.tolist() == ["icc"]
    sa, s = fit.varcorr["g"].sd.iloc[0], fit.sigma
    assert ci.loc["icc", "estimate"] == pytest.approx(sa**2 / (sa**2 + s**2))
    full = oneway_boot.confint()
    assert set(full.index) == {"Intercept", "sd_Intercept|g", "sigma"}
    assert (full["lower"] < full["estimate"]).all() and (full["estimate"] < full["upper"]).all()


def test_bootstrap_bad_input(oneway):
    fit = oneway[0]
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="nsim"):
            fit.bootstrap(nsim=bad, progress=False)
    with pytest.raises(ValueError, match="not parameters"):
        fit.confint(method="boot", parm="sd_x|g", nsim=10, batch_size=250, progress=False)


def test_failed_refits_are_reported():
    """Bootstrap objects count failures and warn; draws keep a NaN row for each."""
    from tmbx.inference._bootstrap import Bootstrap

    draws = pd.DataFrame({"a": [1.0, np.nan, 3.0, 2.0]})
    b = Bootstrap(draws, np.array([True, False, True, True]), {"a": 2.0}, np.array([0, 1, 0, 0]))
    assert b.n_failed == 1
    with pytest.warns(RuntimeWarning, match="1 of 4"):
        ci = b.confint(level=0.5)
    assert ci.loc["a", "lower"] == pytest.approx(1.5)


@pytest.mark.slow
def test_sleepstudy_bootstrap_matches_lme4():
    ref = SLEEP["boot_ci_lme4"]
    fit = tmbx.glmm("Reaction ~ Days + (Days|Subject)", tmbx.load_dataset("sleepstudy"))
    ci = fit.confint(method="boot", nsim=1000, seed=1, progress=False)
    for name, lo, hi in zip(ref["names"], ref["lower"], ref["upper"]):
        ours = name.replace("(Intercept)", "Intercept")
        width = hi - lo
        assert abs(ci.loc[ours, "lower"] - lo) < 0.15 * width, (ours, ci.loc[ours, "lower"], lo)
        assert abs(ci.loc[ours, "upper"] - hi) < 0.15 * width, (ours, ci.loc[ours, "upper"], hi)


# ------------------------------------------------------------------ anova
@pytest.fixture(scope="module")
def sleep_fits():
    d = tmbx.load_dataset("sleepstudy")
    return {"m0": tmbx.glmm("Reaction ~ Days + (1|Subject)", d),
            "m1": tmbx.glmm("Reaction ~ Days + (Days|Subject)", d),
            "m0d": tmbx.glmm("Reaction ~ Days + (1|Subject) + (0 + Days|Subject)", d)}


def _check_table(tab, ref_rows):
    for (_, row), ref in zip(tab.iterrows(), ref_rows):
        for col in R_COLS:
            r = ref.get(col)
            if r is None:
                assert pd.isna(row[col])
            elif col == "Pr(>Chisq)":
                assert _rel(np.log(row[col]), np.log(r)), (col, row[col], r)
            else:
                assert _rel(float(row[col]), r), (col, row[col], r)


def test_anova_matches_lme4(sleep_fits):
    f = sleep_fits
    with pytest.warns(UserWarning, match="boundary"):
        tab = tmbx.anova(f["m1"], f["m0"], names=["m1", "m0"])
    assert list(tab.index) == ["m0", "m1"]
    assert list(tab.columns[:8]) == R_COLS
    _check_table(tab, SLEEP["lrt"][0]["table"])
    # adding a variance (sd of Days, with its correlation): chi-bar-square 50:50 chi2_1, chi2_2
    x = tab["Chisq"].iloc[1]
    assert tab["Pr(>Chisq) mixture"].iloc[1] == pytest.approx(0.5 * st.chi2.sf(x, 1) + 0.5 * st.chi2.sf(x, 2))
    # only a correlation is added: no boundary, no mixture column
    tab2 = tmbx.anova(f["m0d"], f["m1"])
    assert "Pr(>Chisq) mixture" not in tab2.columns
    _check_table(tab2, SLEEP["lrt"][1]["table"])


def test_anova_refits_reml_by_ml(sleep_fits):
    reml = tmbx.glmm("Reaction ~ Days + (Days|Subject)", tmbx.load_dataset("sleepstudy"), reml=True)
    with pytest.warns(UserWarning, match="refitting model"):
        tab = tmbx.anova(sleep_fits["m0"], reml)
    _check_table(tab, SLEEP["lrt"][0]["table"])


def test_anova_variance_on_boundary_cbpp():
    ref = CBPP["lrt_herd_variance"]
    d = tmbx.load_dataset("cbpp")
    g0 = tmbx.glmm("cbind(incidence, size - incidence) ~ period", d, family="binomial")
    g1 = tmbx.glmm("cbind(incidence, size - incidence) ~ period + (1|herd)", d, family="binomial")
    with pytest.warns(UserWarning, match="conservative"):
        tab = tmbx.anova(g0, g1)
    assert _rel(tab["Chisq"].iloc[1], ref["stat"])
    assert _rel(np.log(tab["Pr(>Chisq)"].iloc[1]), np.log(ref["p_naive"]))
    assert _rel(np.log(tab["Pr(>Chisq) mixture"].iloc[1]), np.log(ref["p_boundary"]))


@pytest.mark.slow
def test_pb_test_variance_on_boundary_cbpp():
    """PBmodcomp's p-value from the same pair; under the null the herd variance is
    estimated at 0 about half the time (LRT* = 0), the chi-bar-square picture."""
    ref = CBPP["lrt_herd_variance"]
    d = tmbx.load_dataset("cbpp")
    g0 = tmbx.glmm("cbind(incidence, size - incidence) ~ period", d, family="binomial")
    g1 = tmbx.glmm("cbind(incidence, size - incidence) ~ period + (1|herd)", d, family="binomial")
    res = tmbx.pb_test(g0, g1, nsim=200, seed=1, progress=False)
    assert set(res) >= {"stat", "df", "p_chisq", "p_boot", "nsim_ok"}
    assert _rel(res["stat"], ref["stat"]) and res["df"] == 1 and res["nsim_ok"] == 200
    assert _rel(np.log(res["p_chisq"]), np.log(ref["p_naive"]))
    n_ge = int(np.sum(res["lrt_sim"] >= res["stat"] - 1e-8 * res["stat"]))
    assert res["p_boot"] == pytest.approx((1 + n_ge) / 201)
    assert res["p_boot"] < 0.03
    zero = np.mean(res["lrt_sim"] < 1e-4)
    assert 0.35 < zero < 0.85


def test_anova_errors(sleep_fits):
    f = sleep_fits
    d = tmbx.load_dataset("sleepstudy")
    other = tmbx.glmm("Reaction ~ Days + (1|Subject)", d.iloc[:170])
    with pytest.raises(ValueError, match="different data"):
        tmbx.anova(f["m0"], other)
    with pytest.raises(ValueError, match="different data"):
        tmbx.pb_test(f["m0"], other, nsim=5)
    shifted = tmbx.glmm("Reaction ~ Days + (1|Subject)", d.assign(Reaction=d["Reaction"] + 1.0))
    with pytest.raises(ValueError, match="different data"):
        tmbx.anova(f["m0"], shifted)
    with pytest.raises(ValueError, match="same number of parameters"):
        tmbx.anova(f["m0"], f["m0"])
    no_days = tmbx.glmm("Reaction ~ 1 + (Days|Subject)", d)
    with pytest.raises(ValueError, match="not nested"):
        tmbx.anova(no_days, f["m0"])  # m0's Days is not in the larger model
    with pytest.raises(ValueError, match="nsim"):
        tmbx.pb_test(f["m0"], f["m1"], nsim=0)
    with pytest.raises(ValueError, match="at least two"):
        tmbx.anova(f["m0"])


@pytest.mark.slow
def test_anova_poisson_vs_zinb2():
    ref = SAL["lrt_poisson_vs_zinb2"]
    d = tmbx.load_dataset("salamanders")
    zp = tmbx.glmm(SAL["models"]["poisson"], d, family="poisson")
    zn = tmbx.glmm("count ~ spp + mined + (1|site)", d, family="nbinom2", ziformula="~spp + mined")
    tab = tmbx.anova(zn, zp)
    # an older anova layout: "Df" is the number of parameters, "Chi Df" the test's df
    ref = [{**{k: v for k, v in r.items() if k not in ("Df", "Chi Df")}, "npar": r["Df"], "Df": r["Chi Df"]}
           for r in ref]
    _check_table(tab, ref)
