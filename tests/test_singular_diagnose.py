"""Singular fits (lme4's isSingular, rePCA), diagnose() and allfit().

References: tests/data/inference/singular_fits.json (lme4 1.1-31 and glmmTMB
1.1.5 on Dyestuff2 and cake), the glmmTMB reference cases for fits that are
fine, and constructed data for the failures diagnose() must name (complete
separation, a zero-inflation parameter running off to -inf).
"""

import json
import pathlib
import warnings

import numpy as np
import pandas as pd
import pytest

import tmbx

DATA = pathlib.Path(__file__).parent / "data"
SINGULAR = json.loads((DATA / "inference" / "singular_fits.json").read_text())


def _fit(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = tmbx.glmm(*args, **kwargs)
    return fit, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def dyestuff2():
    case = SINGULAR["dyestuff2"]
    return _fit(case["python_formula"], data=tmbx.load_dataset("dyestuff2"), reml=case["REML"])


@pytest.fixture(scope="module")
def separation():
    # y = 1 exactly when x > 0: the logistic slope has no finite maximum
    rng = np.random.default_rng(1)
    x = rng.normal(size=120)
    df = pd.DataFrame({"y": (x > 0).astype(int), "x": x, "g": np.repeat(np.arange(12), 10).astype(str)})
    return _fit("y ~ x + (1|g)", data=df, family="binomial")


@pytest.fixture(scope="module")
def zip_without_zeros():
    # Poisson data fitted with zero-inflation: the zi logit runs off to -inf and the
    # Hessian is (numerically) singular along it, though the engine calls it converged
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(12), 10)
    y = rng.poisson(np.exp(1 + 0.3 * rng.normal(size=12))[g])
    df = pd.DataFrame({"y": y, "g": g.astype(str)})
    return _fit("y ~ 1 + (1|g)", data=df, family="poisson", ziformula="~1")


# ---------------------------------------------------------------- singular fits
def test_dyestuff2_singular_as_lme4(dyestuff2):
    fit, _ = dyestuff2
    ref = SINGULAR["dyestuff2"]
    assert fit.is_singular() is ref["lme4"]["isSingular"] is True
    assert fit.loglik == pytest.approx(ref["lme4"]["logLik"], abs=1e-4)
    # glmmTMB stops at sd 1.3e-4 and calls the Hessian positive definite; on
    # lme4's relative scale (sd / sigma = 3.5e-5) that is still below tol
    sigma = fit.sigma
    assert ref["glmmTMB"]["pdHess"] and ref["glmmTMB"]["sd_Batch"] / sigma < 1e-4
    pca = fit.rePCA()["Batch"]
    assert list(pca.columns) == ["sdev", "proportion", "cumulative"]
    assert pca["sdev"].iloc[0] < 1e-4 and pca["proportion"].iloc[0] == pytest.approx(1.0)
    assert not fit.is_singular(tol=1e-9) or pca["sdev"].iloc[0] < 1e-9


def test_singular_warning_names_term_and_remedies(dyestuff2):
    _, msgs = dyestuff2
    msg = next(m for m in msgs if "singular" in m)
    assert "Batch" in msg and "Intercept" in msg
    assert "drop the term" in msg and "prior" in msg
    assert "diag(" not in msg  # a one-column term has nothing to simplify


def test_diagnose_names_singular(dyestuff2):
    rep = dyestuff2[0].diagnose()
    assert rep and "singular" in rep.kinds()
    assert "Batch" in str(rep)


def test_is_singular_validates_tol(dyestuff2):
    with pytest.raises(ValueError, match="tol must be positive"):
        dyestuff2[0].is_singular(tol=0)


@pytest.mark.slow
def test_cake_rank_two_rePCA():
    # R's cake has an ordered temperature (polynomial contrasts); the 6x6
    # unstructured covariance has numerical rank 2 (lme4's rePCA)
    case = SINGULAR["cake_rank"]
    fit, msgs = _fit("angle ~ recipe + C(temperature, contr.poly) + (C(temperature, contr.poly)|replicate)",
                     data=tmbx.load_dataset("cake"), reml=True)
    assert fit.is_singular() is case["isSingular"] is True
    pca = fit.rePCA()["replicate"]
    np.testing.assert_allclose(pca["proportion"], case["rePCA_proportion"], atol=1e-3)
    np.testing.assert_allclose(pca["sdev"].iloc[:2], case["rePCA_sdev"][:2], rtol=5e-3)
    assert pca["cumulative"].iloc[1] == pytest.approx(1.0, abs=1e-3)
    assert any("replicate" in m and "combination" in m for m in msgs)


# ---------------------------------------------------------------- diagnose
def test_diagnose_fine_fit_sleepstudy():
    fit, msgs = _fit("Reaction ~ Days + (Days|Subject)", data=tmbx.load_dataset("sleepstudy"), reml=True)
    rep = fit.diagnose()
    assert not rep, str(rep)
    assert rep.problems == [] and "no problems" in str(rep)
    assert rep.info["max_relgrad"] < 2e-3 and rep.info["min_eigenvalue"] > 0
    assert not any("singular" in m or "converge" in m for m in msgs)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["cbpp_binomial", "salamanders_zinb2"])
def test_diagnose_fine_reference_fits(case):
    c = json.loads((DATA / "cases" / f"{case}.json").read_text())
    fit, msgs = _fit(c["python_formula"], data=tmbx.load_dataset(c["dataset"] if "dataset" in c else case.split("_")[0]),
                     family=c["family"], ziformula=c.get("ziformula"), reml=c.get("REML", False))
    assert fit.loglik == pytest.approx(c["glmmTMB"]["logLik"], abs=1e-4)
    rep = fit.diagnose()
    assert not rep, str(rep)
    assert not any("singular" in m or "converge" in m for m in msgs)


