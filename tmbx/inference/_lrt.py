"""Likelihood-ratio tests between nested fits: R's ``anova`` and pbkrtest's ``PBmodcomp``.

A variance tested against zero lies on the boundary of its parameter space,
where the LRT statistic is not chi-square(df) but (for one variance, Self &
Liang 1987) the 50:50 mixture of chi-square(df - 1) and chi-square(df); the
naive p-value is then conservative. `anova_lrt` reports both; `pb_test` gives
the parametric-bootstrap p-value, which needs no such theory.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd

from .._internal import LazyModule

sst = LazyModule("scipy.stats")

_LOGLIK_TOL = 1e-3  # a smaller model may beat the larger by this much (optimizer noise)


def _check_same_data(fits):
    y0 = np.asarray(fits[0].design.y, float)
    for i, f in enumerate(fits[1:], 1):
        if f.nobs != fits[0].nobs or not np.allclose(np.asarray(f.design.y, float), y0, equal_nan=True):
            raise ValueError(f"the fits use different data (fit 0: {fits[0].nobs} observations of "
                             f"{fits[0].formula.split('~')[0].strip()!r}, fit {i}: {f.nobs} of "
                             f"{f.formula.split('~')[0].strip()!r}); likelihood-ratio tests need the same "
                             "response on the same rows: drop missing values before fitting both")


def _ml(fits):
    """lme4's anova: REML fits are refit by ML first (same call, reml=False)."""
    if not any(f.reml for f in fits):
        return list(fits)
    from ..formula._api import glmm

    warnings.warn("refitting model(s) with ML (instead of REML)", UserWarning, stacklevel=3)
    return [glmm(**{**f.call, "reml": False}) if f.reml else f for f in fits]


def _sds(fit):
    """(component, group, term) of every random-effect variance in the fit (a second
    term on one factor, named "g.1", counts under "g")."""
    from ..formula._fit import _log_sd_positions

    groups = {t.group for t in fit.template.terms}
    out = set()
    for t in fit.template.terms:
        base = re.sub(r"\.\d+$", "", t.group)
        g = base if base in groups else t.group
        out |= {(t.component, g, t.terms[j]) for j, _ in _log_sd_positions(t)}
    return out


def _check_nested(small, big, i):
    if small.df_model == big.df_model:
        raise ValueError(f"fits {i - 1} and {i} have the same number of parameters ({big.df_model}), so they "
                         "are not nested; compare non-nested models by AIC/BIC instead")
    for comp, est in small.fixef.items():
        if comp == "disp":
            continue
        extra = set(est.index) - set(big.fixef.get(comp, pd.Series(dtype=float)).index)
        if extra:
            raise ValueError(f"the models are not nested: the smaller model ({small.formula!r}) has "
                             f"{comp} fixed effects {sorted(extra)} that the larger ({big.formula!r}) lacks")
    if small.loglik > big.loglik + _LOGLIK_TOL:
        raise ValueError(f"the smaller model's log-likelihood ({small.loglik:.4f}) exceeds the larger's "
                         f"({big.loglik:.4f}): the models are not nested, or the larger fit did not reach "
                         "its optimum (check big.converged, refit from the smaller model's estimates)")


def _prepare(fits):
    from ..formula._fit import GlmmFit

    if len(fits) < 2:
        raise ValueError("anova needs at least two fits to compare")
    bad = [type(f).__name__ for f in fits if not isinstance(f, GlmmFit)]
    if bad:
        raise TypeError(f"anova compares tmbx.glmm fits; got {bad}")
    _check_same_data(fits)
    order = np.argsort([f.df_model for f in fits], kind="stable")
    fits = _ml([fits[i] for i in order])
    for i in range(1, len(fits)):
        _check_nested(fits[i - 1], fits[i], i)
    return fits, order


def mixture_pvalue(chisq, df):
    """Chi-bar-square p-value of one variance on its boundary:
    0.5 P(chi2_{df-1} >= x) + 0.5 P(chi2_df >= x), chi2_0 being a point mass at 0."""
    low = float(chisq <= 0) if df == 1 else sst.chi2.sf(chisq, df - 1)
    return 0.5 * low + 0.5 * sst.chi2.sf(chisq, df)


