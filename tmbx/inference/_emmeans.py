"""Estimated marginal means, trends and their pairwise contrasts (R's emmeans).

The reference grid is emmeans': every level of every factor in the component's
fixed-effect formula, numeric covariates at their mean over the fitted rows.
Means over the factors not in ``specs`` are equally weighted (emmeans'
default). Estimates and SEs come from the fixed-effect covariance on the link
scale; ``type="response"`` back-transforms them by the delta method, and the
intervals are the back-transformed link-scale intervals, as emmeans does.
Degrees of freedom follow emmeans' rule for glmmTMB fits: the residual df
(``fit.df_resid``), shown as t ratios; ``df=np.inf`` gives z (asymptotic).
"""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.stats as sst

from ..formula._design import _CONTEXT
from ._anova import _check_component, p_adjust

_LINKS = {"cond": None, "zi": "logit", "disp": "log"}


def _variables(fit, component):
    """(factors: name -> levels, covariates: name -> mean) of a component's formula."""
    spec = fit.design.spec.components[component].fixed_spec
    data = fit.design.data
    state = spec.encoder_state
    factors, covs = {}, {}
    for var in sorted(spec.variables_by_source.get("data", ()), key=str):
        col = data[var]
        cat_exprs = [e for e, (kind, _) in state.items() if getattr(kind, "value", kind) == "categorical"
                     and re.search(rf"(^|\W){re.escape(var)}(\W|$)", str(e))]
        if isinstance(col.dtype, pd.CategoricalDtype):
            factors[var] = list(col.cat.categories)
        elif not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col) or cat_exprs:
            factors[var] = sorted(col.unique().tolist())  # strings, or a number used as C(x)/factor(x)
        else:
            covs[var] = float(col.mean())
    return factors, covs


def _grid(fit, component, at=None):
    factors, covs = _variables(fit, component)
    covs.update({k: v for k, v in (at or {}).items() if k in covs})
    for k, v in (at or {}).items():
        if k in factors:
            factors[k] = list(np.atleast_1d(v))
        elif k not in covs:
            raise ValueError(f"at: {k!r} is not a variable of the {component} model ({list(factors) + list(covs)}).")
    rows = list(itertools.product(*factors.values())) if factors else [()]
    grid = pd.DataFrame(rows, columns=list(factors))
    for var in factors:
        col = fit.design.data[var]
        if isinstance(col.dtype, pd.CategoricalDtype):
            grid[var] = pd.Categorical(grid[var], categories=col.cat.categories)
    for var, val in covs.items():
        grid[var] = val
    return grid, factors


def _matrix(fit, component, grid):
    spec = fit.design.spec.components[component].fixed_spec
    mm = spec.get_model_matrix(grid, context=_CONTEXT)
    return np.asarray(mm[list(fit.design.components[component].names)], float)


def _link(fit, component):
    """(link name, inverse link) of a component."""
    name = _LINKS[component] or fit.family.link.name
    if component == "cond":
        inv = fit.family.link.inverse
    else:
        inv = {"logit": jax.nn.sigmoid, "log": jnp.exp}[name]
    return name, inv


def _response_label(fit, component):
    """emmeans' name of a response-scale mean (.std.link.labels)."""
    if component in ("zi", "disp"):  # emmeans on glmmTMB's other components: "response"
        return "response"
    fam = fit.family.name
    return "prob" if "binomial" in fam else "rate" if "poisson" in fam else "response"


def _specs(specs):
    if isinstance(specs, str):
        specs = specs.replace("~", " ").replace("*", "+").replace("|", "+")
        return [s.strip() for s in specs.split("+") if s.strip()]
    return list(specs)


