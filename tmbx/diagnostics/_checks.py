"""R2 and overdispersion / zero-inflation checks, as the R package performance computes them.

- `r2`: Nakagawa & Schielzeth's R2 for mixed models (``performance::r2_nakagawa``,
  variance components as ``insight::get_variance``, Nakagawa et al. 2017);
- `check_overdispersion`: the Pearson chi-square test (``performance::check_overdispersion``);
- `check_zeroinflation`: observed vs predicted zeros (``performance::check_zeroinflation``).
"""

from __future__ import annotations

import math
import warnings

import jax.numpy as jnp
import numpy as np

from .._internal import LazyModule

sst = LazyModule("scipy.stats")

# link -> observation-level ("distribution-specific") variance on the link scale for
# families where it is a constant (Nakagawa et al. 2017, Table 1; insight's rules)
_BINOMIAL_DIST_VAR = {"logit": math.pi**2 / 3, "probit": 1.0}
_COUNT_FAMILIES = ("poisson", "nbinom1", "nbinom2", "genpois")
_R2_FAMILIES = ("gaussian", "binomial", "poisson", "nbinom1", "nbinom2")


def r2(fit) -> dict:
    """Marginal and conditional R2 of a GLMM (``performance::r2_nakagawa``).

    ``marginal = v_f / (v_f + v_r + v_e)``, ``conditional = (v_f + v_r) / (...)``:

    - ``v_f``: variance of the fixed-effect predictions ``X beta`` (R's ``var``, n - 1);
    - ``v_r``: per random-effect term, the mean over observations of ``z_i' Sigma z_i``
      with ``z_i`` the term's columns of the fixed-effect model matrix (random slopes);
      terms with one level per observation count as additive dispersion in ``v_e``;
    - ``v_e``, the observation-level variance on the link scale: ``sigma^2`` (Gaussian),
      ``pi^2 / 3`` (logit) or 1 (probit) for binomial, and for counts with a log link the
      lognormal approximation ``log(1 + Var(y) / mu^2)`` at ``mu = exp(b0)``, ``b0`` the
      intercept of the null model ``y ~ 1 + (random terms)`` (0.25 for a sqrt link).

    The dispersion and zero-inflation models are ignored, as performance does.
    """
    fam = fit.family
    name = getattr(fam, "name", type(fam).__name__)
    link = fam.link.name
    if name not in _R2_FAMILIES or "zi" in fit.design.components:
        extra = " with zero-inflation" if name in _R2_FAMILIES else ""
        raise ValueError(
            f"r2() is not defined for the {name} family{extra}: Nakagawa's R2 needs the family's "
            f"observation-level variance, which tmbx knows for {', '.join(_R2_FAMILIES)} (without "
            "zero-inflation). Compare models by AIC, or check the fit with simulate_residuals()."
        )
    if not fit.template.terms:
        raise ValueError("r2() is for mixed models; this fit has no random-effect terms.")
    v_f = _variance_fixed(fit)
    v_r, v_disp = _variance_random(fit)
    v_e = _variance_distribution(fit, name, link) + v_disp
    if v_r is None:
        warnings.warn(
            "r2: some random-effect variance is (near) zero, a singular fit; as performance, only "
            "the marginal R2 is returned. Simplify the random effects (see fit.diagnose()).",
            RuntimeWarning, stacklevel=3,
        )
        return {"marginal": v_f / (v_f + v_e), "conditional": float("nan")}
    total = v_f + v_r + v_e
    return {"marginal": v_f / total, "conditional": (v_f + v_r) / total}


def _variance_fixed(fit) -> float:
    X = fit.design.components["cond"].X
    return float(np.var(X @ fit.fixef["cond"].to_numpy(), ddof=1))


def _variance_random(fit):
    """(v_r, v_dispersion): summed ``mean(z' Sigma z)`` over the conditional model's terms,
    split into group-level terms and observation-level ones (as many levels as rows).
    ``v_r`` is None for a singular fit (insight then drops the random variance)."""
    X = fit.design.components["cond"].X
    cols = list(fit.template.names["beta"])
    vc = fit.varcorr
    v_r, v_disp = 0.0, 0.0
    for t in fit.template.terms:
        if t.component != "cond":
            continue
        term = vc[t.group]
        keep = [j for j, nm in enumerate(t.terms) if nm in cols]
        if not keep:
            continue
        S = term.cov.to_numpy()[np.ix_(keep, keep)]
        Z = X[:, [cols.index(t.terms[j]) for j in keep]]
        v = float(np.mean(np.einsum("ij,jk,ik->i", Z, S, Z)))
        if t.m == fit.nobs:
            v_disp += v
        else:
            v_r += v
    if fit.is_singular():
        return None, v_disp
    return v_r, v_disp


