"""Wald chi-square tables (car::Anova 3.1.1 on glmmTMB 1.1.5 fits), drop1, linear
hypotheses (car::linearHypothesis) and marginal means (emmeans 1.8.4.1), against
tests/data/inference/*.json and tests/data/inference_extra_ddf_anova.json
(tests/reference_scripts/ddf_anova_extra.R); emmeans on models without an R
reference against its closed form from the fixed effects and their covariance."""

import json
import os

import numpy as np
import pytest
import scipy.stats as sst

import tmbx

HERE = os.path.dirname(__file__)


def _load(path):
    with open(path) as fh:
        return json.load(fh)


INF = os.path.join(HERE, "data", "inference")
CBPP = _load(os.path.join(INF, "cbpp_inference.json"))
SAL = _load(os.path.join(INF, "salamanders_inference.json"))
SLEEP = _load(os.path.join(INF, "sleepstudy_inference.json"))
EXTRA = _load(os.path.join(HERE, "data", "inference_extra_ddf_anova.json"))
RTOL = 1e-3


def close(a, b, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=rtol)


def close_p(a, b, rtol=RTOL):
    close(np.log(np.asarray(a, float)), np.log(np.asarray(b, float)), rtol)


def check_chisq(tab, ref, pcol="Pr(>Chisq)"):
    assert list(tab.index) == [r["_row"] for r in ref]
    close(tab["Chisq"].to_numpy(), [r["Chisq"] for r in ref])
    assert list(tab["Df"]) == [r["Df"] for r in ref]
    close_p(tab[pcol].to_numpy(), [r[pcol] for r in ref])


def check_drop1(tab, ref):
    assert list(tab.index) == [r["_row"] for r in ref]
    close(tab["AIC"].to_numpy(), [r["AIC"] for r in ref], 1e-6)
    close(tab["LRT"].to_numpy()[1:], [r["LRT"] for r in ref[1:]])
    close_p(tab["Pr(>Chi)"].to_numpy()[1:], [r["Pr(>Chi)"] for r in ref[1:]])


@pytest.fixture(scope="module")
def cbpp():
    return tmbx.glmm(CBPP["python_formula"], data=tmbx.load_dataset("cbpp"), family="binomial")


def test_cbpp_anova(cbpp):
    check_chisq(cbpp.anova(type=2), CBPP["anova_type2_wald"])
    check_chisq(cbpp.anova(type=3), CBPP["anova_type3_wald"])
    check_chisq(cbpp.anova(type="III"), CBPP["anova_type3_wald"])


def test_cbpp_drop1(cbpp):
    check_drop1(cbpp.drop1(test="Chisq"), CBPP["drop1_glmmTMB"])


def test_cbpp_emmeans_and_pairs(cbpp):
    em = cbpp.emmeans("period", type="response")
    ref = CBPP["emmeans_period_response"]
    tab = em.table
    assert list(tab.columns) == ["period", "prob", "SE", "df", "lower.CL", "upper.CL"]
    assert list(tab["period"].astype(str)) == [r["period"] for r in ref]
    for c in ("prob", "SE", "df", "lower.CL", "upper.CL"):
        close(tab[c].to_numpy(), [r[c] for r in ref])
    pr = em.pairs(adjust="tukey")
    ref = CBPP["emmeans_pairs_oddsratio"]
    assert list(pr["contrast"]) == [r["contrast"] for r in ref]
    for c in ("odds.ratio", "SE", "df", "t.ratio"):
        close(pr[c].to_numpy(), [r[c] for r in ref])
    close_p(pr["p.value"].to_numpy(), [r["p.value"] for r in ref])
    # link scale: differences, the same t ratios; holm-adjusted p from the raw t p-values
    link = cbpp.emmeans("period").pairs(adjust="holm")
    close(link["t.ratio"].to_numpy(), [r["t.ratio"] for r in ref])
    raw = 2 * sst.t.sf(np.abs(link["t.ratio"].to_numpy()), 51)
    order = np.argsort(raw)
    holm = np.maximum.accumulate(raw[order] * (6 - np.arange(6)))
    close(np.sort(link["p.value"].to_numpy()), np.minimum(holm, 1))


