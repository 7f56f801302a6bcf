"""Likelihood profiles and profile confidence intervals (lme4's ``profile.merMod``).

Every profile point is a constrained refit: one coordinate ``s`` of the
fixed-parameter vector is held at a value and the Laplace marginal is
minimized over the others. The points are independent, so they are computed
as batches through one compiled program of BFGS refits over (parameter,
value) pairs (``vmap``ped on a GPU, one after another on the CPU: `_solver`),
warm-started on the quadratic approximation of the
profile trace at the optimum. The grid is set on each coordinate's Wald scale
and extended only where the signed root deviance

    zeta(v) = sign(v - v_hat) sqrt(2 (nll_v - nll_hat))

has not yet passed the cutoff; the limits are read off a local interpolant of
the coordinate against zeta (lme4 interpolates the same curve with a spline)
and mapped to lme4's scale (sd, cor, sigma).

Which coordinate is held:

- fixed effects (cond, zi, disp): the coefficient itself;
- sds: the structure's log-sd coordinate (sd = exp(s));
- ``sigma``: the dispersion coefficient (``family.sigma`` of it);
- correlations of a ``us`` term with its first term: glmmTMB's
  unit-lower-triangular L gives cor(i, 0) = L[i,0] / ||L_i||, so holding
  s = L[i,0] / sqrt(1 + sum_{0<j<i} L[i,j]^2) holds cor = s / sqrt(1 + s^2)
  (for a 2x2 term L[1,0] itself);
- the other correlations cor(i, j), 0 < j < i, of a ``us`` term with k > 2:
  L[i,j] is solved from the held cor and the other coordinates (a quadratic;
  `_hold`), so that the optimizer moves everything else freely;
- structure parameters (ar1 ``rho``, ``range``, ...) that depend on a single
  theta coordinate: that coordinate.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._config import merged
from .._internal import LazyModule, eval_method, to_device
from .._laplace import INNER_OK
from .._optim import BFGSOptions, bfgs

sst = LazyModule("scipy.stats")
interp = LazyModule("scipy.interpolate")

_STEPS = np.array([1.0, 2.0, 3.0, 4.0])  # first grid, in Wald se of s
_ZETA_TARGET = 3.0  # profile each side until |zeta| passes this (covers level 0.997)
_MAX_ROUNDS = 6  # extension rounds for sides that have not reached the target
_DZETA = 1.2  # largest zeta step between neighbouring profile points
_MAX_EXTRA = 24  # geometric points per side beyond the first four of an extension (x1.5 each)


# ---------------------------------------------------------------------- naming
def _prefix(component):
    return "" if component == "cond" else f"{component}~"


def named_parameters(fit):
    """Names of every reported parameter (the confint names) and a traceable
    ``fn(p) -> {name: scalar}`` of one unflattened parameter dict, on lme4's scale."""
    tmpl, fam = fit.template, fit.family
    entries = []  # (name, fn(p))
    for key, comp in (("beta", "cond"), ("betazi", "zi")):
        for j, nm in enumerate(tmpl.names.get(key, [])):
            entries.append((_prefix(comp) + nm, lambda p, key=key, j=j: p[key][j]))
    if fam.has_disp:
        if fit.sigma is not None:
            entries.append(("sigma", lambda p: jnp.asarray(fam.sigma(p["betadisp"][0], p.get("psi")))))
        else:
            for j, nm in enumerate(tmpl.names["betadisp"]):
                entries.append(("disp~" + nm, lambda p, j=j: p["betadisp"][j]))
    for t in tmpl.terms:
        key = "theta" if t.component == "cond" else "thetazi"
        pre = _prefix(t.component)
        th = lambda p, t=t, key=key: p[key][t.theta_slice]
        sd = lambda p, t=t, th=th: jnp.sqrt(jnp.diag(t.struct.cov(th(p))))
        for j, _ in _log_sd_positions(t):
            entries.append((f"{pre}sd_{t.terms[j]}|{t.group}", lambda p, sd=sd, j=j: sd(p)[j]))
        if t.struct.name == "us":
            for i, j in zip(*np.tril_indices(t.k, -1)):
                def cor(p, t=t, th=th, sd=sd, i=i, j=j):
                    return t.struct.cov(th(p))[i, j] / (sd(p)[i] * sd(p)[j])
                entries.append((f"{pre}cor_{t.terms[i]}.{t.terms[j]}|{t.group}", cor))
        probe = eval_method(t.struct, "_report_extra", np.asarray(t.struct.start(), float))
        for name, val in probe.items():
            if np.ndim(val) == 0:
                entries.append((f"{pre}{name}|{t.group}",
                                lambda p, t=t, th=th, name=name: t.struct._report_extra(th(p))[name]))
    names = [e[0] for e in entries]

    def fn(p):
        return {name: jnp.asarray(f(p), float) for name, f in entries}

    return names, fn


