"""Denominator degrees of freedom for linear mixed models (lmerTest, pbkrtest, nlme).

Everything here works on the marginal covariance of a Gaussian LMM,

    V(theta, sigma) = Z D(theta) Z' + sigma^2 W^-1,    D = blockdiag_t(I_m (x) T_t T_t'),

(``T_t`` the covariance structure's factor, ``W`` the prior weights) through
the Woodbury identity in the space of the q random effects: with
``A = Z Tb`` (``Tb = blockdiag(I_m (x) T_t)``) and ``M = sigma^2 I_q + A'A``,

    V^-1 = sigma^-2 (I - A M^-1 A'),   log|V| = (N - q) log sigma^2 + log|M|.

Only the cross-products ``[X Z]'[X Z]`` and ``[X Z]'y`` (computed once, sparse
in N) enter, so the cost is O(q^3) in the number of random effects and never
an N x N matrix: fine for q up to a few thousand.

- Satterthwaite (lmerTest): the Hessian of the REML (or ML) deviance in the
  variance parameters and the Jacobian of ``Cov(beta)`` come from jax; the df
  is invariant to how the variance parameters are written at the optimum, so
  the template's ``theta`` and ``log sigma^2`` stand in for lme4's
  ``(theta, sigma)``.
- Kenward-Roger (pbkrtest's ``vcovAdj``/``Lb_ddf``/``KRmodcomp``): the linear
  parametrization ``V = sum_i sigma_i G_i`` (every variance and covariance of
  each term, then the residual variance), with ``G_i = Z E_i Z'`` handled by
  index arithmetic on q-space matrices.
- "containment": nlme's level counting (``getFixDF``), nested groupings only.
"""

from __future__ import annotations

import itertools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sps
import scipy.stats as sst

DDF_METHODS = ("satterthwaite", "kenward-roger", "containment")
_ALIASES = {"satterthwaite": "satterthwaite", "kenward-roger": "kenward-roger", "kenwardroger": "kenward-roger",
            "kr": "kenward-roger", "kenward_roger": "kenward-roger", "containment": "containment",
            "lme4": "containment", "nlme": "containment", "between-within": "containment"}


def normalize_ddf(ddf: str) -> str:
    key = str(ddf).lower().replace(" ", "")
    if key not in _ALIASES:
        raise ValueError(f"ddf must be one of {', '.join(DDF_METHODS)}, got {ddf!r}.")
    return _ALIASES[key]


def check_lmm(fit, what: str = "ddf") -> None:
    """Raise unless ``fit`` is a Gaussian identity-link LMM with dispformula ~1 and no zero-inflation."""
    fam = fit.family
    design = fit.design
    if fam.name != "gaussian" or getattr(fam, "link", None) is None or fam.link.name != "identity":
        raise ValueError(f"{what} applies to linear mixed models (gaussian family, identity link); this fit is "
                         f"{fam.name}. For a GLMM use Wald z tests (coef_table(), anova()) or a parametric "
                         "bootstrap (tmbx.pb_test, fit.bootstrap).")
    if "zi" in design.components:
        raise ValueError(f"{what} applies to linear mixed models without zero-inflation.")
    disp = design.components["disp"]
    if not disp.intercept_only:
        raise ValueError(f"{what} needs a constant residual variance (dispformula ~1); this fit has "
                         f"dispformula {disp.formula!r}. Use Wald z tests or a parametric bootstrap instead.")
    if fit.call.get("map"):
        raise ValueError(f"{what} is not available for fits with map= (parameters held fixed).")
    if fit.template.prior_nll is not None:
        raise ValueError(f"{what} is not defined for fits with priors (a penalized fit).")


