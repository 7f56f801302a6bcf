"""Refit with several optimizers and compare (lme4's ``allFit``).

Every optimizer starts from the model's start values and works on the same
Laplace objective (``model.fn``/``gr``/``he``, functions of the free fixed
parameters x): tmbx's own BFGS (the compiled fit), scipy's L-BFGS-B, a Newton
trust region on the exact Hessian (``trust-exact``), Nelder-Mead and Powell.
If they reach the same log-likelihood and estimates, the optimum is not an
artefact of one optimizer; if not, the verdict says which did best.
"""

from __future__ import annotations

import time
import warnings

import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._internal import LazyModule

sopt = LazyModule("scipy.optimize")

OPTIMIZERS = ("bfgs", "L-BFGS-B", "trust-exact", "Nelder-Mead", "Powell")


def _scipy_fit(model, method, x0, maxiter):
    def fn(x):
        v = model.fn(x)
        return v if np.isfinite(v) else 1e300

    kw = {"method": method}
    if method == "L-BFGS-B":
        kw.update(jac=model.gr, options={"maxiter": maxiter, "ftol": 1e-15, "gtol": 1e-8})
    elif method in ("trust-exact", "trust-ncg", "trust-krylov"):
        kw.update(jac=model.gr, hess=model.he, options={"maxiter": maxiter, "gtol": 1e-8})
    elif method == "Nelder-Mead":
        kw.update(options={"maxiter": maxiter * 20, "maxfev": maxiter * 40, "xatol": 1e-9, "fatol": 1e-12,
                           "adaptive": len(x0) > 3})
    elif method == "Powell":
        kw.update(options={"maxiter": maxiter * 10, "xtol": 1e-9, "ftol": 1e-13})
    res = sopt.minimize(fn, x0, **kw)
    return np.asarray(res.x, float), str(res.message)


def _estimates(fit, x, u):
    """Fixed effects and random-effect sds at (x, u) from the template's structures."""
    sp = fit.model.space
    p = {k: np.asarray(v) for k, v in sp.unflatten(jnp.asarray(x), jnp.asarray(u)).items()}
    out = {}
    for key, comp in (("beta", "cond"), ("betazi", "zi"), ("betadisp", "disp")):
        if key in p:
            prefix = "" if comp == "cond" else f"{comp}~"
            for name, v in zip(fit.template.names[key], p[key]):
                out[prefix + name] = float(v)
    for t in fit.template.terms:
        th = p["theta" if t.component == "cond" else "thetazi"][t.theta_slice]
        sd = np.asarray(t.struct.report(jnp.asarray(th))["sd"], float).reshape(-1)
        prefix = "" if t.component == "cond" else "zi~"
        for name, s in zip(t.terms, sd):
            out[f"{prefix}sd_{name}|{t.group}"] = float(s)
    return out


