"""Satterthwaite / Kenward-Roger / containment df for LMMs, against lmerTest 3.1.3,
pbkrtest 0.5.2 and nlme 3.1.162 (tests/data/cases, tests/data/inference and
tests/data/inference_extra_ddf_anova.json from tests/reference_scripts/ddf_anova_extra.R)."""

import json
import os

import numpy as np
import pytest

import tmbx

HERE = os.path.dirname(__file__)


def _load(path):
    with open(path) as fh:
        return json.load(fh)


CASES = os.path.join(HERE, "data", "cases")
EXTRA = _load(os.path.join(HERE, "data", "inference_extra_ddf_anova.json"))
SLEEP = _load(os.path.join(HERE, "data", "inference", "sleepstudy_inference.json"))
RTOL = 1e-3


def case(name):
    return _load(os.path.join(CASES, f"{name}.json"))


def close(a, b, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=rtol)


def close_p(a, b, rtol=RTOL):
    """p-values within rtol relative on the log scale."""
    close(np.log(np.asarray(a, float)), np.log(np.asarray(b, float)), rtol)


def check_table(tab, ref, cols=("Estimate", "Std. Error", "df", "t value")):
    assert len(tab) == len(ref)
    for c in cols:
        close(tab[c].to_numpy(), [r[c] for r in ref])
    close_p(tab["Pr(>|t|)"].to_numpy(), [r["Pr(>|t|)"] for r in ref])


@pytest.fixture(scope="module")
def sleep_reml():
    return tmbx.glmm("Reaction ~ Days + (Days|Subject)", data=tmbx.load_dataset("sleepstudy"), reml=True)


@pytest.fixture(scope="module")
def orth():
    df = tmbx.load_dataset("orthodont")
    return (tmbx.glmm("distance ~ age + Sex + (1|Subject)", data=df, reml=True),
            tmbx.glmm("distance ~ 1 + (1|Subject)", data=df, reml=True))


def test_sleepstudy_satterthwaite_and_kr(sleep_reml):
    ref = case("sleepstudy_us_reml")["lme4"]
    check_table(sleep_reml.coef_table(ddf="satterthwaite"), ref["satterthwaite"])
    check_table(sleep_reml.coef_table(ddf="kenward-roger"), ref["kenward_roger"])


def test_sleepstudy_kr_test(sleep_reml):
    ref = SLEEP["kenward_roger_F"]
    fit0 = tmbx.glmm(ref["null"], data=tmbx.load_dataset("sleepstudy"), reml=True)
    res = tmbx.kr_test(fit0, sleep_reml)
    close([res["F"], res["ddf"]], [ref["F"], ref["ddf"]])
    assert res["ndf"] == ref["ndf"]
    close_p(res["p"], ref["p"])


def test_sleepstudy_ml_satterthwaite_and_kr_needs_reml():
    fit = tmbx.glmm("Reaction ~ Days + (Days|Subject)", data=tmbx.load_dataset("sleepstudy"), reml=False)
    check_table(fit.coef_table(ddf="satterthwaite"), case("sleepstudy_us_ml")["lme4"]["satterthwaite"])
    with pytest.raises(ValueError, match="REML"):
        fit.coef_table(ddf="kenward-roger")


def test_orthodont_tables_and_containment(orth):
    fit, _ = orth
    ref = EXTRA["orthodont"]
    check_table(fit.coef_table(ddf="satterthwaite"), ref["satterthwaite"])
    check_table(fit.coef_table(ddf="kenward-roger"), ref["kenward_roger"])
    # nlme's level counting: age within subjects (80), Sex between (25), intercept 80
    tab = fit.coef_table(ddf="containment")
    close(tab["df"].to_numpy(), [r["DF"] for r in ref["nlme_df"]], 1e-12)
    close_p(tab["Pr(>|t|)"].to_numpy(), [r["p-value"] for r in ref["nlme_df"]])


@pytest.mark.parametrize("ddf, key", [("satterthwaite", "anova3_satterthwaite"),
                                      ("kenward-roger", "anova3_kenward_roger")])
def test_orthodont_anova_f(orth, ddf, key):
    fit, _ = orth
    ref = EXTRA["orthodont"][key]
    tab = fit.anova(type=3, ddf=ddf)
    assert list(tab.index) == [r["_row"] for r in ref]
    for c in ("Sum Sq", "F value", "NumDF", "DenDF"):
        close(tab[c].to_numpy(), [r[c] for r in ref])
    close_p(tab["Pr(>F)"].to_numpy(), [r["Pr(>F)"] for r in ref])
    tab2 = fit.anova(type=2, ddf=ddf)  # main effects only: type 2 = type 3
    close(tab2["F value"].to_numpy(), [r["F value"] for r in EXTRA["orthodont"]["anova2_satterthwaite"]])


@pytest.mark.parametrize("L, ddf, key", [([0, 1, -1], "satterthwaite", "contest_1d"),
                                         ([[0, 1, 0], [0, 0, 1]], "satterthwaite", "contest_2d_satterthwaite"),
                                         ([[0, 1, 0], [0, 0, 1]], "kenward-roger", "contest_2d_kenward_roger")])
def test_orthodont_contest(orth, L, ddf, key):
    fit, _ = orth
    ref = EXTRA["orthodont"][key][0]
    res = fit.contrast(L, ddf=ddf).iloc[0]
    for c in ("F value", "NumDF", "DenDF", "Sum Sq"):
        close(res[c], ref[c])
    close_p(res["Pr(>F)"], ref["Pr(>F)"])


def test_orthodont_kr_test_scaled(orth):
    fit, fit0 = orth
    ref = EXTRA["orthodont"]["krmodcomp"][0]
    res = tmbx.kr_test(fit, fit0)  # either order
    close([res["F"], res["ddf"], res["F_scaling"]], [ref["stat"], ref["ddf"], ref["F.scaling"]])
    assert res["ndf"] == 2
    close_p(res["p"], ref["p.value"])