class LmmAlgebra:
    """Cross-products of a Gaussian LMM and its REML/ML deviance as jax functions of
    ``phi = (theta of the conditional terms, log sigma^2)``.

    ``XX, ZX, ZZ``: blocks of ``[X Z]'[X Z]`` (rows scaled by sqrt(weights));
    ``Xy, Zy, yy``: products with the response less its offset; ``terms``: the
    template's conditional random-effect terms (``b`` layout: level-major, k per level).
    """

    def __init__(self, fit):
        check_lmm(fit)
        self.fit = fit
        design = fit.design
        comp = design.components["cond"]
        w = np.asarray(design.weights, float)
        if np.any(w <= 0):
            raise ValueError("ddf: prior weights must be positive (drop rows with weight 0).")
        sw = np.sqrt(w)
        X = comp.X * sw[:, None]
        y = (np.asarray(design.y, float) - comp.offset) * sw
        self.terms = [t for t in fit.template.terms if t.component == "cond"]
        n = X.shape[0]
        q = sum(t.m * t.k for t in self.terms)
        rows, cols, vals = [], [], []
        for t, re in zip(self.terms, comp.re):
            idx = np.asarray(re.index, np.int64)
            for j in range(t.k):
                rows.append(np.arange(n))
                cols.append(t.b_slice.start + idx * t.k + j)
                vals.append(re.Z[:, j] * sw)
        Z = sps.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, q)) \
            if q else sps.csr_matrix((n, 0))
        self.N, self.p, self.q = n, X.shape[1], q
        # passed to jitted functions as arguments, not baked in as constants (faster compiles)
        self.arrays = {"XX": jnp.asarray(X.T @ X), "ZX": jnp.asarray(np.asarray(Z.T @ X)),
                       "ZZ": jnp.asarray((Z.T @ Z).toarray()), "Xy": jnp.asarray(X.T @ y),
                       "Zy": jnp.asarray(Z.T @ y), "yy": jnp.asarray(float(y @ y))}
        self.sum_log_w = float(np.sum(np.log(w)))
        p = fit._par()
        theta = np.asarray(p.get("theta", np.zeros(0)), float)
        self.phi_hat = jnp.asarray(np.concatenate([theta, [float(p["betadisp"][0])]]))
        self.n_theta = theta.shape[0]

    # ----------------------------------------------------------- building blocks
    def factors(self, phi):
        return [t.struct.factor(phi[t.theta_slice]) for t in self.terms]

    def tb_t(self, Ts, Mat):
        """Tb' @ Mat for a (q, n) matrix: per level, T_t' applied to its k rows."""
        out = []
        for t, T in zip(self.terms, Ts):
            blk = Mat[t.b_slice].reshape(t.m, t.k, -1)
            out.append(jnp.einsum("jc,mjn->mcn", T, blk).reshape(t.m * t.k, -1))
        return jnp.concatenate(out, axis=0) if out else Mat

    def pieces(self, phi, a=None):
        """(s2, K = Tb M^-1 Tb', log|M|): the Woodbury pieces of V^-1 at phi (for
        Kenward-Roger, evaluated once; q x q dense)."""
        a = self.arrays if a is None else a
        s2 = jnp.exp(phi[-1])
        Ts = self.factors(phi)
        TZZT = self.tb_t(Ts, self.tb_t(Ts, a["ZZ"]).T)
        M = s2 * jnp.eye(self.q) + 0.5 * (TZZT + TZZT.T)
        cf = jax.scipy.linalg.cho_factor(M, lower=True)
        Tb = self.tb_t(Ts, jnp.eye(self.q)).T
        K = Tb @ jax.scipy.linalg.cho_solve(cf, Tb.T)
        logdetM = 2.0 * jnp.sum(jnp.log(jnp.diag(cf[0])))
        return s2, K, logdetM

    def gls(self, phi, a=None):
        """(X'V^-1X, X'V^-1y, y'V^-1y, log|V|): one q x q Cholesky, Tb applied blockwise
        (never formed), so derivatives by jax stay at a few q^3 operations."""
        a = self.arrays if a is None else a
        s2 = jnp.exp(phi[-1])
        Ts = self.factors(phi)
        TZZT = self.tb_t(Ts, self.tb_t(Ts, a["ZZ"]).T)
        cf = jax.scipy.linalg.cho_factor(s2 * jnp.eye(self.q) + 0.5 * (TZZT + TZZT.T), lower=True)
        W = self.tb_t(Ts, jnp.concatenate([a["ZX"], a["Zy"][:, None]], axis=1))  # Tb'Z'[X y]
        WMW = W.T @ jax.scipy.linalg.cho_solve(cf, W)
        p = self.p
        XVX = (a["XX"] - WMW[:p, :p]) / s2
        XVy = (a["Xy"] - WMW[:p, p]) / s2
        yVy = (a["yy"] - WMW[p, p]) / s2
        logdetM = 2.0 * jnp.sum(jnp.log(jnp.diag(cf[0])))
        logdetV = (self.N - self.q) * jnp.log(s2) + logdetM - self.sum_log_w
        return 0.5 * (XVX + XVX.T), XVy, yVy, logdetV

    def deviance(self, phi, reml: bool, a=None):
        """-2 log-likelihood, beta profiled out (ML) or integrated out (REML)."""
        XVX, XVy, yVy, logdetV = self.gls(phi, a)
        cf = jax.scipy.linalg.cho_factor(XVX, lower=True)
        rVr = yVy - XVy @ jax.scipy.linalg.cho_solve(cf, XVy)
        dev = logdetV + rVr + (self.N - (self.p if reml else 0)) * math.log(2 * math.pi)
        if reml:
            dev = dev + 2.0 * jnp.sum(jnp.log(jnp.diag(cf[0])))
        return dev

    def vcov_beta(self, phi, a=None):
        """Cov(beta-hat | phi) = (X'V^-1X)^-1."""
        return jnp.linalg.inv(self.gls(phi, a)[0])

    def beta(self, phi):
        XVX, XVy, _, _ = self.gls(phi)
        return jnp.linalg.solve(XVX, XVy)