def _log_sd_positions(t):
    from ..formula._fit import _log_sd_positions as pos

    return pos(t)


def check_parm(parm, names):
    """``parm`` as a list of known names (None: all); a clear error otherwise."""
    if parm is None:
        return list(names)
    parm = [parm] if isinstance(parm, str) else list(parm)
    missing = [q for q in parm if q not in names]
    if missing:
        raise ValueError(f"parm names {missing} are not parameters of this model; available: {names}")
    return parm


# ---------------------------------------------------------------------- specs
@dataclasses.dataclass
class _Spec:
    """One profiled parameter: hold x[coord] = s * sqrt(1 + sum(w * x^2)); value = g(s)."""

    name: str
    coord: int
    w: np.ndarray
    g: object  # s -> value on lme4's scale (vectorized, numpy)
    kind: str  # "beta", "sd", "cor", "other": what an unreached side means
    s_hat: float = 0.0
    se: float = 1.0
    # a correlation cor(i, j), j > 0, of a us term (see `_hold`): row j's entries
    # (wj) and the pairs (L_ik, L_jk), k < j, of the inner product (pairs)
    wj: np.ndarray | None = None
    pairs: np.ndarray | None = None

    def s_of(self, x):
        """The held coordinate's s at the parameter vector x (the inverse of `_hold`)."""
        x = np.asarray(x, float)
        b = 1.0 + float(np.sum(self.w * x * x))
        if self.wj is None:
            return float(x[self.coord] / math.sqrt(b))
        a, nj = float(x @ self.pairs @ x), 1.0 + float(np.sum(self.wj * x * x))
        t = x[self.coord]
        r = (a + t) / math.sqrt((b + t * t) * nj)
        return float(r / math.sqrt(max(1.0 - r * r, 1e-300)))


def _hold(s, z, w, wj, pairs, general=True):
    """The held coordinate x[c] given s and the other coordinates z.

    For a parameter whose value is s / sqrt(1 + s^2) with x[c] = s sqrt(b),
    b = 1 + sum(w z^2) (an sd, a fixed effect with w = 0, or the correlation
    cor(i, 0) of a us term: x[c] = L_i0, b = |L_i|^2 - L_i0^2) it is that.
    A correlation cor(i, j), j > 0, of a us term (unit lower-triangular L, rows
    L_i) is r = (a + t) / sqrt((b + t^2) n_j) in t = L_ij, with
    a = sum_{k<j} L_ik L_jk, b = |L_i|^2 - t^2 and n_j = |L_j|^2: t solves the
    quadratic (1 - c) v^2 + 2 a c v - c (a^2 + b) = 0 in v = a + t, c = r^2 n_j,
    at the root that gives r back (NaN where the other coordinates leave r out
    of reach: the optimizer then steps back)."""
    b = 1.0 + jnp.sum(w * z * z)
    simple = s * jnp.sqrt(b)
    if not general:  # no such correlation among the profiled parameters
        return simple
    r = s / jnp.sqrt(1.0 + s * s)
    a = z @ pairs @ z
    nj = 1.0 + jnp.sum(wj * z * z)
    cc = r * r * nj
    one_c = jnp.where(jnp.abs(1.0 - cc) < 1e-12, 1e-12, 1.0 - cc)
    disc = cc * (a * a + b * one_c)
    # sqrt with a finite derivative wherever it is not used (disc = 0: r = 0)
    pos = disc > 0
    root = jnp.where(pos, jnp.sqrt(jnp.where(pos, disc, 1.0)), jnp.where(disc == 0, 0.0, jnp.nan))
    v = jnp.stack([(-a * cc + root) / one_c, (-a * cc - root) / one_c])
    t = v - a
    err = jnp.abs(v / jnp.sqrt((b + t * t) * nj) - r)
    general = t[jnp.argmin(jnp.where(jnp.isfinite(err), err, jnp.inf))]
    return jnp.where(jnp.any(wj != 0), general, simple)


def _x_index(sp, key, i):
    if key not in sp.index:
        return -1
    idx = int(sp.index[key][i])
    return idx if key in sp.fixed else -1