def test_bad_input(orth):
    fit, _ = orth
    with pytest.raises(ValueError, match="ddf must be one of"):
        fit.coef_table(ddf="wrong")
    cbpp = tmbx.load_dataset("cbpp")
    glmm = tmbx.glmm("cbind(incidence, size - incidence) ~ period + (1|herd)", data=cbpp, family="binomial")
    with pytest.raises(ValueError, match="linear mixed models.*parametric bootstrap"):
        glmm.coef_table(ddf="satterthwaite")
    with pytest.raises(ValueError, match="linear mixed models"):
        glmm.anova(ddf="kenward-roger")
    other = tmbx.glmm("distance ~ age + (1|Subject)",
                      data=tmbx.load_dataset("orthodont").iloc[:100], reml=True)
    with pytest.raises(ValueError, match="different data"):
        tmbx.kr_test(other, fit)


@pytest.mark.slow
def test_penicillin_crossed():
    ref = case("penicillin_crossed")["lme4"]
    fit = tmbx.glmm("diameter ~ 1 + (1|plate) + (1|sample)", data=tmbx.load_dataset("penicillin"), reml=True)
    check_table(fit.coef_table(ddf="satterthwaite"), ref["satterthwaite"])
    check_table(fit.coef_table(ddf="kenward-roger"), ref["kenward_roger"])
    with pytest.raises(ValueError, match="nested"):
        fit.coef_table(ddf="containment")


@pytest.mark.slow
def test_cake_interaction_type3_and_kr():
    ref = EXTRA["cake"]
    df = tmbx.load_dataset("cake")
    fit = tmbx.glmm("angle ~ recipe * temp + (1|recipe:replicate)", data=df, reml=True)
    check_table(fit.coef_table(ddf="satterthwaite"), ref["satterthwaite"])
    check_table(fit.coef_table(ddf="kenward-roger"), ref["kenward_roger"])
    # lmerTest's type 3 does not depend on the coding: temp is the slope averaged over recipes
    tab = fit.anova(type=3, ddf="satterthwaite")
    for c in ("F value", "NumDF", "DenDF"):
        close(tab[c].to_numpy(), [r[c] for r in ref["anova3_satterthwaite"]])
    # lmerTest's type 2: recipe is not "contained" in recipe:temp (different numeric variables)
    tab = fit.anova(type=2, ddf="satterthwaite")
    for c in ("F value", "NumDF", "DenDF", "Sum Sq"):
        close(tab[c].to_numpy(), [r[c] for r in ref["anova2_satterthwaite"]])
    fit0 = tmbx.glmm("angle ~ recipe + temp + (1|recipe:replicate)", data=df, reml=True)
    res = tmbx.kr_test(fit0, fit)
    close([res["F"], res["ddf"]], [ref["krmodcomp"][0]["stat"], ref["krmodcomp"][0]["ddf"]])


@pytest.mark.slow
@pytest.mark.parametrize("type, ddf, key", [(3, "satterthwaite", "anova3_satterthwaite"),
                                            (2, "satterthwaite", "anova2_satterthwaite"),
                                            (3, "kenward-roger", "anova3_kenward_roger")])
def test_cake_factorial_anova(cake_factorial, type, ddf, key):
    ref = EXTRA["cake_factorial"][key]
    tab = cake_factorial.anova(type=type, ddf=ddf)
    assert list(tab.index) == [r["_row"] for r in ref]
    for c in ("F value", "NumDF", "DenDF", "Sum Sq"):
        close(tab[c].to_numpy(), [r[c] for r in ref])
    close_p(tab["Pr(>F)"].to_numpy(), [r["Pr(>F)"] for r in ref])


@pytest.fixture(scope="module")
def cake_factorial():
    return tmbx.glmm(EXTRA["cake_factorial"]["formula"], data=tmbx.load_dataset("cake"), reml=True)


def _unbalanced_sleepstudy():
    df = tmbx.load_dataset("sleepstudy")
    return df.iloc[[i for i in range(len(df)) if i % 7 != 0]]  # R's df[-seq(1, 180, by = 7), ]


def test_unbalanced_random_slopes():
    """Unbalanced data: non-integer df, and KR's adjusted SEs differ from the plain ones."""
    ref = EXTRA["sleepstudy_unbalanced"]
    fit = tmbx.glmm(ref["formula_us"], data=_unbalanced_sleepstudy(), reml=True)
    check_table(fit.coef_table(ddf="satterthwaite"), ref["us_satterthwaite"])
    check_table(fit.coef_table(ddf="kenward-roger"), ref["us_kenward_roger"])


@pytest.mark.slow
@pytest.mark.parametrize("formula", ["Reaction ~ Days + diag(Days|Subject)",
                                     "Reaction ~ Days + (1|Subject) + (0 + Days|Subject)"])
def test_unbalanced_uncorrelated_slopes(formula):
    ref = EXTRA["sleepstudy_unbalanced"]
    fit = tmbx.glmm(formula, data=_unbalanced_sleepstudy(), reml=True)
    check_table(fit.coef_table(ddf="satterthwaite"), ref["diag_satterthwaite"])
    check_table(fit.coef_table(ddf="kenward-roger"), ref["diag_kenward_roger"])
    # the diag form has no covariance parameter for pbkrtest: a structured term has none of either
    ar = tmbx.glmm("Reaction ~ Days + ar1(C(Days) + 0|Subject)", data=tmbx.load_dataset("sleepstudy"), reml=True)
    with pytest.raises(ValueError, match="unstructured and diagonal"):
        ar.coef_table(ddf="kenward-roger")