def _variance_distribution(fit, name, link) -> float:
    if name == "gaussian":
        if fit.sigma is None:
            raise ValueError("r2() needs a constant residual sd: refit without a dispformula.")
        return fit.sigma**2
    if name == "binomial":
        if link not in _BINOMIAL_DIST_VAR:
            raise ValueError(f"r2() is defined for binomial models with a logit or probit link, not {link!r}.")
        return _BINOMIAL_DIST_VAR[link]
    # counts
    if link == "sqrt":
        return 0.25
    if link != "log":
        raise ValueError(f"r2() for the {name} family needs a log or sqrt link, not {link!r}.")
    mu = math.exp(_null_intercept(fit))
    if mu < 6:
        warnings.warn(
            f"r2: the null model's mean count exp(intercept) = {mu:.2g} is small; the lognormal "
            "approximation of the observation-level variance may be unreliable (Nakagawa et al. 2017).",
            RuntimeWarning, stacklevel=4,
        )
    sigma = fit.sigma if fit.family.has_disp else None
    if name == "poisson":
        var = mu
    elif name == "nbinom2":
        var = mu * (1 + mu / sigma)
    else:  # nbinom1: glmmTMB's Var = mu (1 + phi)
        var = mu * (1 + sigma)
    return math.log1p(var / mu**2)


def _null_intercept(fit) -> float:
    """Intercept of the null model ``y ~ (random terms)`` refitted with the fit's other
    arguments (insight's ``null_model``: ``update(model, . ~ (re terms))``)."""
    from ..formula._api import glmm
    from ..formula._parse import parse_formula

    pf = parse_formula(fit.formula)
    bars = list(dict.fromkeys(b.text for b in pf.bars))
    null_formula = f"{pf.response_text} ~ 1 + " + " + ".join(bars)
    call = {**fit.call, "formula": null_formula, "start": None, "map": None}
    null = glmm(**call)
    return float(null.fixef["cond"].iloc[0])


# ---------------------------------------------------------------- dispersion, zeros

def check_overdispersion(fit) -> dict:
    """Pearson chi-square test of overdispersion (``performance::check_overdispersion``).

    ``chisq = sum(pearson residuals^2)``, ``ratio = chisq / rdf`` with ``rdf`` the residual
    degrees of freedom (observations minus parameters), ``p = P(chi2_rdf > chisq)``.
    A ratio well above 1 with a small p suggests overdispersion: try a negative binomial
    family, an observation-level random effect, or check simulate_residuals().
    """
    name = getattr(fit.family, "name", "")
    if name == "gaussian":
        raise ValueError("check_overdispersion() is for count and binomial models; a Gaussian model's "
                         "residual variance is estimated, so it cannot be overdispersed.")
    r = np.asarray(fit.residuals(type="pearson"), float)
    rdf = fit.df_resid
    chisq = float(np.sum(r**2))
    return {"chisq": chisq, "ratio": chisq / rdf, "rdf": rdf, "p": float(sst.chi2.sf(chisq, rdf))}


def check_zeroinflation(fit) -> dict:
    """Observed vs predicted zeros (``performance::check_zeroinflation``).

    ``predicted = round(sum_i P(y_i = 0))`` under the fitted model (random effects at their
    conditional modes, zero-inflation included), as performance rounds it;
    ``ratio = predicted / observed``: well below 1 means more zeros than the model expects.
    """
    fam = fit.family
    if not getattr(fam, "discrete", False) or getattr(fam, "needs_trials", False):
        raise ValueError(f"check_zeroinflation() is for count families; this fit's family is {fam.name}.")
    y = np.asarray(fit.design.y, float)
    observed = int(np.sum(y == 0))
    if observed == 0:
        raise ValueError("check_zeroinflation(): the response has no zeros, so there is nothing to check.")
    p = {k: jnp.asarray(v) for k, v in fit._par().items()}
    _, d = fit._newdata(None)

    def expected_zeros():
        def run(p, d):
            eta, zi, disp = fit._linear_predictors(p, d)
            kw = {"zi": zi} if zi is not None else {}
            return jnp.sum(jnp.exp(fam.log_prob(jnp.zeros_like(eta), eta, disp=disp, psi=p.get("psi"), **kw)))

        return run

    # one compiled program, kept with the fit (op by op, owls_zinb1's first call
    # compiled for 2 s)
    predicted = round(float(fit._program("expected_zeros", expected_zeros)(p, d)))
    return {"observed": observed, "predicted": predicted, "ratio": predicted / observed}