def test_cbpp_contrast(cbpp):
    b = cbpp.fixef["cond"].to_numpy()
    V = cbpp.vcov()["cond"].to_numpy()
    res = cbpp.contrast(["period[T.2] - period[T.3] = 0", "period4 = 0.5"])  # R's names work too
    L = np.array([[0, 1, -1, 0], [0, 0, 0, 1.0]])
    d = L @ b - [0, 0.5]
    chisq = d @ np.linalg.solve(L @ V @ L.T, d)
    close(res["Chisq"], chisq, 1e-10)
    assert res["Df"].iloc[0] == 2
    single = cbpp.contrast({"period[T.2]": 1, "period[T.3]": -1}).iloc[0]
    close(single["Chisq"], d[0] ** 2 / (L[0] @ V @ L[0]), 1e-10)
    adj = cbpp.contrast(L, rhs=[0, 0.5], adjust="bonferroni")
    z = d / np.sqrt(np.diag(L @ V @ L.T))
    close(adj["Pr(>|z|)"].to_numpy(), np.minimum(1, 2 * 2 * sst.norm.sf(np.abs(z))), 1e-10)
    with pytest.raises(ValueError, match="not a coefficient"):
        cbpp.contrast("period[T.9] = 0")
    with pytest.raises(ValueError, match="columns"):
        cbpp.contrast(np.ones(3))
    with pytest.raises(ValueError, match="not factors"):
        cbpp.emmeans("herd2")
    with pytest.raises(ValueError, match="type must be 2 or 3"):
        cbpp.anova(type=1)
    with pytest.raises(ValueError, match="no 'zi'"):
        cbpp.anova(component="zi")


@pytest.fixture(scope="module")
def zip_fit():
    r = EXTRA["salamanders_zip"]
    return tmbx.glmm(r["formula"], data=tmbx.load_dataset("salamanders"), family="poisson",
                     ziformula=r["ziformula"])


def test_zi_component_anova_emmeans_emtrends(zip_fit):
    r = EXTRA["salamanders_zip"]
    check_chisq(zip_fit.anova(type=2, component="zi"), r["anova2_zi"])
    check_chisq(zip_fit.anova(type=3, component="zi"), r["anova3_zi"])
    # closed form: zi ~ mined + cover, cover at its mean; probability by the delta method
    b = zip_fit.fixef["zi"].to_numpy()
    V = zip_fit.vcov()["zi"].to_numpy()
    cover = zip_fit.design.data["cover"].mean()
    L = np.array([[1, 0, cover], [1, 1, cover]])
    eta = L @ b
    se = np.sqrt(np.diag(L @ V @ L.T))
    em = zip_fit.emmeans("mined", type="response", component="zi").table
    p = 1 / (1 + np.exp(-eta))
    close(em["response"].to_numpy(), p, 1e-8)
    close(em["SE"].to_numpy(), p * (1 - p) * se, 1e-8)
    crit = sst.t.ppf(0.975, zip_fit.df_resid)
    close(em["upper.CL"].to_numpy(), 1 / (1 + np.exp(-(eta + crit * se))), 1e-8)
    tr = zip_fit.emtrends("mined", var="cover", component="zi").table
    close(tr["cover.trend"].to_numpy(), [b[2], b[2]], 1e-6)
    close(tr["SE"].to_numpy(), np.sqrt([V[2, 2]] * 2), 1e-6)
    # conditional model: Poisson rates, spp averaged over mined with equal weights
    bc = zip_fit.fixef["cond"]
    em = zip_fit.emmeans("spp", type="response")
    assert "rate" in em.table.columns
    eta_gp = bc["Intercept"] + 0.5 * bc["mined[T.no]"]
    close(em.table["rate"].iloc[0], np.exp(eta_gp), 1e-8)
    ratio = em.pairs().iloc[0]
    assert ratio["contrast"] == "GP / PR"
    close(ratio["ratio"], np.exp(-bc["spp[T.PR]"]), 1e-8)


@pytest.mark.slow
def test_sleepstudy_drop1():
    fit = tmbx.glmm(SLEEP["python_formula"], data=tmbx.load_dataset("sleepstudy"))
    check_drop1(fit.drop1(), SLEEP["drop1_glmmTMB"])


@pytest.mark.slow
def test_salamanders_zinb2_type3():
    df = tmbx.load_dataset("salamanders")
    fit = tmbx.glmm("count ~ spp + mined + (1|site)", data=df, family="nbinom2", ziformula="~spp + mined")
    check_chisq(fit.anova(type=3), SAL["anova_type3_wald_zinb2_cond"])
    check_chisq(fit.anova(type=3, component="zi"), SAL["anova_type3_wald_zinb2_zi"])


