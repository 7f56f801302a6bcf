"""Tables of batch fits: one row per member (Wald tests, Benjamini-Hochberg).

Standard errors come from each member's Hessian of the marginal nll (the
optimizer's finite-difference Hessian of the exact gradient, the one
`sdreport` inverts), inverted for all members at once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .._internal import LazyModule

sst = LazyModule("scipy.stats")


def bh_adjust(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (R's ``p.adjust(p, "BH")``) over the
    finite entries; NaN stays NaN."""
    p = np.asarray(p, float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = sst.false_discovery_control(p[ok], method="bh")
    return out


def member_status(model, res: dict):
    """(converged, message, pd) per member, with `Fit`'s definitions."""
    from .._model import Fit

    n = len(res["f"])
    conv, msg, pd_ok = np.zeros(n, bool), [], np.zeros(n, bool)
    for i in range(n):
        fit = Fit(model, None, {k: v[i] for k, v in res.items()})
        conv[i], pd_ok[i] = fit.converged, fit.pd_hessian
        msg.append(fit.message)
    return conv, msg, pd_ok


def covariances(H: np.ndarray, pd_ok: np.ndarray) -> np.ndarray:
    """Inverse Hessians (B, n, n); NaN where the Hessian is not positive definite."""
    H = 0.5 * (H + np.swapaxes(H, 1, 2))
    V = np.full(H.shape, np.nan)
    if pd_ok.any():
        V[pd_ok] = np.linalg.inv(H[pd_ok])
    return V


def wald_columns(names, est: np.ndarray, se: np.ndarray, prefix: str = "beta") -> dict:
    """Columns prefix:NAME, se:NAME, p:NAME (two-sided Wald z), padj:NAME (BH)."""
    cols = {}
    for j, name in enumerate(names):
        z = est[:, j] / se[:, j]
        p = 2 * sst.norm.sf(np.abs(z))
        cols[f"{prefix}:{name}"] = est[:, j]
        cols[f"se:{name}"] = se[:, j]
        cols[f"p:{name}"] = p
        cols[f"padj:{name}"] = bh_adjust(p)
    return cols


def template_table(batchfit, **kwargs) -> pd.DataFrame:
    """`BatchFit.table`: one row per data set of a template model's batch fit:
    converged, message, loglik, and per free fixed parameter (ParamSpace labels)
    est:NAME, se:NAME, p:NAME (Wald z against 0) and padj:NAME (BH across members)."""
    if kwargs:
        raise TypeError(f"table() got unexpected arguments {sorted(kwargs)}")
    model, res = batchfit.model, batchfit.res
    conv, msg, pd_ok = member_status(model, res)
    V = covariances(np.asarray(res["hessian"]), pd_ok)
    se = np.sqrt(np.clip(np.diagonal(V, axis1=1, axis2=2), 0, None))
    se = np.where(np.isnan(np.diagonal(V, axis1=1, axis2=2)), np.nan, se)
    cols = {"converged": conv, "message": msg, "loglik": -np.asarray(res["f"])}
    cols.update(wald_columns(model.space.labels["x"], np.asarray(res["x"]), se, prefix="est"))
    return pd.DataFrame(cols, index=pd.RangeIndex(len(conv), name="member"))