# --------------------------------------------------------------------------- Satterthwaite

class Satterthwaite:
    """lmerTest's Satterthwaite approximation (``contest1D``/``contestMD``) for a fit."""

    def __init__(self, alg: LmmAlgebra):
        self.alg = alg
        phi = alg.phi_hat
        reml = bool(alg.fit.reml)
        a = alg.arrays
        H = np.asarray(jax.jit(jax.hessian(lambda f, a: alg.deviance(f, reml, a)))(phi, a))
        H = 0.5 * (H + H.T)
        ev = np.linalg.eigvalsh(H)
        if not np.all(np.isfinite(ev)) or ev.min() <= 1e-8 * max(abs(ev).max(), 1.0):
            warnings.warn("Satterthwaite df: the Hessian of the deviance in the variance parameters is not "
                          "positive definite (a variance at or near zero, a singular fit?); using its "
                          "pseudo-inverse. Simplify the random effects or use ddf='kenward-roger'.",
                          stacklevel=4)
            self.A = 2.0 * np.linalg.pinv(H)
        else:
            self.A = 2.0 * np.linalg.inv(H)
        self.vcov = np.asarray(alg.vcov_beta(phi))
        self.jac = np.asarray(jax.jit(jax.jacfwd(alg.vcov_beta))(phi, a))  # (p, p, n_phi)
        self.beta = np.asarray(alg.beta(phi))

    def df1(self, l) -> tuple[float, float]:
        """(variance of l'beta, its Satterthwaite df)."""
        l = np.asarray(l, float)
        var = float(l @ self.vcov @ l)
        g = np.einsum("i,ijk,j->k", l, self.jac, l)
        return var, float(2 * var**2 / (g @ self.A @ g))

    def test(self, L, rhs):
        """F test of L beta = rhs: (F, numerator df, denominator df)."""
        L = np.atleast_2d(np.asarray(L, float))
        rhs = np.broadcast_to(np.asarray(rhs, float), (L.shape[0],))
        if L.shape[0] == 1:
            var, df = self.df1(L[0])
            return float((L[0] @ self.beta - rhs[0]) ** 2 / var), 1, df
        d, P = np.linalg.eigh(L @ self.vcov @ L.T)
        order = np.argsort(d)[::-1]
        d, P = d[order], P[:, order]
        qr = int(np.sum(d > max(np.sqrt(np.finfo(float).eps) * d[0], 0)))
        PtL = P.T[:qr] @ L
        Ptr = P.T[:qr] @ rhs
        t2 = (PtL @ self.beta - Ptr) ** 2 / d[:qr]
        nu = np.array([self.df1(PtL[m])[1] for m in range(qr)])
        return float(t2.sum() / qr), qr, _fstat_ddf(nu)