def _specs(fit, wanted):
    sp = fit.model.space
    fam = fit.family
    p = fit._par()
    specs, skipped = [], []
    n = sp.n_x
    zero = np.zeros(n)

    def add(name, key, i, g, kind, w=None, wj=None, pairs=None):
        if name not in wanted:
            return
        c = _x_index(sp, key, i)
        if c < 0:
            skipped.append((name, ("it is not a free parameter of the profiled fit (mapped, or "
                                   "integrated out by REML: profile the ML fit instead)")))
            return
        specs.append(_Spec(name, c, zero if w is None else w, g, kind, wj=wj, pairs=pairs))

    ident = lambda s: np.asarray(s, float)
    for key, comp in (("beta", "cond"), ("betazi", "zi")):
        for j, nm in enumerate(fit.template.names.get(key, [])):
            add(_prefix(comp) + nm, key, j, ident, "beta")
    if fam.has_disp:
        if fit.sigma is not None:
            psi = p.get("psi")
            add("sigma", "betadisp", 0,
                _pointwise(lambda v, psi=psi: eval_method(fam, "sigma", v, psi)), "sd")
        else:
            for j, nm in enumerate(fit.template.names["betadisp"]):
                add("disp~" + nm, "betadisp", j, ident, "beta")
    for t in fit.template.terms:
        key = "theta" if t.component == "cond" else "thetazi"
        pre = _prefix(t.component)
        base = t.theta_slice.start
        for j, pos in _log_sd_positions(t):
            add(f"{pre}sd_{t.terms[j]}|{t.group}", key, base + pos, np.exp, "sd")
        if t.struct.name == "us":
            tril = list(zip(*np.tril_indices(t.k, -1)))
            for q, (i, j) in enumerate(tril):
                name = f"{pre}cor_{t.terms[i]}.{t.terms[j]}|{t.group}"
                pos = {pair: _x_index(sp, key, base + t.k + qq) for qq, pair in enumerate(tril)}
                w = np.zeros(n)  # row i's other entries
                for (ii, jj), c in pos.items():
                    if ii == i and jj != j and c >= 0:
                        w[c] = 1.0
                wj = pairs = None
                if j > 0:
                    wj, pairs = np.zeros(n), np.zeros((n, n))
                    for kk in range(j):
                        if pos[(j, kk)] >= 0:
                            wj[pos[(j, kk)]] = 1.0
                            if pos[(i, kk)] >= 0:
                                pairs[pos[(i, kk)], pos[(j, kk)]] = 1.0
                add(name, key, base + t.k + q, lambda s: np.asarray(s) / np.sqrt(1 + np.asarray(s) ** 2),
                    "cor", w, wj, pairs)
        th_hat = np.asarray(p[key][t.theta_slice], float)
        for ename, val in eval_method(t.struct, "_report_extra", th_hat).items():
            name = f"{pre}{ename}|{t.group}"
            if np.ndim(val) or name not in wanted:
                continue
            grad = np.asarray(jax.grad(lambda th, t=t, ename=ename: t.struct._report_extra(th)[ename])(th_hat))
            dep = np.flatnonzero(grad != 0)
            if dep.size != 1:
                skipped.append((name, "it depends on more than one covariance parameter"))
                continue
            pos = int(dep[0])

            def g(v, t=t, pos=pos, ename=ename, th_hat=th_hat):
                th = th_hat.copy()
                th[pos] = v
                return eval_method(t.struct, "_report_extra", th)[ename]

            add(name, key, base + pos, _pointwise(g), "cor" if ename == "rho" else "other")
    return specs, skipped


def _pointwise(f):
    """A vectorized NumPy ``g(s)`` from a scalar function that runs a compiled program
    (`eval_method`: one program per module type, reused for every point and every
    later profile; mapped with ``jax.vmap`` op by op instead, each new number of
    points compiled its own programs)."""

    def g(s):
        s = np.asarray(s, float)
        return np.reshape([float(f(v)) for v in s.reshape(-1)], s.shape)

    return g


# ---------------------------------------------------------------------- solver
_SOLVERS = weakref.WeakKeyDictionary()  # model -> {options: compiled solver}


