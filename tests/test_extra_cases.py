"""Models beyond the shared reference cases, fitted by glmmTMB 1.1.5 on the bundled data
(tests/reference_scripts/extra_cases.R wrote tests/data/extra_cases.json): proportions
with weights, two terms on one factor, a dispersion model for nbinom2, nested REML,
genpois, nbinom1, random slopes under REML, zero-inflation with random effects."""

import json
import os

import numpy as np
import pytest

import tmbx

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = json.load(open(os.path.join(HERE, "data", "extra_cases.json")))


def r_name(name):
    return "(Intercept)" if name == "Intercept" else name.replace("[T.", "").replace("]", "")


@pytest.fixture(scope="module", params=sorted(CASES))
def case_fit(request):
    c = CASES[request.param]
    df = tmbx.load_dataset(c["dataset"])
    fit = tmbx.glmm(c["python_formula"], data=df, family=c["family"], ziformula=c["ziformula"],
                    dispformula=c["dispformula"], reml=c["REML"],
                    weights=None if c["weights"] is None else df[c["weights"]].to_numpy(float))
    return c, fit


def test_matches_glmmtmb(case_fit):
    c, fit = case_fit
    assert abs(fit.loglik - c["logLik"]) < 1e-4, (fit.loglik, c["logLik"])
    assert fit.df_model == c["df"]
    se = fit.se()
    for comp, coefs in c["fixef"].items():
        if not coefs or comp not in se:
            continue
        ours = {r_name(k): v for k, v in fit.fixef[comp].items()}
        ours_se = {r_name(k): v for k, v in se[comp].items()}
        ref_se = {k.split("~", 1)[-1]: v for k, v in (c["se"].get(comp) or {}).items()}
        for name, val in coefs.items():
            scale = ref_se.get(name, max(1.0, abs(val)))
            assert abs(ours[name] - val) < 2e-3 * scale, (comp, name, ours[name], val)
            if name in ref_se:
                assert abs(ours_se[name] / ref_se[name] - 1) < 2e-3, (comp, name)
    vc = fit.varcorr
    for group, sd in c["sd"].items():
        ours = vc[group].sd.to_numpy()
        sd = np.atleast_1d(sd)
        if np.all(sd > 1e-2):  # a variance at its boundary is flat: compare the others
            np.testing.assert_allclose(ours, sd, rtol=2e-3)
        else:
            assert np.all(ours[sd <= 1e-2] < 1e-2)
    if c["sigma"] is None:
        assert fit.sigma is None
    else:
        assert abs(fit.sigma / c["sigma"] - 1) < 2e-3