def allfit(fit, optimizers=OPTIMIZERS, *, maxiter: int = 1000, tol_loglik: float = 1e-3,
           tol_par: float = 1e-3, grad_tol: float = 1e-3, progress: bool = True) -> pd.DataFrame:
    """Refit ``fit``'s model with each optimizer (lme4's ``allFit``).

    Returns a DataFrame, one row per optimizer: loglik, converged, time (s),
    max_grad, message, then the fixed effects and random-effect sds.
    ``.attrs["verdict"]`` says whether the optimizers agree (log-likelihoods
    within ``tol_loglik``, estimates within ``tol_par`` relative to
    ``max(1, |estimate|)``) and which is best; ``.attrs["best"]`` names it.
    """
    from tqdm.auto import tqdm

    unknown = [o for o in optimizers if o not in OPTIMIZERS + ("trust-ncg", "trust-krylov")]
    if unknown:
        raise ValueError(f"unknown optimizers {unknown}; available: {list(OPTIMIZERS) + ['trust-ncg', 'trust-krylov']}")
    model = fit.model
    x0 = np.asarray(model.par, float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # compile the objective, gradient (and Hessian) outside the timings
        model.fn(x0), model.gr(x0)
        if any(o.startswith("trust") for o in optimizers):
            model.he(x0)
    rows = []
    for name in tqdm(list(optimizers), desc="allfit", disable=not progress):
        model._u_last = jnp.asarray(model.space.start("u"))
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # failures are reported in the table
            try:
                if name == "bfgs":
                    r = model.fit()
                    x, msg = r.x, r.message
                else:
                    x, msg = _scipy_fit(model, name, x0, maxiter)
                nll = model.fn(x)  # also leaves the latent modes at x in model._u_last
                g = model.gr(x) if len(x) else np.zeros(0)
            except Exception as e:  # noqa: BLE001 - an optimizer failing is a result, not an error
                rows.append({"optimizer": name, "loglik": np.nan, "converged": False,
                             "time": time.perf_counter() - t0, "max_grad": np.nan,
                             "message": f"{type(e).__name__}: {e}"})
                continue
        elapsed = time.perf_counter() - t0
        mg = float(np.max(np.abs(g))) if len(g) else 0.0
        # converged: at a zero gradient, whatever the optimizer's own stopping reason
        # (trust-exact, e.g., stops at the optimum with "a bad approximation" when
        # the objective's rounding error dominates the predicted improvement)
        conv = bool(np.isfinite(nll) and mg < grad_tol * max(1.0, abs(nll)))
        row = {"optimizer": name, "loglik": -nll, "converged": conv, "time": elapsed, "max_grad": mg,
               "message": msg}
        row.update(_estimates(fit, x, model._u_last))
        rows.append(row)
    model._u_last = jnp.asarray(fit._fit.u)  # back to the original fit's warm start
    df = pd.DataFrame(rows).set_index("optimizer")
    df.attrs["verdict"], df.attrs["best"] = _verdict(df, tol_loglik, tol_par)
    return df


def _verdict(df, tol_loglik, tol_par):
    ok = df[df["converged"] & np.isfinite(df["loglik"])]
    pool = ok if len(ok) else df[np.isfinite(df["loglik"])]
    if not len(pool):
        return "no optimizer reached a finite log-likelihood: check the model and start values", None
    # ties (within 1e-8) go to the first optimizer in the order given (tmbx's BFGS first)
    best = pool.index[int(np.argmax(pool["loglik"].to_numpy() >= pool["loglik"].max() - 1e-8))]
    est_cols = [c for c in df.columns if c not in ("loglik", "converged", "time", "max_grad", "message")]
    ref = pool.loc[best, est_cols].astype(float)
    scale = np.maximum(1.0, np.abs(ref.to_numpy()))
    worse, differ = [], []
    for name, row in pool.iterrows():
        if name == best:
            continue
        if pool.loc[best, "loglik"] - row["loglik"] > tol_loglik:
            worse.append(f"{name} ({row['loglik'] - pool.loc[best, 'loglik']:+.3g})")
            continue
        d = np.abs(row[est_cols].astype(float).to_numpy() - ref.to_numpy()) / scale
        if np.any(d > tol_par):
            differ.append(f"{name} ({est_cols[int(np.nanargmax(d))]})")
    failed = [n for n in df.index if n not in ok.index]
    parts = []
    if not worse and not differ:
        parts.append(f"the {len(pool)} converged optimizers agree (log-likelihood within {tol_loglik}, "
                     f"estimates within {tol_par}); best: {best} (logLik {pool.loc[best, 'loglik']:.6f})")
    else:
        parts.append(f"the optimizers disagree; best: {best} (logLik {pool.loc[best, 'loglik']:.6f})")
        if worse:
            parts.append("lower log-likelihood: " + ", ".join(worse))
        if differ:
            parts.append("same log-likelihood but different estimates (a flat likelihood: the model may be "
                         "over-parameterized or singular): " + ", ".join(differ))
    if failed:
        parts.append("not converged: " + ", ".join(failed))
    return "; ".join(parts), best