def _fstat_ddf(nu, tol=1e-8) -> float:
    """lmerTest's get_Fstat_ddf: combine the t-test dfs of the eigen-directions."""
    nu = np.asarray(nu, float)
    if nu.size == 1:
        return float(nu[0])
    if np.all(np.abs(np.diff(nu)) < tol):
        return float(nu.mean())
    if np.any(nu <= 2):
        return 2.0
    E = np.sum(nu / (nu - 2))
    return float(2 * E / (E - nu.size))


# --------------------------------------------------------------------------- Kenward-Roger

class KenwardRoger:
    """pbkrtest's ``vcovAdj`` (adjusted Cov(beta)), ``Lb_ddf`` and ``KRmodcomp`` for a REML fit.

    ``V = sum_i s_i G_i``: for each conditional term and each r >= s, the
    covariance D_t[r, s] with ``G = Z (I_m (x) (e_r e_s' + e_s e_r')) Z'``
    (``e_r e_r'`` on the diagonal), then the residual variance with ``G = I``.
    """

    def __init__(self, alg: LmmAlgebra):
        if not alg.fit.reml:
            raise ValueError("Kenward-Roger needs a REML fit (pbkrtest requires REML): refit with reml=True, "
                             "or use ddf='satterthwaite', which works on ML fits too.")
        self.alg = alg
        phi = alg.phi_hat
        s2, K, _ = alg.pieces(phi)
        s2, K = float(s2), np.asarray(K)
        G, ZX, XX = (np.asarray(alg.arrays[k]) for k in ("ZZ", "ZX", "XX"))
        KG, KZX = K @ G, K @ ZX
        # V^-1 = (I - Z K Z') / s2, so products of V^-k with X and Z stay in q-space
        S = (G - G @ KG) / s2                                         # Z'V^-1Z
        R = (ZX - G @ KZX) / s2                                       # Z'V^-1X
        Z2X = (ZX - 2 * G @ KZX + G @ KG @ KZX) / s2**2               # Z'V^-2X
        Z2Z = (G - 2 * G @ KG + G @ KG @ KG) / s2**2                  # Z'V^-2Z
        X2X = (XX - 2 * ZX.T @ KZX + KZX.T @ G @ KZX) / s2**2         # X'V^-2X
        X3X = (XX - 3 * ZX.T @ KZX + 3 * KZX.T @ G @ KZX - KZX.T @ G @ KG @ KZX) / s2**3
        trV2 = (alg.N - 2 * np.trace(KG) + np.sum(KG * KG.T)) / s2**2
        Phi = np.asarray(alg.vcov_beta(phi))
        bad = [f"{t.struct.name}(...|{t.group})" for t in alg.terms if t.struct.name not in ("us", "diag")
               and not (t.k == 1 and t.struct.name in ("homdiag", "cs", "homcs"))]
        if bad:
            raise ValueError(f"Kenward-Roger (pbkrtest) covers unstructured and diagonal random-effect terms, "
                             f"as lme4 fits them; this fit has {bad}. Use ddf='satterthwaite'.")
        # pbkrtest's parameters: each variance, and each covariance of an unstructured term
        Es = [(t, r, s) for t in alg.terms for r in range(t.k) for s in range(r + 1)
              if r == s or t.struct.name == "us"]
        n_g = len(Es) + 1
        def E(i, Mat):
            return _apply_E(Es[i], Mat)

        ER = [E(i, R) for i in range(len(Es))]
        ES = [E(i, S) for i in range(len(Es))]
        P = [-R.T @ er for er in ER] + [-X2X]
        Q = np.empty((n_g, n_g), object)
        Kt = np.empty((n_g, n_g))
        last = n_g - 1
        for i in range(len(Es)):
            for j in range(len(Es)):
                Q[i, j] = ER[i].T @ S @ ER[j]
                Kt[i, j] = np.sum(ES[i] * ES[j].T)
            Q[i, last] = ER[i].T @ Z2X
            Q[last, i] = Q[i, last].T
            Kt[i, last] = Kt[last, i] = np.trace(E(i, Z2Z))
        Q[last, last] = X3X
        Kt[last, last] = trV2
        IE2 = np.empty((n_g, n_g))
        for i in range(n_g):
            for j in range(n_g):
                IE2[i, j] = Kt[i, j] - 2 * np.sum(Phi * Q[i, j]) + np.sum((Phi @ P[i]) * (P[j] @ Phi))
        IE2 = 0.5 * (IE2 + IE2.T)
        W = 2 * (np.linalg.inv(IE2) if np.min(np.abs(np.linalg.eigvalsh(IE2))) > 1e-10 else np.linalg.pinv(IE2))
        U = sum(W[i, j] * (0.5 * (Q[i, j] + Q[j, i]) - P[i] @ Phi @ P[j]) for i in range(n_g) for j in range(n_g))
        self.Phi, self.P, self.W = Phi, P, W
        self.PhiA = Phi + 2 * Phi @ U @ Phi
        self.beta = np.asarray(alg.beta(phi))

    def _a12(self, L):
        L = np.atleast_2d(L)
        Theta = L.T @ np.linalg.solve(L @ self.Phi @ L.T, L)
        u = [Theta @ self.Phi @ Pi @ self.Phi for Pi in self.P]
        tr = np.array([np.trace(x) for x in u])
        A1 = float(tr @ self.W @ tr)
        A2 = float(sum(self.W[i, j] * np.sum(u[i] * u[j].T) for i in range(len(u)) for j in range(len(u))))
        return A1, A2

    def ddf(self, L) -> tuple[float, float]:
        """(denominator df, F scaling) of pbkrtest's Lb_ddf / .KR_adjust."""
        L = np.atleast_2d(np.asarray(L, float))
        q = np.linalg.matrix_rank(L)
        A1, A2 = self._a12(L)
        B = (A1 + 6 * A2) / (2 * q)
        g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
        den = 3 * q + 2 * (1 - g)
        c1, c2, c3 = g / den, (q - g) / den, (q + 2 - g) / den
        V0, V1, V2 = 1 + c1 * B, 1 - c2 * B, 1 - c3 * B
        V0 = 0.0 if abs(V0) < 1e-10 else V0
        rho = (1 / q) * (_div0(1 - A2 / q, V1)) ** 2 * V0 / V2
        df2 = 4 + (q + 2) / (q * rho - 1)
        scaling = 1.0 if abs(df2 - 2) < 1e-2 else df2 * (1 - A2 / q) / (df2 - 2)
        return float(df2), float(scaling)

    def df1(self, l) -> tuple[float, float]:
        l = np.asarray(l, float)
        return float(l @ self.PhiA @ l), self.ddf(l)[0]

    def test(self, L, rhs, scale: bool = True):
        """(F, ndf, ddf) with the adjusted covariance, F scaled as pbkrtest and lmerTest's
        contest do (``scale=False``: the unscaled Wald F)."""
        L = np.atleast_2d(np.asarray(L, float))
        rhs = np.broadcast_to(np.asarray(rhs, float), (L.shape[0],))
        q = int(np.linalg.matrix_rank(L))
        diff = L @ self.beta - rhs
        F = float(diff @ np.linalg.lstsq(L @ self.PhiA @ L.T, diff, rcond=None)[0]) / q
        df2, scaling = self.ddf(L)
        return (F * scaling if scale else F), q, df2


