"""Parametric bootstrap (lme4's ``bootMer`` with ``use.u = FALSE``), refits batched.

``nsim`` responses are simulated from the fit with new random effects
(`GlmmFit.simulate`) and the template is refitted to all of them at once: the
engine's compiled fit (``Model._fit_impl``, BFGS over the Laplace marginal)
under one ``jit(vmap)`` over the simulated responses only, so the design
matrices are shared, not copied per replicate. Refits start at the estimate.
Everything is JAX, so the same code runs on a GPU.
"""

from __future__ import annotations

import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._internal import to_device
from .._laplace import INNER_OK
from .._optim import BFGSOptions, bfgs
from ._profile import check_parm, named_parameters

_BATCHED = weakref.WeakKeyDictionary()  # model -> {options: compiled batched refit}
# Replicates start next to their optimum and the problem is preconditioned, so
# plain BFGS (no Newton polish: 2 n extra gradients each) converges in ~10
# evaluations for most of them. A vmapped loop runs as long as its slowest member,
# so every replicate gets a short pass and only those that need more (sds running
# to 0, correlations to +/-1) get further passes, resumed where they stopped.
_PASS = BFGSOptions(polish=False, gtol=1e-7, max_evals=12)
_RESUMES = 6
# a replicate whose gradient (in Wald-se units) is this small when the passes end
# counts as converged: its parameters creep along a boundary (a correlation to
# +/-1, an sd to 0) where the likelihood is flat; what it could still gain in nll
# is of order gmax^2 / 2
_GRAD_OK = 0.1
_F_STALL = 1e-3  # nll units: a deviance change of 0.002
_CPU_CHUNK = 16  # replicates per refit call on CPU (see refit_simulations)


def default_batch_size(nsim):
    """Replicates simulated per batch (bounded memory): 1,000 on an accelerator, 250
    on CPU; `refit_simulations` refits a quarter batch at a time, at most
    ``_CPU_CHUNK`` on CPU."""
    return min(nsim, 1000 if jax.default_backend() != "cpu" else 250)


def check_nsim(nsim):
    if isinstance(nsim, bool) or not isinstance(nsim, (int, np.integer)) or nsim < 1:
        raise ValueError(f"nsim must be a positive integer (the number of simulated data sets), got {nsim!r}")
    return int(nsim)


def wald_factor(fit):
    """A square root L of the fit's Wald covariance (L L' = H^-1; identity where the
    Hessian is unusable): the refits optimize y with x = x_hat + L y."""
    n = len(fit._fit.x)
    try:
        H = np.asarray(fit._fit.hessian, float)
        lam, Q = np.linalg.eigh(0.5 * (H + H.T))
        if not np.all(np.isfinite(lam)) or lam.max() <= 0:
            raise ValueError
        lam = np.clip(lam, 1e-8 * lam.max(), None)
        return Q / np.sqrt(lam)[None, :]
    except (np.linalg.LinAlgError, ValueError):
        return np.eye(n)


def batched_refit(model, options):
    """``fit(Y, x0, u0, L, data)``: BFGS over the Laplace marginal, preconditioned by
    L, vmapped over responses Y (B, N) and starts (B, n_x), (B, n_u); the design is
    shared, not copied per replicate."""
    cache = _BATCHED.setdefault(model, {})
    if options in cache:
        return cache[options]

    def vg(y, u0, aux):
        d, x0, L = aux
        # the model's jitted value and gradient (the fit's traced jaxpr), chained through x0 + L y
        (val, (u, status)), gx = model._objective_vg(x0 + L @ y, u0, d)
        return jnp.where(status != INNER_OK, jnp.inf, val), L.T @ gx, u

    def one(Y, x0, u0, L, d):
        res = bfgs(vg, jnp.zeros_like(x0), u0, (model._prepare_data({**d, "y": Y}), x0, L), options)
        return {"x": x0 + L @ res["x"], "u": res["aux"], "f": res["f"], "status": res["status"],
                "gmax": jnp.max(jnp.abs(res["g"]), initial=0.0)}

    cache[options] = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, None)), compiler_options=model.fit_options())
    return cache[options]


def _run_chunks(run, Y, X0, U0, L, d, size, bar=None):
    """``run`` over rows of Y/X0/U0 in chunks of ``size`` (last padded); stacked numpy."""
    n = Y.shape[0]
    out = {}
    for lo in range(0, n, size):
        hi = min(lo + size, n)
        args = [np.concatenate([a[lo:hi], np.repeat(a[lo:lo + 1], size - (hi - lo), axis=0)]) for a in (Y, X0, U0)]
        res = run(*(to_device(a) for a in args), L, d)
        for k, v in res.items():
            out.setdefault(k, []).append(np.asarray(v)[: hi - lo])
        if bar is not None:
            bar.update(hi - lo)
    return {k: np.concatenate(v) for k, v in out.items()}