def test_diagnose_complete_separation(separation):
    fit, msgs = separation
    rep = fit.diagnose(check_gradient=False)  # (the exact gradient's compile is tested elsewhere)
    assert "large_coef" in rep.kinds()
    text = str(rep)
    assert "separation" in text and "cond:x" in next(p for p in rep.problems if p.kind == "large_coef").params
    # the warning at fit time gives separation as the most likely cause
    assert any("did not converge" in m and "separation" in m for m in msgs)


def test_diagnose_non_pd_hessian_names_parameter(zip_without_zeros):
    fit, msgs = zip_without_zeros
    rep = fit.diagnose(check_gradient=False)
    hess = next(p for p in rep.problems if p.kind == "hessian")
    assert hess.params == ["betazi:Intercept"]
    assert "not positive definite" in hess.message
    assert "large_coef" in rep.kinds() and "zero-inflation" in str(rep)
    # glmmTMB warns at fit time ("Model convergence problem"): so do we, naming the
    # parameter and what its estimate means
    msg = next(m for m in msgs if "convergence problem" in m)
    assert "betazi:Intercept" in msg and "drop ziformula" in msg


def test_fit_time_hessian_warning_only_where_the_hessian_is_singular():
    """Zero-inflation on a Gaussian response without zeros (glmmTMB 1.1.5: the zi
    logit at -394.8, logLik -897.0393 and "Model convergence problem; extreme or
    very small eigenvalues detected") warns; the same model without it does not."""
    df = tmbx.load_dataset("sleepstudy")
    fit, msgs = _fit("Reaction ~ Days + (1|Subject)", data=df, ziformula="~1")
    assert fit.loglik == pytest.approx(-897.0393, abs=1e-4)
    assert any("convergence problem" in m and "betazi:Intercept" in m for m in msgs)
    _, msgs = _fit("Reaction ~ Days + (1|Subject)", data=df, method="laplace")
    assert not any("convergence problem" in m for m in msgs)


def test_diagnose_predictor_scales(separation):
    from tmbx.diagnostics._diagnose import _scale_problem

    fit, _ = separation
    assert _scale_problem(fit, 1e3) is None  # x has sd ~1
    fit.design.components["cond"].X[:, 1] *= 1e5  # a copy of the fit's design: x in other units
    try:
        p = _scale_problem(fit, 1e3)
    finally:
        fit.design.components["cond"].X[:, 1] /= 1e5
    assert p is not None and "cond:x" in p.params and "scaled" in p.message


# ---------------------------------------------------------------- allfit
def test_allfit_agrees_on_dyestuff2(dyestuff2):
    fit, _ = dyestuff2
    tab = fit.allfit(progress=False)
    assert list(tab.index) == ["bfgs", "L-BFGS-B", "trust-exact", "Nelder-Mead", "Powell"]
    assert {"loglik", "converged", "time", "Intercept", "sd_Intercept|Batch"} <= set(tab.columns)
    ok = tab[tab["converged"]]
    assert len(ok) >= 4, tab[["loglik", "max_grad", "message"]]
    np.testing.assert_allclose(ok["loglik"], SINGULAR["dyestuff2"]["lme4"]["logLik"], atol=1e-3)
    assert "agree" in tab.attrs["verdict"] and tab.attrs["best"] in ok.index
    assert fit.loglik == pytest.approx(SINGULAR["dyestuff2"]["lme4"]["logLik"], abs=1e-4)  # fit untouched


def test_allfit_rejects_unknown_optimizer(dyestuff2):
    with pytest.raises(ValueError, match="unknown optimizers"):
        dyestuff2[0].allfit(optimizers=["newton-raphson"])


@pytest.mark.slow
def test_allfit_cbpp_matches_glmmTMB():
    c = json.loads((DATA / "cases" / "cbpp_binomial.json").read_text())
    fit, _ = _fit(c["python_formula"], data=tmbx.load_dataset("cbpp"), family="binomial")
    tab = fit.allfit(progress=False)
    ok = tab[tab["converged"]]
    assert len(ok) == 5, tab[["loglik", "max_grad", "message"]]
    np.testing.assert_allclose(ok["loglik"], c["glmmTMB"]["logLik"], atol=1e-3)
    for name, v in c["glmmTMB"]["fixef"]["cond"].items():
        col = "Intercept" if name == "(Intercept)" else name.replace("period", "period[T.") + "]"
        np.testing.assert_allclose(ok[col], v, atol=1e-3)


def test_singular_kernel_term_is_one_line():
    """An ou term (a kernel over 80 times, one group) whose sd goes to zero on
    counts without any serial structure: one line for the term, not one per time
    point (nor one combination per near-null direction of a smooth kernel), and
    no advice that only fits plain terms (diag/cs/rr; "fewer than 6 levels")."""
    rng = np.random.default_rng(7)
    df = pd.DataFrame({"t": np.arange(80.0), "g": "a", "y": rng.poisson(2.0, 80)})
    fit, msgs = _fit("y ~ 1 + ou(pos(t) + 0|g)", data=df, family="poisson")
    msg = next(m for m in msgs if "singular" in m)
    assert "the variance of its ou term is (nearly) zero" in msg
    assert len(msg.splitlines()) == 3
    assert "fewer than 6 levels" not in msg and "diag(" not in msg
    assert fit.is_singular()