def _div0(x, y, tol=1e-14):
    return 0.0 if abs(y) < tol else x / y


def _apply_E(e, Mat):
    """(I_m (x) E_rs) @ Mat, embedded in the q rows of term t."""
    t, r, s = e
    out = np.zeros_like(Mat)
    base = t.b_slice.start + np.arange(t.m) * t.k
    out[base + r] += Mat[base + s]
    if r != s:
        out[base + s] += Mat[base + r]
    return out


# --------------------------------------------------------------------------- containment (nlme)

class Containment:
    """nlme's ``getFixDF``: df by the grouping level at which each column varies.

    Strata (outer to inner) are the nested grouping factors, then the
    residual; stratum df = levels(here) - levels(outer), less one for every
    column estimated in it (the intercept in the outermost). A column belongs
    to the innermost stratum whose parent groups it varies within; the
    intercept is given the largest stratum df, as nlme does.
    """

    def __init__(self, fit):
        check_lmm(fit)
        comp = fit.design.components["cond"]
        X = comp.X
        groups = {}  # one entry per distinct grouping, e.g. (1|g) + (0 + x|g) counts g once
        for term in comp.re:
            key = term.group.split(".")[0]
            groups.setdefault(key, np.asarray(term.index))
        order = sorted(groups, key=lambda g: len(np.unique(groups[g])))
        codes = [groups[g] for g in order]
        for outer, inner in itertools.pairwise(codes):
            pairs = np.unique(np.stack([inner, outer], 1), axis=0)
            if len(np.unique(pairs[:, 0])) != len(pairs):
                raise ValueError("ddf='containment' (nlme's level counting) needs nested grouping factors; "
                                 f"{order} are crossed. Use ddf='satterthwaite' or 'kenward-roger'.")
        n = X.shape[0]
        ngr = [len(np.unique(c)) for c in codes] + [n]
        dfs = np.array(ngr) - np.array([0] + ngr[:-1])
        parents = [np.zeros(n, int)] + codes  # stratum j's columns vary within the groups of parents[j]
        is_const = np.all(np.abs(X - X[:1]) <= 1e-10 * np.maximum(np.abs(X[:1]), 1), axis=0)
        strat = np.zeros(X.shape[1], int)
        for c in range(X.shape[1]):
            if is_const[c]:
                continue
            for j in range(len(parents) - 1, -1, -1):
                if _varies_within(X[:, c], parents[j]):
                    strat[c] = j
                    break
        intercept = is_const & np.any(X != 0, axis=0)
        for c in range(X.shape[1]):
            dfs[strat[c]] -= 1
        self.df = np.where(intercept, dfs.max(), dfs[strat]).astype(float)
        self.strata = order + ["Residual"]


