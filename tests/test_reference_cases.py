"""Every reference case (glmmTMB 1.1.5 fits of real data) reproduced by tmbx.glmm."""

import glob
import json
import os

import numpy as np
import pytest

import tmbx

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.path.join(HERE, "data", "cases", "*.json")))}

# topo_exp: the residual variance is not identified next to an exponential spatial
# field observed once per location (the "nugget" and the field's own small-scale
# variance trade off). The likelihood is flat as sigma -> 0: glmmTMB stops at
# sigma = 7e-4 (log sigma^2 = -14.5), tmbx follows the gradient on to ~1e-9. Both
# reach the same log-likelihood (tmbx's is higher by 6e-9); estimates along the flat
# direction (sigma) and the standard errors evaluated there differ.
FLAT_SIGMA = {"topo_exp"}


def r_name(name: str) -> str:
    """formulaic's coefficient name -> R's ('spp[T.PR]' -> 'sppPR')."""
    if name == "Intercept":
        return "(Intercept)"
    return name.replace("[T.", "").replace("]", "")


def fit_case(case):
    df = tmbx.load_dataset(case["dataset"])
    return tmbx.glmm(case["python_formula"], data=df, family=case["family"], ziformula=case["ziformula"],
                     dispformula=case["dispformula"], reml=case["REML"])


@pytest.fixture(scope="module", params=sorted(CASES))
def case_fit(request):
    case = CASES[request.param]
    return case, fit_case(case)


def test_loglik_and_df(case_fit):
    case, fit = case_fit
    ref = case["glmmTMB"]
    if case["id"] in FLAT_SIGMA:
        # the curvature along sigma -> 0 vanishes: the finite-difference Hessian there
        # comes out positive definite (glmmTMB: pdHess TRUE) or just not
        assert fit.converged or "not positive definite" in fit.message
        assert fit.sigma < 1e-3 * fit.varcorr["group"].sd.iloc[0]
        assert fit.loglik >= ref["logLik"] - 1e-6
    else:
        assert fit.converged, fit.message
    assert abs(fit.loglik - ref["logLik"]) < 1e-4, (fit.loglik, ref["logLik"])
    assert fit.df_model == ref["df"]
    assert fit.nobs == ref["nobs"]
    assert abs(fit.aic - ref["AIC"]) < 1e-3


def test_fixed_effects_and_standard_errors(case_fit):
    case, fit = case_fit
    ref = case["glmmTMB"]
    se = fit.se()
    for comp, coefs in ref["fixef"].items():
        if comp == "disp" and comp not in ref["se"]:
            if case["id"] in FLAT_SIGMA:
                continue  # the flat direction itself (see FLAT_SIGMA)
            ours = {r_name(k): v for k, v in fit.fixef["disp"].items()}
            for name, val in coefs.items():
                assert abs(ours[name] - val) < 1e-3 * max(1, abs(val)), (comp, name)
            continue
        ours = {r_name(k): v for k, v in fit.fixef[comp].items()}
        ours_se = {r_name(k): v for k, v in se[comp].items()}
        ref_se = {k.split("~", 1)[-1]: v for k, v in ref["se"][comp].items()}  # "zi~(Intercept)", "d~Days"
        assert set(ours) == set(coefs), (comp, set(ours) ^ set(coefs))
        for name, val in coefs.items():
            assert abs(ours[name] - val) < 1e-3 * ref_se[name], (comp, name, ours[name], val)
            if case["id"] not in FLAT_SIGMA:
                assert abs(ours_se[name] / ref_se[name] - 1) < 1e-3, (comp, name, ours_se[name], ref_se[name])


def test_random_effect_sds_correlations_and_sigma(case_fit):
    case, fit = case_fit
    ref = case["glmmTMB"]
    vc = fit.varcorr
    groups = [g for g in vc if g != "zi"]
    assert len(groups) == len(ref["varcorr"])
    for g, r in zip(groups, ref["varcorr"]):
        assert g == r["group"]
        sd = np.atleast_1d(r["sd"])
        np.testing.assert_allclose(vc[g].sd.to_numpy(), sd, rtol=1e-3)
        corr = np.asarray(r["corr"], float)
        np.testing.assert_allclose(vc[g].corr.to_numpy(), corr, atol=1e-3)
    if ref["sigma"] is None:
        assert fit.sigma is None
    elif case["id"] in FLAT_SIGMA:
        assert fit.sigma < ref["sigma"]  # see FLAT_SIGMA
    else:
        assert abs(fit.sigma / ref["sigma"] - 1) < 1e-3