def _solver(model, options, general, group):
    """One compiled BFGS over a batch of (start z0, latent start, coord c, s, w, wj,
    pairs, L, live), ``vmap``ped (``group`` 0) or one point after another (1):
    the marginal nll with x[c] held by `_hold` (s * sqrt(1 + sum(w x^2)), or the
    quadratic's root for a correlation cor(i, j), j > 0, when ``general``).

    The optimizer works on y with x = z0 + L y, L the Cholesky factor of the
    conditional covariance of the other coordinates given x[c] (from the fit's
    Hessian): the problem is then near the identity's scale and BFGS, which starts
    from an identity inverse Hessian, converges in a few steps. The held coordinate
    y[c] carries the penalty y[c]^2 / 2 instead, so it stays at 0."""
    n = model.space.n_x
    ar = jnp.arange(n)

    def vg(y, u0, aux):
        d, c, s, w, wj, pairs, z0, L = aux

        def x_of(y):
            z = z0 + L @ y
            return jnp.where(ar == c, _hold(s, z, w, wj, pairs, general), z)

        # the model's jitted value and gradient (the fit's traced jaxpr, from JAX's
        # caches), and the chain rule through x(y) here
        x, pullback = jax.vjp(x_of, y)
        (val, (u, status)), gx = model._objective_vg(x, u0, d)
        val = val + 0.5 * y[c] ** 2
        g = pullback(gx)[0] + jnp.where(ar == c, y, 0.0)
        ok = (status == INNER_OK) & jnp.isfinite(val)
        return jnp.where(ok, val, jnp.inf), jnp.where(ok, g, 0.0), u

    def one(z0, u0, c, s, w, wj, pairs, L, live, d):
        # a padding slot (live False) gets no evaluation at all
        limit = jnp.where(live, options.max_evals, 0)
        res = bfgs(vg, jnp.zeros_like(z0), u0, (d, c, s, w, wj, pairs, z0, L), options, max_evals=limit)
        z = z0 + L @ res["x"]
        x = jnp.where(ar == c, _hold(s, z, w, wj, pairs, general), z)
        return x, res["aux"], res["f"], res["status"]

    cache = _SOLVERS.setdefault(model, {})
    if (options, general, group) not in cache:
        # One program runs a batch of points: all vectorized (`vmap`), or one after
        # another (`lax.map`). A vectorized refit iterates until its slowest point
        # has converged, so on the CPU, where
        # vectorizing a small model's refits buys little, every point runs alone:
        # one far-out point that needs 200 evaluations no longer holds up the
        # others (Salamanders' zip model: 240 s for a 56-point round before), a
        # padding slot costs nothing, and the unbatched program traces and
        # compiles faster (a first profile of cbpp: 1.2 s to 0.8 s). On a GPU the
        # whole batch is vectorized, evaluated in parallel.
        def batched(Z, U, C, S, W, WJ, PA, L, LIVE, d):
            args = (Z, U, C, S, W, WJ, PA, L, LIVE)
            if group == 1:
                return jax.lax.map(lambda a: one(*a, d), args)
            return jax.vmap(one, in_axes=(0,) * len(args) + (None,))(*args, d)

        # with the model's compiler options (a small model's: quick to compile). Not
        # tiered as its fit is: each point's program runs milliseconds at level 0
        # too, and an optimizing compile in the background would only slow the
        # profile's later rounds on a 2-core machine (sleepstudy: 0.89 s against
        # 1.09 s for a first profile; repeated profiles 0.08 s either way)
        cache[options, general, group] = jax.jit(batched, compiler_options=merged(model._compiler_options,
                                                                                  model.fit_options()))
    return cache[options, general, group]


#: profile points per compiled program call on the CPU (`_Runner`): padding slots
#: are free, so rounds of any size up to this take one call of one program
CPU_BATCH = 64


def _group(vectorize=None):
    """Points vectorized together (`_solver`): 1 (each point alone) or 0 (the whole
    batch at once); by default 1 on the CPU, 0 elsewhere."""
    if vectorize is None:
        vectorize = jax.default_backend() != "cpu"
    return 0 if vectorize else 1