def _varies_within(x, g):
    s = pd.Series(x).groupby(g)
    return bool(np.any((s.max() - s.min()).to_numpy() > 1e-10 * max(np.abs(x).max(), 1)))


# --------------------------------------------------------------------------- entry points

def ddf_engine(fit, ddf: str):
    """The (cached) df machinery of ``fit`` for one method."""
    method = normalize_ddf(ddf)
    check_lmm(fit, what=f"ddf={ddf!r}")
    cache = fit.__dict__.setdefault("_ddf_cache", {})
    if method not in cache:
        if method == "containment":
            cache[method] = Containment(fit)
        else:
            alg = cache.get("_alg") or LmmAlgebra(fit)
            cache["_alg"] = alg
            cache[method] = Satterthwaite(alg) if method == "satterthwaite" else KenwardRoger(alg)
    return cache[method]


def coef_table_ddf(fit, component="cond", ddf="satterthwaite") -> pd.DataFrame:
    """lmerTest's ``summary(fit, ddf=)`` table: Estimate, Std. Error, df, t value, Pr(>|t|)."""
    if component != "cond":
        raise ValueError(f"ddf applies to the conditional model's fixed effects, not component={component!r}.")
    eng = ddf_engine(fit, ddf)
    names = fit.template.names["beta"]
    if isinstance(eng, Containment):
        est = fit.fixef["cond"].to_numpy()
        se = fit.se()["cond"].to_numpy()
        df = eng.df
    else:
        est = eng.beta
        p = len(names)
        rows = [eng.df1(np.eye(p)[i]) for i in range(p)]
        se = np.sqrt([r[0] for r in rows])
        df = np.array([r[1] for r in rows])
    t = est / se
    return pd.DataFrame({"Estimate": est, "Std. Error": se, "df": df, "t value": t,
                         "Pr(>|t|)": 2 * sst.t.sf(np.abs(t), df)}, index=names)


