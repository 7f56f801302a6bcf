"""Likelihood-ratio tests between nested fits."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .._internal import LazyModule

sst = LazyModule("scipy.stats")


def anova_lrt(*fits) -> pd.DataFrame:
    """Likelihood-ratio tests between nested fits (R's ``anova``), ordered by df."""
    if len(fits) < 2:
        raise ValueError("anova needs at least two fits to compare")
    for f in fits[1:]:
        if f.nobs != fits[0].nobs:
            raise ValueError("anova: the fits use different numbers of observations; refit them on the same rows")
    fits = sorted(fits, key=lambda f: f.df_model)
    rows = []
    for i, f in enumerate(fits):
        row = {"npar": f.df_model, "AIC": f.aic, "BIC": f.bic, "logLik": f.loglik, "deviance": -2 * f.loglik}
        if i:
            prev = fits[i - 1]
            chisq = 2 * (f.loglik - prev.loglik)
            df = f.df_model - prev.df_model
            row.update({"Chisq": chisq, "Df": df, "Pr(>Chisq)": sst.chi2.sf(chisq, df) if df > 0 else np.nan})
        rows.append(row)
    return pd.DataFrame(rows, index=[f"fit{i}" for i in range(len(fits))])
