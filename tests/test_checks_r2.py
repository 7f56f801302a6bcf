"""R2 (performance::r2_nakagawa), overdispersion and zero-inflation checks vs R.

References: tests/data/inference/*.json (performance 0.10.2 on lme4/glmmTMB fits) and
tests/data/checks_extra.json (insight's variance rules applied in R to glmmTMB fits of
Poisson and nbinom2 models; tests/reference_scripts/checks_r2_counts.R).
"""

import json
import os

import pytest

import tmbx

HERE = os.path.dirname(__file__)


def _ref(name):
    path = os.path.join(HERE, "data", name if name.endswith(".json") else f"inference/{name}_inference.json")
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def sleep_reml():
    return tmbx.glmm("Reaction ~ Days + (Days|Subject)", data=tmbx.load_dataset("sleepstudy"), reml=True)


@pytest.fixture(scope="module")
def cbpp():
    return tmbx.glmm("cbind(incidence, size - incidence) ~ period + (1|herd)",
                     data=tmbx.load_dataset("cbpp"), family="binomial")


@pytest.fixture(scope="module")
def sal_pois():
    return tmbx.glmm("count ~ spp + mined + (1|site)", data=tmbx.load_dataset("salamanders"), family="poisson")


def test_r2_gaussian_random_slopes(sleep_reml):
    ref = _ref("sleepstudy")["r2_nakagawa_REML"]
    r = sleep_reml.r2()
    assert r["marginal"] == pytest.approx(ref["R2_marginal.Marginal R2"], rel=1e-3)
    assert r["conditional"] == pytest.approx(ref["R2_conditional.Conditional R2"], rel=1e-3)


def test_r2_binomial(cbpp):
    # performance ran on lme4's glmer fit, whose estimates differ from glmmTMB's in the
    # 4th digit; the difference in R2 is 6e-4 relative
    ref = _ref("cbpp")["r2_nakagawa"]
    r = cbpp.r2()
    assert r["marginal"] == pytest.approx(ref["R2_marginal.Marginal R2"], rel=1e-3)
    assert r["conditional"] == pytest.approx(ref["R2_conditional.Conditional R2"], rel=1e-3)


def test_r2_poisson_lognormal(sal_pois):
    ref = _ref("checks_extra.json")["r2_salamanders_poisson"]
    with pytest.warns(RuntimeWarning, match="lognormal approximation"):
        r = sal_pois.r2()
    assert r["marginal"] == pytest.approx(ref["marginal"], rel=1e-4)
    assert r["conditional"] == pytest.approx(ref["conditional"], rel=1e-4)


@pytest.mark.slow
def test_r2_nbinom2():
    ref = _ref("checks_extra.json")["r2_salamanders_nbinom2"]
    fit = tmbx.glmm("count ~ spp + mined + (1|site)", data=tmbx.load_dataset("salamanders"), family="nbinom2")
    with pytest.warns(RuntimeWarning):
        r = fit.r2()
    assert r["marginal"] == pytest.approx(ref["marginal"], rel=1e-3)
    assert r["conditional"] == pytest.approx(ref["conditional"], rel=1e-3)


def test_r2_family_without_r2_is_a_clear_error(cbpp):
    # the family is checked before anything is computed: a stand-in fit with a Gamma family
    from types import SimpleNamespace

    from tmbx.diagnostics._checks import r2
    from tmbx.formula._template import resolve_family

    stub = SimpleNamespace(family=resolve_family("Gamma(link='log')", False), design=cbpp.design)
    with pytest.raises(ValueError, match="not defined for the Gamma family"):
        r2(stub)


def _check_overdispersion(fit, ref):
    od = fit.check_overdispersion()
    assert od["rdf"] == ref["residual_df"]
    assert od["chisq"] == pytest.approx(ref["chisq_statistic"], rel=1e-3)
    assert od["ratio"] == pytest.approx(ref["dispersion_ratio"], rel=1e-3)
    assert od["p"] == pytest.approx(ref["p_value"], rel=1e-2)


def test_overdispersion_binomial(cbpp):
    _check_overdispersion(cbpp, _ref("cbpp")["overdispersion"])


def test_overdispersion_poisson(sal_pois):
    _check_overdispersion(sal_pois, _ref("salamanders")["overdispersion_poisson"])


def test_zeroinflation_poisson(sal_pois):
    ref = _ref("salamanders")["zeroinflation_poisson"]
    zi = sal_pois.check_zeroinflation()
    assert zi["observed"] == ref["observed"]
    assert abs(zi["predicted"] - ref["predicted"]) <= 0.5
    assert zi["ratio"] == pytest.approx(ref["ratio"], abs=0.5 / ref["observed"])


def test_checks_reject_unsuitable_families(sleep_reml, cbpp):
    with pytest.raises(ValueError, match="Gaussian"):
        sleep_reml.check_overdispersion()
    with pytest.raises(ValueError, match="count families"):
        cbpp.check_zeroinflation()