# ---------------------------------------------------------------------- profile
class Profile:
    """Result of `profile`: the zeta table, confidence limits and the lme4-style plot.

    ``table``: DataFrame with columns parameter, value (lme4's scale), zeta and
    the held coordinate ``s``; ``estimate``: the profiled fit's estimates;
    ``criterion``: "ML" or "REML".
    """

    def __init__(self, specs, points, estimate, criterion, skipped):
        self._specs = {s.name: s for s in specs}
        self.table = points
        self.estimate = estimate
        self.criterion = criterion
        self.skipped = dict(skipped)

    def _limits(self, spec, zq):
        tab = self.table[self.table["parameter"] == spec.name]
        s, z = tab["s"].to_numpy(), tab["zeta_s"].to_numpy()
        order = np.argsort(s)
        s, z = s[order], z[order]
        # keep the part of the curve where zeta increases with s (numerical noise, or a
        # second optimum, can break monotonicity far out)
        i0 = int(np.argmin(np.abs(s - spec.s_hat)))
        keep = [i0]
        for i in range(i0 + 1, len(s)):
            if z[i] > z[keep[-1]]:
                keep.append(i)
        for i in range(i0 - 1, -1, -1):
            if z[i] < z[keep[0]]:
                keep.insert(0, i)
        s, z = s[keep], z[keep]
        out = []
        for side in (-1, 1):
            target = side * zq
            reached = (z.min() <= target) if side < 0 else (z.max() >= target)
            if not reached:
                out.append(self._unreached(spec, side))
                continue
            out.append(float(spec.g(_local_cubic(z, s, target)).reshape(-1)[0]))
        return out

    def _unreached(self, spec, side):
        # s runs to -inf (sd -> 0, cor -> -1) or +inf without passing the cutoff
        if spec.kind == "sd" and side < 0:
            return float(spec.g(-np.inf).reshape(-1)[0]) if spec.name != "sigma" else 0.0
        if spec.kind == "cor":
            return float(side)
        warnings.warn(f"profile of {spec.name}: the likelihood stays within the interval's cutoff as far "
                      f"as it was profiled on the {'lower' if side < 0 else 'upper'} side; that limit "
                      "is reported as unbounded (+/-inf). The parameter may be weakly identified: "
                      "simplify the model or use method='boot'.", RuntimeWarning, stacklevel=4)
        return -np.inf if side < 0 else np.inf

    def confint(self, level: float = 0.95) -> pd.DataFrame:
        """Profile intervals: DataFrame indexed by parameter, columns estimate, lower, upper."""
        if not 0 < level < 1:
            raise ValueError(f"level must be between 0 and 1, got {level}")
        zq = float(sst.norm.ppf(0.5 + level / 2))
        if zq > _ZETA_TARGET:
            warnings.warn(f"level {level} needs |zeta| up to {zq:.2f} but the profile was computed to "
                          f"{_ZETA_TARGET}; limits beyond it are extrapolated", RuntimeWarning, stacklevel=2)
        rows = []
        for name, spec in self._specs.items():
            lo, hi = self._limits(spec, zq)
            lo, hi = min(lo, hi), max(lo, hi)
            rows.append((name, self.estimate[name], lo, hi))
        return pd.DataFrame(rows, columns=["name", "estimate", "lower", "upper"]).set_index("name")

    def plot(self, level: float = 0.95, parm=None):
        """zeta against each parameter (lme4's ``xyplot(profile)``), interval marked."""
        import matplotlib.pyplot as plt

        names = check_parm(parm, list(self._specs))
        ci = self.confint(level)
        zq = float(sst.norm.ppf(0.5 + level / 2))
        ncol = min(3, len(names))
        nrow = math.ceil(len(names) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.8 * nrow), squeeze=False)
        for ax, name in zip(axes.flat, names):
            tab = self.table[self.table["parameter"] == name].sort_values("value")
            ax.plot(tab["value"], tab["zeta"], "-", color="C0")
            ax.plot(tab["value"], tab["zeta"], ".", color="C0", ms=3)
            for z in (-zq, zq):
                ax.axhline(z, color="0.6", lw=0.8, ls="--")
            for v in ci.loc[name, ["lower", "upper"]]:
                if np.isfinite(v):
                    ax.axvline(v, color="C3", lw=0.8)
            ax.axhline(0, color="0.8", lw=0.5)
            ax.set_title(name, fontsize=9)
            ax.set_ylabel("zeta")
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        fig.tight_layout()
        return fig

    def __repr__(self):
        return f"Profile({len(self._specs)} parameters, {len(self.table)} points, criterion={self.criterion})"


def _local_cubic(z, s, target):
    """s at zeta = target by the polynomial through the (up to) six points around it
    (three each side): a spline over the whole curve can swing far off where zeta is
    flat (near a variance at 0), a local interpolant cannot."""
    i = int(np.searchsorted(z, target))
    lo, hi = max(0, i - 3), min(len(z), i + 3)
    zz, ss = z[lo:hi], s[lo:hi]
    return float(interp.BarycentricInterpolator(zz - target, ss)(0.0))


def _ml_fit(fit, criterion):
    crit = str(criterion).upper()
    if crit not in ("ML", "REML"):
        raise ValueError(f"criterion must be 'ML' or 'REML', got {criterion!r}")
    if crit == "REML" and not fit.reml:
        raise ValueError("criterion='REML' needs a fit with reml=True")
    if fit.reml and crit == "ML":
        # lme4 profiles the deviance (ML) of a REML fit; refit by ML for its optimum
        from ..formula._api import glmm

        return glmm(**{**fit.call, "reml": False}), "ML"
    return fit, crit