def f_test(fit, L, rhs=0.0, ddf="satterthwaite"):
    """F test of ``L beta = rhs`` with ddf (lmerTest's ``contestMD``): (F, NumDF, DenDF,
    unscaled F); Kenward-Roger's F is scaled as in pbkrtest, the unscaled one gives
    lmerTest's Sum Sq."""
    eng = ddf_engine(fit, ddf)
    L = np.atleast_2d(np.asarray(L, float))
    if isinstance(eng, Containment):
        # nlme: Wald F with the smallest df of the columns involved
        rhs = np.broadcast_to(np.asarray(rhs, float), (L.shape[0],))
        V = fit.vcov()["cond"].to_numpy()
        diff = L @ fit.fixef["cond"].to_numpy() - rhs
        q = int(np.linalg.matrix_rank(L))
        F = float(diff @ np.linalg.lstsq(L @ V @ L.T, diff, rcond=None)[0]) / q
        used = np.any(np.abs(L) > 0, axis=0)
        return F, q, float(eng.df[used].min()), F
    if isinstance(eng, KenwardRoger):
        return (*eng.test(L, rhs), eng.test(L, rhs, scale=False)[0])
    return (*eng.test(L, rhs), eng.test(L, rhs)[0])


def kr_test(fit0, fit1, **kwargs) -> dict:
    """Kenward-Roger F test of nested LMMs (pbkrtest's ``KRmodcomp``): dict F, ndf, ddf,
    F_scaling, p. The larger model must be a REML fit; the smaller one only supplies
    its fixed-effect columns (their span must lie in the larger model's)."""
    if kwargs:
        raise TypeError(f"kr_test got unexpected arguments {sorted(kwargs)}.")
    X0, X1 = fit0.design.components["cond"].X, fit1.design.components["cond"].X
    if X0.shape[1] > X1.shape[1]:
        fit0, fit1, X0, X1 = fit1, fit0, X1, X0
    if X0.shape[0] != X1.shape[0] or not np.allclose(fit0.design.y, fit1.design.y):
        raise ValueError("kr_test: the two fits are to different data (rows or response differ); "
                         "fit both models to the same data.")
    L = _restriction(X0, X1)
    if L.shape[0] == 0:
        raise ValueError("kr_test: the models have the same fixed effects; nothing to test.")
    kr = ddf_engine(fit1, "kenward-roger")
    F, ndf, ddf = kr.test(L, 0.0)
    _, scaling = kr.ddf(L)
    return {"F": F, "ndf": ndf, "ddf": ddf, "F_scaling": scaling, "p": float(sst.f.sf(F, ndf, ddf))}


def _restriction(X0, X1, tol=1e-8) -> np.ndarray:
    """Rows L with L beta1 = 0 <=> X1 beta1 in span(X0); error if X0 is not nested in X1."""
    Q0, _ = np.linalg.qr(X0)
    resid0 = X0 - X1 @ np.linalg.lstsq(X1, X0, rcond=None)[0]
    if np.linalg.norm(resid0) > tol * max(np.linalg.norm(X0), 1):
        raise ValueError("kr_test: the smaller model's fixed effects are not nested in the larger one's.")
    R = X1 - Q0 @ (Q0.T @ X1)
    _, s, Vt = np.linalg.svd(R, full_matrices=False)
    return Vt[s > tol * max(s.max(), 1)] if s.size else np.zeros((0, X1.shape[1]))
