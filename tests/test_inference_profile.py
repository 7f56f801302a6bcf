"""Likelihood profiles (tmbx.inference._profile) against lme4's and glmmTMB's profile intervals.

References: tests/data/inference/*_inference.json (``profile_ci_lme4``),
tests/data/cases/*.json (``lme4.profile_ci`` of REML fits: lme4 profiles the ML
deviance), and, for models those files do not cover, the JSON written by
tests/reference_scripts/inference_profile_*.R (lme4 for crossed GLMMs and a
singular LMM, glmmTMB for a zero-inflated model and an ar1 covariance).
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tmbx

DATA = Path(__file__).parent / "data"
INF = DATA / "inference"
EXTRA = INF / "profile_extra.json"


def _load(path):
    return json.loads(Path(path).read_text())


def _py_name(r_name):
    """R's names to ours: (Intercept) -> Intercept, period2 -> period[T.2] (by lookup)."""
    return r_name.replace("(Intercept)", "Intercept")


def _check_ci(ci, ref, tol=5e-3, rename=None):
    """Each limit within ``tol`` of the reference interval's width."""
    rename = rename or {}
    checked = 0
    for name, lo, hi in zip(ref["names"], ref["lower"], ref["upper"]):
        ours = rename.get(name, _py_name(name))
        width = hi - lo
        assert ours in ci.index, (ours, list(ci.index))
        assert abs(ci.loc[ours, "lower"] - lo) <= tol * width, (ours, ci.loc[ours, "lower"], lo)
        assert abs(ci.loc[ours, "upper"] - hi) <= tol * width, (ours, ci.loc[ours, "upper"], hi)
        checked += 1
    return checked


@pytest.fixture(scope="module")
def sleep():
    return tmbx.glmm("Reaction ~ Days + (Days|Subject)", tmbx.load_dataset("sleepstudy"))


@pytest.fixture(scope="module")
def sleep_prof(sleep):
    return sleep.profile(progress=False)


def test_sleepstudy_matches_lme4(sleep_prof):
    ref = _load(INF / "sleepstudy_inference.json")["profile_ci_lme4"]
    assert _check_ci(sleep_prof.confint(), ref) == 6


def test_confint_method_profile_layout(sleep, sleep_prof):
    ci = sleep.confint(method="profile", parm=["Days", "sd_Days|Subject"], progress=False)
    assert list(ci.columns) == ["estimate", "lower", "upper"]
    assert list(ci.index) == ["Days", "sd_Days|Subject"]
    assert ci.loc["Days", "estimate"] == pytest.approx(sleep.fixef["cond"]["Days"])
    assert ci.loc["sd_Days|Subject", "estimate"] == pytest.approx(sleep.varcorr["Subject"].sd["Days"], rel=1e-6)
    full = sleep_prof.confint()
    np.testing.assert_allclose(ci.to_numpy(), full.loc[ci.index].to_numpy(), rtol=1e-6)
    # a wider level gives a wider interval; the table holds zeta = 0 at the estimate
    wide = sleep_prof.confint(level=0.99)
    assert (wide["lower"] < full["lower"]).all() and (wide["upper"] > full["upper"]).all()
    tab = sleep_prof.table
    assert set(tab.columns) >= {"parameter", "value", "zeta"}
    at0 = tab[tab["zeta"] == 0]
    assert set(at0["parameter"]) == set(full.index)


@pytest.mark.slow
def test_zeta_is_signed_root_deviance(sleep, sleep_prof):
    """zeta of a fixed-effect point equals the root deviance of an independent
    constrained fit (glmm with the coefficient held by map/start)."""
    tab = sleep_prof.table
    row = tab[(tab["parameter"] == "Days") & (tab["zeta"] > 1.5)].iloc[0]
    held = tmbx.glmm("Reaction ~ Days + (Days|Subject)", tmbx.load_dataset("sleepstudy"),
                     start={"beta": [250.0, row["value"]]}, map={"beta": [0, None]})
    zeta = math.sqrt(2 * (sleep.loglik - held.loglik))
    assert row["zeta"] == pytest.approx(zeta, abs=1e-4)


def test_plot_returns_figure(sleep_prof):
    import matplotlib

    matplotlib.use("Agg")
    fig = sleep_prof.plot()
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 6
    assert fig.axes[0].get_ylabel() == "zeta"


def test_bad_parm(sleep):
    with pytest.raises(ValueError, match="not parameters"):
        sleep.profile(parm="sd_Dayz|Subject", progress=False)
    with pytest.raises(ValueError, match="level"):
        sleep.confint(method="profile", level=1.5)


def test_cbpp_matches_lme4():
    fit = tmbx.glmm("cbind(incidence, size - incidence) ~ period + (1|herd)", tmbx.load_dataset("cbpp"),
                    family="binomial")
    ref = _load(INF / "cbpp_inference.json")["profile_ci_lme4"]
    rename = {f"period{k}": f"period[T.{k}]" for k in (2, 3, 4)}
    assert _check_ci(fit.profile(progress=False).confint(), ref, rename=rename) == 5


