"""``tmbx.glmm``: glmmTMB's call in Python, and ``tmbx.anova`` between fits."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .._internal import gc_deferred
from .._sparse import check_layout
from ._design import build_design
from ._fit import GlmmFit
from ._template import build_template, resolve_family


@gc_deferred
def glmm(formula: str, data: pd.DataFrame, family="gaussian", ziformula=None, dispformula=None,
         reml: bool = False, weights=None, offset=None, start=None, map=None, *,
         na_action: str = "omit", layout: str | None = None, REML=None, priors=None,
         nagq: int = 1, method: str = "auto", devices=None, solver="auto") -> GlmmFit:
    """Fit a generalized linear mixed model with glmmTMB's syntax.

    >>> fit = tmbx.glmm("count ~ spp + mined + (1|site)", data=df, family="nbinom2",
    ...                 ziformula="~spp + mined")
    >>> print(fit.summary())

    ``family``: a glmmTMB family name ("poisson", "nbinom2", "truncated_nbinom2",
    "Gamma(link='log')", ...) or a ``tmbx.families`` object. ``ziformula``:
    zero-inflation (or, with a truncated family, hurdle) model. ``dispformula``:
    fixed effects on the dispersion (glmmTMB's log scale). ``reml``: integrate
    the fixed effects out (REML). ``start``/``map``: by glmmTMB's parameter names
    (beta, betazi, betadisp, theta, thetazi, psi). ``priors``: penalties for a
    regularized (MAP) fit, glmmTMB's priors interface. ``nagq``: adaptive
    Gauss-Hermite quadrature points per random effect (1: Laplace). ``method``:
    "auto" fits Gaussian identity-link models with a constant dispersion by
    profiled penalized least squares on cross-products (lme4's algorithm; the
    same optimum and log-likelihood, much faster on large data), everything
    else by the general Laplace engine; "laplace" forces the general engine.
    ``devices``: split the rows across devices (a list of JAX devices, or how
    many of ``jax.devices()``), the largest number of them that divides the rows
    evenly (`tmbx.shard_rows`): each device holds and evaluates its rows, and
    sums over rows become collective sums. Profiled least squares (Gaussian)
    reduces the rows to cross-products once and is not split. ``solver``: how
    the random effects' Hessian is factorized: "exact" (sparse Cholesky),
    "iterative" (linear in the rows on crossed designs: conjugate gradients and
    stochastic log-determinants with fixed-seed probes; `tmbx.IterativeOptions`
    sets probes and tolerances), "auto" (iterative only where its predicted
    cost is lower than the exact factorization's). ``layout``: the storage of
    the random effects' Hessian, "dense", "arrow" (one block per level of the
    largest grouping factor, the other factors' levels dense) or "banded"
    (block-tridiagonal after a bandwidth-reducing ordering); None chooses by
    predicted cost.
    """
    if method not in ("auto", "laplace"):
        raise ValueError(f"method must be 'auto' or 'laplace', got {method!r}")
    check_layout(layout)
    if REML is not None:
        reml = REML
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    if ziformula is not None and ziformula.replace(" ", "") in ("~0", "~-1+0", ""):
        ziformula = None
    fam = resolve_family(family, ziformula is not None)
    call = dict(formula=formula, family=family, ziformula=ziformula, dispformula=dispformula, reml=reml,
                weights=weights, offset=offset, start=start, map=map, na_action=na_action, layout=layout,
                priors=priors, nagq=nagq, method=method, solver=solver, data=data)
    key = None
    if devices is None:
        # the call and its data determine the traced programs: a later process with
        # the same call reads them from disk instead of tracing, and starts loading
        # them now, while the design is built (`tmbx._programs`)
        from .._programs import prefetch, spec_digest

        key = spec_digest(call)
        prefetch(key)
    design = build_design(formula, data, ziformula=ziformula, dispformula=dispformula,
                          weights=weights, offset=offset, na_action=na_action,
                          family_needs_trials=getattr(fam, "needs_trials", False))
    template = build_template(design, fam, reml=reml, start=start, map=map, layout=layout,
                              priors=priors, nagq=nagq, solver=solver)
    if devices is not None:
        _shard_template(template, devices)
    else:
        template.model._program_key = key
    lmm = None
    if method == "auto":
        from ._lmm import ProfiledLMM, lmm_applicable

        if lmm_applicable(template, map=map, priors=priors, nagq=nagq):
            lmm = ProfiledLMM(template)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = None if lmm is None else lmm.fit_model(user_disp=bool(start) and "betadisp" in start,
                                                      user_theta=bool(start) and "theta" in start)
        if fit is None:
            fit = template.model.fit()
    out = GlmmFit(template, fit, formula, call)
    # lme4's "boundary (singular) fit", but naming the term, the direction and what
    # to try; a fit that did not converge is reported with its most likely cause
    from ..diagnostics._diagnose import warn_fit

    warn_fit(out, caught)
    return out


def _shard_template(template, devices) -> None:
    """The template's data split by rows over the largest number of ``devices``
    that divides the rows, with a warning when that is fewer than given."""
    from .._shard import _device_list, shard_rows, split_devices

    n = int(template.design.nobs)
    given = _device_list(devices)
    devs = split_devices(n, given)
    if len(devs) < len(given):
        warnings.warn(f"{n} rows do not split evenly over {len(given)} devices: using {len(devs)} "
                      f"(the largest number that divides {n})", stacklevel=3)
    model = template.model
    model.data = shard_rows(model.data, n, devs)


def anova(*fits: GlmmFit, **kwargs) -> pd.DataFrame:
    """Likelihood-ratio tests between nested fits (R's ``anova``), ordered by df."""
    from ..inference._lrt import anova_lrt

    return anova_lrt(*fits, **kwargs)