def anova_lrt(*fits, names=None) -> pd.DataFrame:
    """Likelihood-ratio tests between nested fits (R's ``anova``), ordered by df.

    Columns npar, AIC, BIC, logLik, deviance, Chisq, Df, Pr(>Chisq); where the
    larger model adds random-effect variances (tested on their boundary at 0),
    a warning and a "Pr(>Chisq) mixture" column (chi-bar-square; NaN where more
    than one variance is added). REML fits are refit by ML first, as lme4 does.
    ``names``: row labels in the order the fits were given (default fit0, fit1, ...).
    """
    if names is not None and len(names) != len(fits):
        raise ValueError(f"names has {len(names)} entries for {len(fits)} fits")
    fits, order = _prepare(fits)
    labels = [(names[i] if names is not None else f"fit{i}") for i in order]
    rows, boundary = [], False
    for i, f in enumerate(fits):
        row = {"npar": f.df_model, "AIC": f.aic, "BIC": f.bic, "logLik": f.loglik, "deviance": -2 * f.loglik,
               "Chisq": np.nan, "Df": np.nan, "Pr(>Chisq)": np.nan, "Pr(>Chisq) mixture": np.nan}
        if i:
            prev = fits[i - 1]
            chisq = max(2 * (f.loglik - prev.loglik), 0.0)
            df = f.df_model - prev.df_model
            row.update({"Chisq": chisq, "Df": df, "Pr(>Chisq)": sst.chi2.sf(chisq, df)})
            new = _sds(f) - _sds(prev)
            if new:
                boundary = True
                row["Pr(>Chisq) mixture"] = mixture_pvalue(chisq, df) if len(new) == 1 else np.nan
        rows.append(row)
    tab = pd.DataFrame(rows, index=labels)
    tab["Df"] = tab["Df"].astype("Int64")
    if boundary:
        warnings.warn("the larger model adds random-effect variance(s), tested on the boundary of their "
                      "parameter space (0): the chi-square p-value is conservative. 'Pr(>Chisq) mixture' "
                      "is the chi-bar-square p-value (one variance); tmbx.pb_test gives the parametric "
                      "bootstrap p-value.", UserWarning, stacklevel=3)
    else:
        tab = tab.drop(columns="Pr(>Chisq) mixture")
    return tab


def pb_test(fit0, fit1, nsim: int = 1000, seed: int = 0, batch_size: int | None = None,
            progress: bool = True) -> dict:
    """Parametric-bootstrap likelihood-ratio test (pbkrtest's ``PBmodcomp``).

    Simulates ``nsim`` responses from the smaller model, refits both models to all
    of them in batches and returns stat (the observed LRT), df, p_chisq,
    p_boot = (1 + #{LRT* >= stat}) / (1 + nsim_ok), nsim_ok (pairs of refits that
    both converged) and lrt_sim (the simulated statistics, NaN where a refit failed).
    """
    from . import _bootstrap as boot

    nsim = boot.check_nsim(nsim)
    (small, big), _ = _prepare((fit0, fit1))
    batch_size = boot.default_batch_size(nsim) if batch_size is None else int(batch_size)
    stat = max(2 * (big.loglik - small.loglik), 0.0)
    df = big.df_model - small.df_model
    sims = boot.Simulations(small, nsim, seed, batch_size)
    r0 = boot.refit_simulations(small, sims, batch_size, progress, desc="pb_test (null)")
    r1 = boot.refit_simulations(big, sims, batch_size, progress, desc="pb_test (alternative)")
    ok = r0["converged"] & r1["converged"]
    lrt = np.where(ok, 2 * (r0["f"] - r1["f"]), np.nan)
    nsim_ok = int(ok.sum())
    if nsim_ok < nsim:
        warnings.warn(f"{nsim - nsim_ok} of {nsim} simulated data sets had a refit that failed; p_boot "
                      f"uses the other {nsim_ok}", RuntimeWarning, stacklevel=2)
    if nsim_ok == 0:
        raise RuntimeError("every bootstrap refit failed; check both fits (fit.diagnose()) before testing")
    # a refit of the larger model may stop a hair below the smaller one's optimum
    n_ge = int(np.sum(lrt[ok] >= stat - 1e-8 * max(1.0, stat)))
    return {"stat": stat, "df": df, "p_chisq": float(sst.chi2.sf(stat, df)),
            "p_boot": (1 + n_ge) / (1 + nsim_ok), "nsim_ok": nsim_ok, "lrt_sim": lrt}