def profile(fit, parm=None, criterion="ML", batch_size=None, progress=True,
            options: BFGSOptions | None = None, vectorize: bool | None = None):
    """Likelihood profiles of ``fit``'s parameters (lme4's ``profile``), batched.

    ``parm``: names as in ``fit.confint`` (default all). ``criterion``: "ML" (as
    lme4, also for REML fits, which are refit by ML first) or "REML" (variance
    parameters of a REML fit on its own criterion). ``batch_size``: profile points
    per compiled batch (default: `CPU_BATCH` points run one at a time on the CPU;
    elsewhere the first grid of every parameter, vectorized). ``vectorize``: run
    a batch's points together with `jax.vmap` (True) or one at a time in one
    program (False); default True on a GPU, False on the CPU. Returns a
    `Profile`; its ``estimate`` is the profiled fit's (ML for a REML fit).
    """
    from tqdm.auto import tqdm

    pfit, crit = _ml_fit(fit, criterion)
    names, _ = named_parameters(pfit)
    wanted = check_parm(parm, names)
    specs, skipped = _specs(pfit, set(wanted))
    # one batch size per model (that of the full profile), so a profile of a few
    # parameters reuses the compiled program
    all_specs = specs if set(wanted) == set(names) else _specs(pfit, set(names))[0]
    n_all = len(all_specs)
    for name, why in skipped:
        warnings.warn(f"{name} is not profiled: {why}", RuntimeWarning, stacklevel=2)
    if not specs:
        raise ValueError(f"none of {wanted} can be profiled: " + "; ".join(w for _, w in skipped))
    model = pfit.model
    f0 = pfit._fit
    x_hat, u_hat = np.asarray(f0.x), np.asarray(f0.u)
    V, slope, wald_se = _trace_directions(f0, len(x_hat))
    for sp_ in specs:
        scale = math.sqrt(1.0 + float(np.sum(sp_.w * x_hat ** 2)))
        sp_.s_hat = sp_.s_of(x_hat)
        se = wald_se[sp_.coord] / scale
        if sp_.kind != "beta":
            se = min(se, 1.0) if np.isfinite(se) else 0.5  # theta coordinates: at most 1 on the log scale
        sp_.se = float(se) if np.isfinite(se) and se > 0 else 0.5
    # the points start next to their optimum: plain BFGS, without the Newton polish
    # (2 n extra gradients per point) that a fit from scratch uses for its Hessian
    general = any(sp_.wj is not None for sp_ in all_specs)  # (the same program for any parm)
    group = _group(vectorize)
    solve = _solver(model, options or BFGSOptions(polish=False, max_evals=200), general, group)
    first_grid = n_all * 2 * len(_STEPS)
    batch = batch_size or (CPU_BATCH if group == 1 else first_grid)
    runner = _Runner(solve, model, x_hat, u_hat, float(f0.objective), V, slope, specs, batch, first_grid)
    bar = tqdm(total=_MAX_ROUNDS + 1, desc="profile", disable=not progress, leave=False)
    runner.run([(k, sp_.s_hat + sgn * st * sp_.se) for k, sp_ in enumerate(specs)
                for sgn in (-1, 1) for st in _STEPS])
    bar.update(1)
    for _ in range(_MAX_ROUNDS):
        todo = runner.extensions()
        if not todo:
            break
        runner.run(todo)
        bar.update(1)
    bar.close()
    if runner.better < -1e-6:
        warnings.warn(f"the profile found parameter values with a log-likelihood {-runner.better:.3g} above "
                      "the fit's: the fit had not reached its optimum. Refit (e.g. from other start "
                      "values) before trusting these intervals.", RuntimeWarning, stacklevel=2)
    failed = {sp_.name: sum(not p[4] for p in runner.points[k]) for k, sp_ in enumerate(specs)}
    failed = {k: v for k, v in failed.items() if v}
    if failed:
        warnings.warn(f"some constrained refits of the profile did not converge and were left out "
                      f"({failed}); limits interpolated across the gaps may be inaccurate. A very flat or "
                      "ill-conditioned likelihood (e.g. separation in a binomial model) is the usual "
                      "cause; check fit.diagnose().", RuntimeWarning, stacklevel=2)
    table = runner.table()
    # each parameter's value at the optimum is its g at s_hat (g maps the held
    # coordinate to lme4's scale), so no op-by-op evaluation of the model's reporting
    estimate = {sp_.name: float(np.reshape(sp_.g(sp_.s_hat), -1)[0]) for sp_ in specs}
    return Profile(specs, table, estimate, crit, skipped)