class EMMeans:
    """Marginal means (emmeans' ``emmGrid`` summary): ``.table`` and ``.pairs()``."""

    def __init__(self, fit, specs, type, component, L, labels, est_name, df, level, extra=None):
        self.fit, self.specs, self.type, self.component = fit, specs, type, component
        self.L, self.labels, self.df, self.level = L, labels, df, level
        beta = fit.fixef[component].to_numpy()
        V = fit.vcov()[component].to_numpy()
        self.eta = L @ beta
        self.V = L @ V @ L.T
        se = np.sqrt(np.diag(self.V))
        crit = sst.t.ppf(0.5 + level / 2, df) if np.isfinite(df) else sst.norm.ppf(0.5 + level / 2)
        lo, hi = self.eta - crit * se, self.eta + crit * se
        est, se_out = self.eta, se
        if type == "response" and est_name != "emmean":
            _, inv = _link(fit, component)
            mu = np.asarray(inv(jnp.asarray(self.eta)))
            dmu = np.asarray(jax.vmap(jax.grad(lambda e: inv(e)))(jnp.asarray(self.eta)))
            est, se_out = mu, np.abs(dmu) * se
            lo, hi = np.sort(np.stack([np.asarray(inv(jnp.asarray(lo))), np.asarray(inv(jnp.asarray(hi)))]), axis=0)
        table = labels.copy()
        for k, v in (extra or {}).items():
            table[k] = v
        table[est_name] = est
        table["SE"] = se_out
        table["df"] = df
        table["lower.CL"] = lo
        table["upper.CL"] = hi
        self.table = table.reset_index(drop=True)

    def __repr__(self):
        return self.table.to_string()

    def pairs(self, adjust="tukey", reverse=False) -> pd.DataFrame:
        """All pairwise differences on the link scale (emmeans' ``pairs``); on the response
        scale for log/logit links as ratios ("ratio", "odds.ratio") with null 1. ``adjust``:
        "tukey" (studentized range), "holm", "bonferroni", "none"."""
        k = len(self.eta)
        idx = list(itertools.combinations(range(k), 2))
        if reverse:
            idx = [(j, i) for i, j in idx]
        names = self._level_names()
        C = np.zeros((len(idx), k))
        for r, (i, j) in enumerate(idx):
            C[r, i], C[r, j] = 1.0, -1.0
        diff = C @ self.eta
        se = np.sqrt(np.einsum("ij,jk,ik->i", C, self.V, C))
        stat = diff / se
        link = _link(self.fit, self.component)[0]
        ratio = self.type == "response" and link in ("log", "logit")
        op = "/" if ratio else "-"
        out = pd.DataFrame({"contrast": [f"{_label(names[i])} {op} {_label(names[j])}" for i, j in idx]})
        if ratio:
            out["odds.ratio" if link == "logit" else "ratio"] = np.exp(diff)
            out["SE"] = np.exp(diff) * se
        else:
            out["estimate"] = diff
            out["SE"] = se
        out["df"] = self.df
        if ratio:
            out["null"] = 1.0
        finite = np.isfinite(self.df)
        out["t.ratio" if finite else "z.ratio"] = stat
        if adjust == "tukey":
            p = sst.studentized_range.sf(np.abs(stat) * np.sqrt(2), k, self.df if finite else np.inf)
            p = np.minimum(p, 1.0) if k > 2 else (2 * (sst.t.sf(np.abs(stat), self.df) if finite
                                                        else sst.norm.sf(np.abs(stat))))
        else:
            p = 2 * (sst.t.sf(np.abs(stat), self.df) if finite else sst.norm.sf(np.abs(stat)))
            p = p_adjust(p, adjust)
        out["p.value"] = p
        return out

    def _level_names(self):
        """emmeans' level labels: numeric-looking levels get the factor name in front."""
        labs = self.labels
        parts = []
        for col in labs.columns:
            vals = labs[col].astype(str).tolist()
            numeric = all(re.fullmatch(r"-?[0-9.]+", v) for v in vals)
            parts.append([f"{col}{v}" if numeric else v for v in vals])
        return [" ".join(p) for p in zip(*parts)]


def _average(fit, component, specs, at):
    grid, factors = _grid(fit, component, at)
    specs = _specs(specs)
    bad = [s for s in specs if s not in factors]
    if bad:
        raise ValueError(f"specs {bad} are not factors of the {component} model; factors: {list(factors)}"
                         + (". For a covariate's slope use emtrends." if bad else ""))
    X = _matrix(fit, component, grid)
    keys = grid[specs].astype(str).agg("\r".join, axis=1) if specs else pd.Series([""] * len(grid))
    order = list(dict.fromkeys(keys))
    L = np.stack([X[(keys == k).to_numpy()].mean(axis=0) for k in order])
    first = grid.groupby(keys.to_numpy(), sort=False).head(1)
    labels = first[specs].reset_index(drop=True) if specs else pd.DataFrame({"1": ["overall"]})
    return L, labels, grid, keys, order, specs


def emmeans(fit, specs, type="link", component="cond", level=0.95, df=None, at=None) -> EMMeans:
    """Estimated marginal means of ``specs`` (a factor name, or several: "A + B")
    on the link scale (``type="link"``: column "emmean") or the response scale
    ("prob", "rate" or "response", as emmeans names them)."""
    if type not in ("link", "response"):
        raise ValueError(f"type must be 'link' or 'response', got {type!r}.")
    _check_component(fit, component)
    L, labels, *_ = _average(fit, component, specs, at)
    est_name = "emmean" if type == "link" or (component == "cond" and fit.family.link.name == "identity") \
        else _response_label(fit, component)
    return EMMeans(fit, _specs(specs), type, component, L, labels, est_name,
                   float(fit.df_resid if df is None else df), level)


def emtrends(fit, specs, var, component="cond", level=0.95, df=None, at=None) -> EMMeans:
    """Slopes of the linear predictor in the covariate ``var`` at each level of ``specs``
    (emmeans' ``emtrends``): column "<var>.trend", by central differences of the model
    matrix (exact for terms linear in ``var``)."""
    _check_component(fit, component)
    _, covs = _variables(fit, component)
    if var not in covs:
        raise ValueError(f"var={var!r} is not a numeric covariate of the {component} model ({list(covs)}).")
    _, labels, grid, keys, order, sp = _average(fit, component, specs, at)
    h = 1e-3 * max(float(fit.design.data[var].std()), 1e-8)
    Xp = _matrix(fit, component, grid.assign(**{var: grid[var] + h}))
    Xm = _matrix(fit, component, grid.assign(**{var: grid[var] - h}))
    D = (Xp - Xm) / (2 * h)
    L = np.stack([D[(keys == k).to_numpy()].mean(axis=0) for k in order])
    return EMMeans(fit, sp, "link", component, L, labels, f"{var}.trend",
                   float(fit.df_resid if df is None else df), level)


def _label(level) -> str:
    """A level as emmeans writes it inside a contrast: in parentheses when it holds an
    operator or a space (``GP / (EC-A)``), so that the label reads unambiguously."""
    text = str(level)
    return f"({text})" if any(ch in text for ch in "-+*/ ") else text
