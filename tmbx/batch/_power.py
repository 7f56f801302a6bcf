"""``tmbx.power``: simulation-based power analysis (simr's ``powerSim``/``powerCurve``).

For each grid point (an effect size, or a number of levels of a factor as
simr's ``along``), simulate ``nsim`` responses from the model at the given
parameters (new random effects each time, as ``simulate.merMod``), refit
them all in one batch, test the coefficient, and report the fraction of
significant tests with its binomial Monte Carlo error and Clopper-Pearson
interval (simr's ``binom.test`` interval).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from .._internal import LazyModule

sst = LazyModule("scipy.stats")


@dataclasses.dataclass
class PowerResult:
    """``table``: one row per grid point (grid value, nsim, fitted, successes, power,
    mcse, lower, upper); ``plot()`` draws the power curve."""

    table: pd.DataFrame
    test: str
    method: str
    alpha: float

    def plot(self, ax=None):
        """Power with its confidence interval against the grid (simr's plot of a powerCurve)."""
        import matplotlib.pyplot as plt

        fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 3.5))
        t = self.table
        x = t.index.to_numpy(dtype=float) if t.index.name != "point" else np.arange(len(t))
        ax.errorbar(x, t["power"], yerr=[t["power"] - t["lower"], t["upper"] - t["power"]], marker="o", capsize=3)
        ax.axhline(0.8, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(t.index.name)
        ax.set_ylabel(f"power ({self.method} test of {self.test}, alpha={self.alpha})")
        return fig

    def __repr__(self):
        return f"PowerResult(test={self.test!r}, method={self.method!r})\n{self.table.to_string()}"


def power(formula: str, data: pd.DataFrame, family="gaussian", *, fixef: dict, sd: dict | None = None,
          disp: float | None = None, test: str, method: str = "wald", effect=None, along: str | None = None,
          levels=None, nsim: int = 200, alpha: float = 0.05, seed: int = 0, batch_size=None, device=None,
          progress: bool = True) -> PowerResult:
    """Power of a test of one fixed-effect coefficient by simulation (simr's powerSim).

    >>> pw = tmbx.power("y ~ group + (1|donor)", design_df, family="nbinom2",
    ...                 fixef={"Intercept": 1.0, "group[T.B]": 0.3}, sd={"donor": 0.3}, disp=2.0,
    ...                 test="group[T.B]", effect=[0.1, 0.2, 0.3], nsim=500)
    >>> pw.table; pw.plot()

    ``fixef``: every conditional coefficient by its column name; ``sd``: random-effect
    sds by group (a list of k sds for a k-term block; correlations 0); ``disp``:
    glmmTMB's ``sigma()`` for the family; ``test``: the coefficient tested
    (H0: 0); ``method``: "wald" (z test) or "lrt" (refit with the coefficient
    held at 0); ``effect``: values of the tested coefficient to try; ``along``
    and ``levels``: a factor and numbers of its levels to keep (the first ones,
    in order of appearance), as simr's ``powerCurve(along=)``.
    """
    if method not in ("wald", "lrt"):
        raise ValueError(f"method must be 'wald' or 'lrt', got {method!r}")
    if nsim < 2:
        raise ValueError(f"nsim must be at least 2, got {nsim}")
    if effect is not None and levels is not None:
        raise ValueError("give a grid over effect sizes (effect=) or over levels (along=, levels=), not both")
    if (along is None) != (levels is None):
        raise ValueError("along= (a factor column) and levels= (numbers of its levels) go together")
    rows = []
    if effect is not None:
        for i, v in enumerate(effect):
            rows.append((v, _point(formula, data, family, dict(fixef, **{test: float(v)}), sd, disp, test, method,
                                   nsim, alpha, seed + i, batch_size, device, progress)))
        name = f"effect:{test}"
    elif levels is not None:
        if along not in data.columns:
            raise ValueError(f"along={along!r} is not a column of the data")
        order = pd.unique(data[along])
        for i, n in enumerate(levels):
            if n > len(order):
                raise ValueError(f"levels: {n} > the {len(order)} levels of {along!r} in the data; extend the design")
            sub = data[data[along].isin(order[:n])]
            rows.append((n, _point(formula, sub, family, fixef, sd, disp, test, method, nsim, alpha, seed + i,
                                   batch_size, device, progress)))
        name = along
    else:
        rows.append((0, _point(formula, data, family, fixef, sd, disp, test, method, nsim, alpha, seed,
                               batch_size, device, progress)))
        name = "point"
    table = pd.DataFrame([r for _, r in rows], index=pd.Index([v for v, _ in rows], name=name))
    return PowerResult(table, test, method, alpha)


def _point(formula, data, family, fixef, sd, disp, test, method, nsim, alpha, seed, batch_size, device, progress):
    """Simulate nsim responses at one parameter setting, refit, count rejections."""
    from ._glmm_batch import fit_members

    tmpl, fit = _truth(formula, data, family, fixef, sd, disp)
    names = tmpl.names["beta"]
    if test not in names:
        raise ValueError(f"test={test!r} is not a coefficient of the model; coefficients: {names}")
    Y = fit.simulate(nsim=nsim, seed=seed)
    design = tmpl.design
    members = {i: (np.arange(design.nobs), Y[i].astype(float)) for i in range(nsim)}
    call = dict(formula=formula, family=family, ziformula=None, dispformula=None, weights=None, offset=None)
    kw = dict(batch_size=batch_size, device=device, progress=progress)
    full = fit_members(design, members, tmpl.family, call, list(range(nsim)), **kw)
    tab = full.table()
    if method == "wald":
        pvals = tab[f"p:{test}"].to_numpy()
        ok = tab["converged"].to_numpy()
    else:
        j = names.index(test)
        held = {"beta": [None if i == j else i for i in range(len(names))]}
        start = {"beta": np.zeros(len(names))}  # the held coefficient stays at 0
        null = fit_members(design, members, tmpl.family, call, list(range(nsim)),
                           template_kw={"map": held, "start": start}, **kw).table()
        stat = 2 * (tab["loglik"].to_numpy() - null["loglik"].to_numpy())
        pvals = sst.chi2.sf(np.maximum(stat, 0), 1)
        ok = tab["converged"].to_numpy() & null["converged"].to_numpy()
    n = int(ok.sum())
    k = int(np.sum(pvals[ok] < alpha))
    est = k / n if n else math.nan
    ci = sst.binomtest(k, n).proportion_ci(0.95, method="exact") if n else None
    return dict(nsim=nsim, fitted=n, successes=k, power=est,
                mcse=math.sqrt(est * (1 - est) / n) if n else math.nan,
                lower=ci.low if ci else math.nan, upper=ci.high if ci else math.nan)


def _truth(formula, data, family, fixef, sd, disp):
    """The template on the design and a `GlmmFit` standing at the given parameters
    (so that glmmTMB-style simulate() draws from them)."""
    from .._model import Fit
    from ..formula._design import build_design
    from ..formula._fit import GlmmFit
    from ..formula._template import build_template, resolve_family

    fam = resolve_family(family, False)
    resp = formula.split("~")[0].strip()
    if resp and resp not in data.columns:
        # the design needs a response column; any value in the family's support
        data = data.assign(**{resp: _placeholder(fam)})
    design = build_design(formula, data, family_needs_trials=getattr(fam, "needs_trials", False))
    tmpl = build_template(design, fam)
    sp = tmpl.model.space
    p = {k: sp.starts[k].reshape(sp.shapes[k]).copy() for k in sp.names}
    missing = [n for n in tmpl.names["beta"] if n not in fixef]
    extra = [n for n in fixef if n not in tmpl.names["beta"]]
    if missing or extra:
        raise ValueError(f"fixef must give every coefficient {tmpl.names['beta']}; missing {missing}, unknown {extra}")
    p["beta"] = np.array([fixef[n] for n in tmpl.names["beta"]], float)
    if tmpl.terms:
        p["theta"] = _theta(tmpl, sd or {})
    if fam.has_disp:
        if disp is None:
            raise ValueError(f"the {fam.name} family has a dispersion: give disp= (glmmTMB's sigma())")
        p["betadisp"] = np.array([math.log(disp)])
        if abs(float(fam.sigma(p["betadisp"][0])) - disp) > 1e-8 * max(1.0, disp):
            raise ValueError(f"disp= for the {fam.name} family: its sigma() is not exp(betadisp); give betadisp")
    x = sp.flatten(p, "x")
    res = dict(x=x, u=np.zeros(sp.n_u), f=0.0, g=np.zeros_like(x), status=0, iterations=0,
               hessian=np.zeros((len(x), len(x))))
    fit = GlmmFit(tmpl, Fit(tmpl.model, tmpl.model.data, res), formula, dict(formula=formula, data=data))
    return tmpl, fit


def _theta(tmpl, sd: dict) -> np.ndarray:
    """glmmTMB's theta from sds (log sds, then zero correlations)."""
    theta = []
    for t in tmpl.terms:
        if t.group not in sd:
            raise ValueError(f"sd= must give the random-effect sd(s) of group {t.group!r} (got {list(sd)})")
        s = np.atleast_1d(np.asarray(sd[t.group], float))
        if s.size != t.k or np.any(s <= 0):
            raise ValueError(f"sd[{t.group!r}] must be {t.k} positive value(s) ({t.terms}), got {s.tolist()}")
        th = np.zeros(t.struct.n_params)
        th[: t.k] = np.log(s)
        theta.append(th)
    return np.concatenate(theta)


def _placeholder(fam) -> float:
    for v in (1.0, 0.5, 0.0):
        try:
            fam.check_support(np.array([v]))
            return v
        except ValueError:
            continue
    return 1.0