def _or(a, default):
    return default if a is None else a


def _trace_directions(f0, n):
    """Wald covariance V of x (inverse of the fit's Hessian; NaN where singular),
    the profile trace's slopes d x_opt / d x_c = V e_c / V_cc and Wald ses."""
    try:
        H = np.asarray(f0.hessian, float)
        V = np.linalg.inv(0.5 * (H + H.T))
        if not np.all(np.isfinite(V)):
            raise ValueError
    except (np.linalg.LinAlgError, ValueError):
        return np.eye(n), np.zeros((n, n)), np.full(n, np.nan)
    dv = np.diag(V)
    se = np.sqrt(np.where(dv > 0, dv, np.nan))
    slope = V / np.where(dv > 0, dv, np.inf)[None, :]  # column c: the trace of x[c]; 0 where V_cc <= 0
    return V, slope, se


def _conditional_factor(V, c):
    """A square root of the covariance of the other coordinates given x[c] (Gaussian
    approximation), with column c = e_c: the optimizer's preconditioner for points
    holding x[c]."""
    n = V.shape[0]
    rest = np.flatnonzero(np.arange(n) != c)
    L = np.zeros((n, n))
    L[c, c] = 1.0
    if rest.size:
        Vc = V[np.ix_(rest, rest)]
        if V[c, c] > 0:
            Vc = Vc - np.outer(V[rest, c], V[c, rest]) / V[c, c]
        lam, Q = np.linalg.eigh(0.5 * (Vc + Vc.T))
        L[np.ix_(rest, rest)] = Q * np.sqrt(np.clip(lam, 1e-10 * max(lam.max(), 1e-300), None))[None, :]
    return L