def refit_simulations(fit, sims, batch_size, progress=True, desc="bootstrap"):
    """Refit ``fit``'s model to the simulated responses ``sims(i0, i1) -> (i1 - i0, N)``,
    a quarter of ``batch_size`` at a time (the last chunk padded, so one program
    serves every chunk and every pass).
    Returns stacked x, u, f, status and converged (numpy)."""
    from tqdm.auto import tqdm

    lmm = getattr(fit._fit, "_lmm", None)
    if lmm is not None and lmm.relative:
        # a linear mixed model fitted by profiled least squares: its refits need only
        # each response's cross-products with the design, and no Laplace machinery
        bar = tqdm(total=sims.n, desc=desc, disable=not progress or sims.n <= batch_size, leave=False)
        out = lmm.refit_many(sims(0, sims.n), fit._fit.x, batch_size, bar,
                             hessian=getattr(fit._fit, "_zeta_hessian", None))
        bar.close()
        out["converged"] = np.isfinite(out["f"]) & ((out["status"] == 0) | (out["gmax"] <= _GRAD_OK))
        return out
    model, d = fit.model, fit.model.data
    x_hat, u_hat = np.asarray(fit._fit.x), np.asarray(fit._fit.u)
    L = to_device(wald_factor(fit))
    run = batched_refit(model, _PASS)
    # every pass runs the same compiled program (one batch shape): a second program
    # for the resumed few cost as much compile time as all the refits
    size = max(8, batch_size // 4)
    if jax.default_backend() == "cpu":
        # a vmapped chunk runs until its slowest replicate is done, and a resumed
        # few still pay for a whole chunk: small chunks waste less on CPU (1,000
        # refits, 2 cores: cbpp 3.2 s in chunks of 62, 0.45 s in chunks of 16;
        # a 1,000-group Poisson GLMM 17.2 s and 12.9 s)
        size = min(size, _CPU_CHUNK)
    parts = []
    bar = tqdm(total=sims.n, desc=desc, disable=not progress or sims.n <= batch_size, leave=False)
    for lo in range(0, sims.n, batch_size):
        hi = min(lo + batch_size, sims.n)
        Y = np.asarray(sims(lo, hi), float)
        X0, U0 = np.broadcast_to(x_hat, (hi - lo,) + x_hat.shape), np.broadcast_to(u_hat, (hi - lo,) + u_hat.shape)
        res = _run_chunks(run, Y, X0, U0, L, d, size, bar)
        res["Y"] = Y
        parts.append(res)
    bar.close()
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    stalled = np.zeros(sims.n, bool)
    for _ in range(_RESUMES):
        again = np.flatnonzero(out["status"] != 0)
        if not again.size:
            break
        more = _run_chunks(run, out["Y"][again], out["x"][again], out["u"][again], L, d, size)
        keep = np.isfinite(more["f"]) & ~(more["f"] > out["f"][again])
        # a pass that gains nothing: the replicate creeps along a boundary (an sd to 0,
        # a correlation to +/-1) where the likelihood is flat; its estimate is final
        stalled[again] = keep & (out["f"][again] - more["f"] <= _F_STALL)
        for k in more:
            out[k][again[keep]] = more[k][keep]
    del out["Y"]
    out["converged"] = np.isfinite(out["f"]) & ((out["status"] == 0) | (out["gmax"] <= _GRAD_OK) | stalled)
    return out


class Simulations:
    """Simulated responses, served in chunks: one `GlmmFit.simulate` call (one
    compiled program) when all of them fit in memory, else one call per chunk with
    seeds spawned from ``seed`` (then the draws depend on ``batch_size`` too)."""

    _MAX_AT_ONCE = 2e7  # numbers held at once (160 MB)

    def __init__(self, fit, nsim, seed, batch_size):
        self.fit, self.n, self.batch = fit, nsim, batch_size
        self.all = None
        if nsim * fit.nobs <= self._MAX_AT_ONCE:
            self.all = fit.simulate(nsim=nsim, seed=seed)
        else:
            seq = np.random.SeedSequence(seed)
            self.seeds = [int(q.generate_state(1)[0]) for q in seq.spawn(-(-nsim // batch_size))]

    def __call__(self, lo, hi):
        if self.all is not None:
            return self.all[lo:hi]
        return self.fit.simulate(nsim=self.batch, seed=self.seeds[lo // self.batch])[: hi - lo]


class Bootstrap:
    """Result of `bootstrap`.

    ``draws``: DataFrame, one row per replicate (rows of failed refits are NaN);
    ``converged``: boolean array; ``n_failed``; ``estimate``: ``fn`` at the fit.
    """

    def __init__(self, draws, converged, estimate, status):
        self.draws = draws
        self.converged = converged
        self.n_failed = int((~converged).sum())
        self.estimate = estimate
        self.status = status

    def confint(self, level: float = 0.95, parm=None) -> pd.DataFrame:
        """Percentile intervals (boot.ci type "perc"): columns estimate, lower, upper."""
        if not 0 < level < 1:
            raise ValueError(f"level must be between 0 and 1, got {level}")
        names = check_parm(parm, list(self.draws.columns))
        ok = self.draws.loc[self.converged, names]
        if self.n_failed:
            warnings.warn(f"{self.n_failed} of {len(self.draws)} bootstrap refits failed; the intervals use "
                          f"the {len(ok)} that converged", RuntimeWarning, stacklevel=2)
        q = ok.quantile([(1 - level) / 2, (1 + level) / 2]).T
        return pd.DataFrame({"estimate": pd.Series(self.estimate)[names], "lower": q.iloc[:, 0],
                             "upper": q.iloc[:, 1]}).rename_axis("name")

    def __repr__(self):
        return f"Bootstrap(nsim={len(self.draws)}, failed={self.n_failed}, columns={list(self.draws.columns)})"


_STATS = weakref.WeakKeyDictionary()  # fit -> {fn: compiled statistics over a batch of estimates}


def _stat_program(fit, fn):
    """``fn`` (default: every named parameter) over a batch of (x, u), one compiled
    program per fit and ``fn``, so that a repeated bootstrap does not trace again."""
    cache = _STATS.setdefault(fit, {})
    if fn not in cache:
        _, value_fn = named_parameters(fit)
        stat = value_fn if fn is None else (lambda p: fn(value_fn(p)))
        sp = fit.model.space
        cache[fn] = jax.jit(jax.vmap(lambda x, u: stat(sp.unflatten(x, u))))
    return cache[fn]


def bootstrap(fit, nsim: int = 1000, fn=None, seed: int = 0, batch_size: int | None = None,
              progress: bool = True) -> Bootstrap:
    """Parametric bootstrap (bootMer, ``use.u = FALSE``): simulate ``nsim`` responses
    with new random effects and refit them all, ``batch_size`` at a time.

    ``fn(params) -> dict`` maps one replicate's parameters (a dict keyed by the
    confint names: "Intercept", "sd_Intercept|Subject", "sigma", ...) to the
    statistics to keep; it must be traceable by JAX. Default: every parameter.
    """
    nsim = check_nsim(nsim)
    batch_size = default_batch_size(nsim) if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    stats = _stat_program(fit, fn)
    at_fit = stats(to_device(np.asarray(fit._fit.x)[None]), to_device(np.asarray(fit._fit.u)[None]))
    if not isinstance(at_fit, dict):
        raise TypeError(f"fn must return a dict of name -> scalar, got {type(at_fit).__name__}")
    at_fit = {k: v[0] for k, v in at_fit.items()}
    res = refit_simulations(fit, Simulations(fit, nsim, seed, batch_size), batch_size, progress)
    vals = stats(to_device(res["x"]), to_device(res["u"]))
    converged = res["converged"]
    draws = {}
    for k in at_fit:  # fn's order (jax returns dicts with sorted keys)
        v = np.asarray(vals[k], float)
        if v.shape != (nsim,):
            raise ValueError(f"fn's entry {k!r} has shape {v.shape[1:]} per replicate; return scalars "
                             "(one dict entry per statistic)")
        draws[k] = v
    draws = pd.DataFrame(draws)
    draws.loc[~converged, :] = np.nan
    draws.index.name = "replicate"
    if (~converged).any():
        warnings.warn(f"{int((~converged).sum())} of {nsim} bootstrap refits did not converge; their rows of "
                      "draws are NaN and confint leaves them out. Many failures point to a model too "
                      "complex for the data (see fit.diagnose()).", RuntimeWarning, stacklevel=3)
    estimate = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in at_fit.items()}
    return Bootstrap(draws, converged, estimate, res["status"])