@pytest.mark.slow
def test_nbinom2_interaction_anova_drop1_hypotheses():
    r = EXTRA["salamanders_nb2"]
    fit = tmbx.glmm(r["formula"], data=tmbx.load_dataset("salamanders"), family="nbinom2")
    check_chisq(fit.anova(type=2), r["anova2"])  # marginality: spp tested after spp:mined's complement
    check_chisq(fit.anova(type=3), r["anova3"])
    check_drop1(fit.drop1(), r["drop1"])  # only cover and spp:mined can be dropped
    joint = fit.contrast(["sppPR - sppDM = 0", "sppDF = 0"]).iloc[0]
    close([joint["Chisq"], joint["Df"]], [r["lh_joint"]["Chisq"], r["lh_joint"]["Df"]])
    close_p(joint["Pr(>Chisq)"], r["lh_joint"]["p"])
    single = fit.contrast("spp[T.PR] - spp[T.DM] = 0").iloc[0]
    close(single["Chisq"], r["lh_single"]["Chisq"])


@pytest.mark.slow
def test_poisson_crossed_anova_drop1():
    r = EXTRA["salamanders_poisson_crossed"]
    fit = tmbx.glmm(r["formula"], data=tmbx.load_dataset("salamanders"), family="poisson")
    close(fit.loglik, r["logLik"], 1e-6)
    check_chisq(fit.anova(type=2), r["anova2"])
    check_chisq(fit.anova(type=3), r["anova3"])
    check_drop1(fit.drop1(), r["drop1"])


EMM = _load(os.path.join(HERE, "data", "emmeans_extra.json"))  # tests/reference_scripts/emmeans_extra.R


def check_emmeans(tab, ref, estimate):
    close(tab[estimate].to_numpy(), ref[estimate], 1e-4)
    for col in ("SE", "df", "lower.CL", "upper.CL"):
        close(tab[col].to_numpy(), ref[col], 1e-4)


def test_zip_emmeans_against_emmeans(zip_fit):
    """emmeans 1.8.4.1 on the glmmTMB fit: rates and Tukey-adjusted ratios of the
    conditional model, probabilities of the zero-inflation model."""
    r = EMM["salamanders_zip"]
    close(zip_fit.loglik, r["logLik"], 1e-6)
    em = zip_fit.emmeans("spp", type="response")
    check_emmeans(em.table, r["emmeans_spp_response"], "rate")
    pairs = em.pairs(adjust="tukey")
    ref = r["pairs_spp_ratio"]
    assert list(pairs["contrast"]) == ref["contrast"]
    for col in ("ratio", "SE", "t.ratio"):
        close(pairs[col].to_numpy(), ref[col], 1e-4)
    # Tukey p-values below ~1e-10 are at the end of both ptukey's and scipy's precision
    pv, pref = pairs["p.value"].to_numpy(), np.asarray(ref["p.value"])
    tiny = pref < 1e-10
    close_p(pv[~tiny], pref[~tiny], 1e-3)
    assert np.all(pv[tiny] < 1e-9)
    zi = zip_fit.emmeans("mined", type="response", component="zi").table
    check_emmeans(zi, r["emmeans_zi_mined_response"], "response")


@pytest.mark.slow
def test_gamma_dispersion_model():
    r = EXTRA["cake_gamma_disp"]
    fit = tmbx.glmm(r["formula"], data=tmbx.load_dataset("cake"), family=r["family"],
                    dispformula=r["dispformula"])
    close(fit.loglik, r["logLik"], 1e-6)
    tab = fit.anova(type=3)  # the intercept's p-value underflows to 0 in R: compare the statistics
    assert list(tab.index) == [x["_row"] for x in r["anova3_cond"]]
    close(tab["Chisq"].to_numpy(), [x["Chisq"] for x in r["anova3_cond"]])
    close_p(tab["Pr(>Chisq)"].to_numpy()[1:], [x["Pr(>Chisq)"] for x in r["anova3_cond"][1:]])
    check_chisq(fit.anova(type=3, component="disp"), r["anova3_disp"])
    em = fit.emmeans("recipe", type="response").table
    assert "response" in em.columns
    b = fit.fixef["cond"]
    temps = [c for c in b.index if c.startswith("temperature")]
    close(em["response"].iloc[0], np.exp(b["Intercept"] + sum(b[t] for t in temps) / 6), 1e-8)
    ref = EMM["cake_gamma_disp"]
    check_emmeans(em, ref["emmeans_recipe_response"], "response")
    pairs = fit.emmeans("recipe", type="response").pairs()
    for col in ("ratio", "SE", "t.ratio"):
        close(pairs[col].to_numpy(), ref["pairs_recipe_ratio"][col], 1e-3)
    close_p(pairs["p.value"].to_numpy(), ref["pairs_recipe_ratio"]["p.value"], 1e-3)