class _Runner:
    """Accumulates profile points, runs batches through the compiled solver (one
    fixed batch size, so it compiles once) and proposes extensions."""

    def __init__(self, solve, model, x_hat, u_hat, f_hat, V, slope, specs, batch_size, spare_base):
        self.solve, self.model = solve, model
        self.spare_base = int(spare_base)  # the round size that `extensions` fills up to
        self.factors = [_conditional_factor(V, sp_.coord) for sp_ in specs]
        self.x_hat, self.u_hat, self.f_hat, self.slope = x_hat, u_hat, f_hat, slope
        self.specs = specs
        self.batch = int(batch_size)
        self.points = [[] for _ in specs]  # per spec: (s, f, x, u, ok)
        self.better = 0.0
        for k, sp_ in enumerate(specs):
            self.points[k].append((sp_.s_hat, f_hat, x_hat, u_hat, True))

    def _start(self, k, s):
        sp_ = self.specs[k]
        pts = [p for p in self.points[k] if p[4]]
        near = min(pts, key=lambda p: abs(p[0] - s))
        x0 = np.array(near[2])
        if near[0] == sp_.s_hat:
            # first-order trace of the constrained optimum (lme4's profile starts the same way)
            step = np.clip((s - sp_.s_hat) * self.slope[:, sp_.coord], -3.0, 3.0)
            x0 = x0 + step
        return x0, near[3]

    def run(self, todo):
        for lo in range(0, len(todo), self.batch):
            chunk = todo[lo:lo + self.batch]
            pad = chunk + [chunk[0]] * (self.batch - len(chunk))
            starts = [self._start(k, s) for k, s in pad]
            Z = to_device(np.stack([a for a, _ in starts]))
            U = to_device(np.stack([b for _, b in starts]))
            C = to_device([self.specs[k].coord for k, _ in pad], np.int32)
            S = to_device([s for _, s in pad], float)
            W = to_device(np.stack([self.specs[k].w for k, _ in pad]))
            n = W.shape[1]
            WJ = to_device(np.stack([_or(self.specs[k].wj, np.zeros(n)) for k, _ in pad]))
            PA = to_device(np.stack([_or(self.specs[k].pairs, np.zeros((n, n))) for k, _ in pad]))
            L = to_device(np.stack([self.factors[k] for k, _ in pad]))
            LIVE = to_device(np.arange(self.batch) < len(chunk))
            x, u, f, status = (np.asarray(a) for a in self.solve(Z, U, C, S, W, WJ, PA, L, LIVE, self.model.data))
            for i, (k, s) in enumerate(chunk):
                ok = bool(np.isfinite(f[i])) and int(status[i]) in (0, 2)
                self.points[k].append((s, float(f[i]), x[i], u[i], ok))
                if ok:
                    self.better = min(self.better, float(f[i]) - self.f_hat)

    def _zeta(self, k):
        sp_ = self.specs[k]
        pts = [p for p in self.points[k] if p[4]]
        s = np.array([p[0] for p in pts])
        dev = np.maximum(2 * (np.array([p[1] for p in pts]) - self.f_hat), 0.0)
        return s, np.sign(s - sp_.s_hat) * np.sqrt(dev)

    def extensions(self):
        """Points for the next batch: refinements where the sampled curve is coarse,
        and extensions of the sides that have not reached the target. Up to the
        size of the first round, spare slots carry extra points further out (spaced
        geometrically): a side whose zeta creeps towards an asymptote (a
        correlation near +/-1, a variance near 0) is settled in one or two rounds."""
        refine, sides = [], []
        for k, sp_ in enumerate(self.specs):
            s, z = self._zeta(k)
            failed = [p[0] for p in self.points[k] if not p[4]]
            for side in (-1, 1):
                on = side * (s - sp_.s_hat) > 0
                if np.any(side * z[on] >= _ZETA_TARGET):
                    refine += self._refine(k, s, z, side)
                    continue
                far = sp_.s_hat + side * np.max(np.abs(s[on] - sp_.s_hat), initial=0.0)
                if self._at_bound(sp_, far, side):
                    continue
                dist = abs(far - sp_.s_hat)
                bad = [q for q in failed if side * (q - far) > 0]
                if bad:  # the refit failed beyond the last good point: approach it in smaller steps
                    sides.append((k, side, far, 0.5 * min(abs(q - far) for q in bad) / 4.0, False))
                    continue
                zf = abs(z[np.argmin(np.abs(s - far))]) if on.any() else 0.0
                # zeta grows roughly linearly with s: aim past the target, at most doubling
                grow = (_ZETA_TARGET + 0.5) / max(zf, 1e-3) * dist - dist
                sides.append((k, side, far, min(max(grow, 0.5 * sp_.se), max(dist, sp_.se) * 2.0) / 4.0, True))
        todo = list(refine)
        spare = max(0, self.spare_base - len(refine) - 4 * len(sides))
        for k, side, far, step, wide in sides:
            todo += [(k, far + side * step * i) for i in range(1, 5)]
            extra = min(spare // len(sides), _MAX_EXTRA) if wide else 0
            todo += [(k, far + side * step * 4 * 1.5 ** j) for j in range(1, extra + 1)
                     if not self._at_bound(self.specs[k], far + side * step * 4 * 1.5 ** (j - 1), side)]
        return todo

    def _refine(self, k, s, z, side):
        """Points between neighbours whose zeta differ by more than _DZETA (up to the
        target): the limits are interpolated, so the curve must be sampled densely
        where it crosses the cutoffs (an extension may have taken big steps)."""
        on = np.flatnonzero(side * (s - self.specs[k].s_hat) >= 0)
        order = on[np.argsort(side * s[on])]
        todo = []
        for a, b in itertools.pairwise(order):
            if side * z[a] >= _ZETA_TARGET:
                break
            if abs(z[b] - z[a]) > _DZETA:
                todo += [(k, s[a] + (s[b] - s[a]) * f) for f in (0.25, 0.5, 0.75)]
        return todo

    @staticmethod
    def _at_bound(sp_, far, side):
        if sp_.kind == "sd" and side < 0:
            return far < sp_.s_hat - 30 or far < -30
        if sp_.kind == "cor":
            return abs(float(sp_.g(far).reshape(-1)[0])) > 1 - 1e-6
        return False

    def table(self):
        rows = []
        for k, sp_ in enumerate(self.specs):
            s, z = self._zeta(k)
            # zeta's sign follows the parameter's scale (sigma may decrease in s)
            v = sp_.g(s).reshape(-1)
            direction = np.sign(float(sp_.g(sp_.s_hat + 1e-3).reshape(-1)[0]) -
                                float(sp_.g(sp_.s_hat - 1e-3).reshape(-1)[0])) or 1.0
            for si, zi, vi in zip(s, z, v):
                rows.append((sp_.name, float(vi), float(zi * direction), float(si), float(zi)))
        tab = pd.DataFrame(rows, columns=["parameter", "value", "zeta", "s", "zeta_s"])
        return tab.drop_duplicates(["parameter", "s"]).sort_values(["parameter", "s"]).reset_index(drop=True)