@pytest.mark.parametrize("vectorize", [True, False])
def test_cbpp_matches_lme4_vectorized_or_one_point_at_a_time(vectorize):
    """Both ways of running a batch of profile points (`jax.vmap` over the batch,
    as on a GPU, or each point alone in one program, as on the CPU) give lme4's
    intervals, and a batch smaller than a round still covers every point."""
    fit = tmbx.glmm("cbind(incidence, size - incidence) ~ period + (1|herd)", tmbx.load_dataset("cbpp"),
                    family="binomial")
    ref = _load(INF / "cbpp_inference.json")["profile_ci_lme4"]
    rename = {f"period{k}": f"period[T.{k}]" for k in (2, 3, 4)}
    prof = fit.profile(progress=False, vectorize=vectorize, batch_size=16)
    assert _check_ci(prof.confint(), ref, rename=rename) == 5
    assert prof.table.groupby("parameter").size().min() >= 9  # the first grid, 8 points a side pair, and the optimum


def test_singular_fit_lower_limit_zero():
    """Dyestuff2: the batch variance is estimated at 0; lme4's lower limit is 0."""
    ref = _load(INF / "profile_dyestuff2.json")
    fit = tmbx.glmm("Yield ~ 1 + (1|Batch)", tmbx.load_dataset("dyestuff2"))
    assert fit.loglik == pytest.approx(ref["logLik"], abs=1e-3)
    ci = fit.profile(progress=False).confint()
    assert ci.loc["sd_Intercept|Batch", "lower"] == 0.0
    assert _check_ci(ci, ref["profile_ci_lme4"]) == 3


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sleepstudy_us_reml", "penicillin_crossed"])
def test_reml_fits_profile_ml_as_lme4(case):
    """lme4 profiles the ML deviance of a REML fit: same intervals as the ML fit."""
    c = _load(DATA / "cases" / f"{case}.json")
    data = tmbx.load_dataset(c["dataset"] if "dataset" in c else case.split("_")[0])
    fit = tmbx.glmm(c["python_formula"], data, reml=c["REML"])
    prof = fit.profile(progress=False)
    assert prof.criterion == "ML"
    assert _check_ci(prof.confint(), c["lme4"]["profile_ci"]) == len(c["lme4"]["profile_ci"]["names"])


@pytest.mark.slow
def test_reml_criterion_on_request():
    fit = tmbx.glmm("Reaction ~ Days + (1|Subject)", tmbx.load_dataset("sleepstudy"), reml=True)
    with pytest.warns(RuntimeWarning, match="not profiled"):
        prof = fit.profile(criterion="REML", progress=False)
    ci = prof.confint()
    assert prof.criterion == "REML" and "Days" not in ci.index
    assert ci.loc["sigma", "lower"] < fit.sigma < ci.loc["sigma", "upper"]


# --------------------------------------------- models the shared references do not cover
def _extra(key):
    if not EXTRA.exists():
        pytest.skip("run tests/reference_scripts/inference_profile_extra.R")
    d = _load(EXTRA)
    if key not in d or "error" in d[key].get("profile_ci_lme4", {}):
        pytest.skip(f"no R reference for {key}")
    return d[key]


@pytest.mark.slow
@pytest.mark.parametrize("key,family", [("poisson_crossed", "poisson"), ("binomial_crossed", "binomial")])
def test_crossed_glmm_matches_lme4(key, family):
    ref = _extra(key)
    data = tmbx.load_dataset("salamanders").assign(present=lambda d: (d["count"] > 0).astype(int))
    fit = tmbx.glmm(ref["python_formula"], data, family=family)
    assert fit.loglik == pytest.approx(ref["logLik"], abs=2e-3)
    rename = {"minedno": "mined[T.no]"}
    assert _check_ci(fit.profile(progress=False).confint(), ref["profile_ci_lme4"], rename=rename) >= 4


@pytest.mark.slow
def test_zero_inflation_parameter_matches_glmmTMB():
    ref = _extra("zip")
    fit = tmbx.glmm(ref["python_formula"], tmbx.load_dataset("salamanders"), family="poisson",
                    ziformula=ref["ziformula"])
    rename = {"zi~(Intercept)": "zi~Intercept", "zi~minedno": "zi~mined[T.no]"}
    parm = [rename[n] for n in ref["profile_ci_glmmTMB"]["names"]]
    ci = fit.profile(parm=parm, progress=False).confint()
    assert _check_ci(ci, ref["profile_ci_glmmTMB"], rename=rename) == len(parm)


@pytest.mark.slow
def test_ar1_rho_matches_direct_profile():
    """glmmTMB's profile fails on this rho; the R script profiles it directly (refits
    with rho's parameter held by map). Its zeta stays below 1.96 as rho -> 1, so the
    upper limit is the bound 1 (R's spline extrapolation there is meaningless)."""
    ref = _extra("ar1")
    fit = tmbx.glmm(ref["python_formula"], tmbx.load_dataset("orthodont"))
    names = [n for n in fit.confint().index if n.startswith("sd_")]
    prof = fit.profile(parm=["rho|Subject"] + names, progress=False)
    ci = prof.confint()
    r = ref["rho"]
    assert max(r["zeta"]) < 1.96
    assert ci.loc["rho|Subject", "estimate"] == pytest.approx(r["estimate"], rel=1e-3)
    assert ci.loc["rho|Subject", "upper"] == 1.0
    assert abs(ci.loc["rho|Subject", "lower"] - r["lower"]) <= 5e-3 * (1 - r["lower"])
    # the zeta curve itself, at R's grid points
    # our profile points on R's (denser) zeta curve; the table's s is rho's glmmTMB
    # parameter, R's grid variable
    from scipy.interpolate import CubicSpline

    tab = prof.table[prof.table["parameter"] == "rho|Subject"]
    grid = np.asarray(r["grid_theta"])
    inside = tab[(tab["s"] >= grid.min()) & (tab["s"] <= grid.max())]
    assert len(inside) >= 4
    np.testing.assert_allclose(inside["zeta"], CubicSpline(grid, r["zeta"])(inside["s"]), atol=5e-3)
    s = ref["sd"]
    width = s["upper"] - s["lower"]
    assert ci.loc[names[0], "estimate"] == pytest.approx(s["estimate"], rel=1e-3)
    assert abs(ci.loc[names[0], "lower"] - s["lower"]) <= 5e-3 * width
    assert abs(ci.loc[names[0], "upper"] - s["upper"]) <= 5e-3 * width


@pytest.mark.slow
def test_unbounded_side_is_reported():
    """Complete separation (y = 1 whenever x = 1): the coefficient's likelihood keeps
    rising, so its upper limit is +inf, with a warning, not a failure."""
    rng = np.random.default_rng(1)
    x = np.tile(np.r_[np.zeros(5), np.ones(5)], 8)
    y = np.where(x == 1, 1, rng.binomial(1, 0.4, 80))
    df = pd.DataFrame({"y": y, "x": x, "g": np.repeat(np.arange(8), 10).astype(str)})
    fit = tmbx.glmm("y ~ x + (1|g)", df, family="binomial")
    with pytest.warns(RuntimeWarning, match="unbounded"):
        ci = fit.profile(parm=["x", "sd_Intercept|g"], progress=False).confint()
    assert ci.loc["x", "upper"] == np.inf
    assert ci.loc["sd_Intercept|g", "lower"] == 0.0 and np.isfinite(ci.loc["sd_Intercept|g", "upper"])


def test_every_correlation_of_a_three_term_us_matches_lme4():
    """cor(x2, x1) of (x1 + x2 | g) depends on three coordinates of glmmTMB's
    unit-lower-triangular parameterization (held by `_hold`'s quadratic): lme4's
    limits within 0.5% of the width. Reordering the terms so that the same
    correlation becomes a first-column one, (0 + x1 + x2 + one | g), gives the
    same interval (the profile does not depend on the parameterization), and
    cor(x2, Intercept) of the first model is checked the same way (lme4 warns
    that its own profile of that one is non-monotonic, so its limits are not used)."""
    ref = _load(INF / "k3_us_lme4.json")
    df = pd.read_csv(INF / "k3_us.csv")
    df["one"] = 1.0
    fit = tmbx.glmm("y ~ x1 + x2 + (x1 + x2 | g)", data=df, reml=False)
    assert fit.loglik == pytest.approx(ref["loglik"], abs=1e-5)
    parm = ["cor_x2.x1|g", "cor_x1.Intercept|g", "cor_x2.Intercept|g", "sd_x2|g"]
    ci = fit.confint(method="profile", parm=parm)
    for name in parm[:2] + parm[3:]:
        lo, hi = ref["ci"][name.replace("Intercept", "(Intercept)")]
        assert abs(ci.loc[name, "lower"] - lo) <= 5e-3 * (hi - lo), name
        assert abs(ci.loc[name, "upper"] - hi) <= 5e-3 * (hi - lo), name
    re = tmbx.glmm("y ~ x1 + x2 + (0 + x1 + x2 + one | g)", data=df, reml=False)
    ci2 = re.confint(method="profile", parm=["cor_x2.x1|g", "cor_one.x2|g"])
    for a, b in (("cor_x2.x1|g", "cor_x2.x1|g"), ("cor_x2.Intercept|g", "cor_one.x2|g")):
        width = ci.loc[a, "upper"] - ci.loc[a, "lower"]
        for side in ("lower", "upper"):
            assert abs(ci.loc[a, side] - ci2.loc[b, side]) <= 1e-3 * width, (a, side)
