"""Linear mixed models by penalized least squares on cross-products (lme4's method).

For a Gaussian response with the identity link and one dispersion for all
rows, the Laplace approximation is exact and everything it needs is a
function of the weighted cross-products ``Z'WZ, Z'WX, X'WX, Z'Wy, X'Wy, y'Wy``,
computed once from the rows. An evaluation then costs one sparse
factorization of a ``q x q`` matrix, whatever the number of rows, and the
fixed effects are profiled out (solved for exactly) rather than searched for.
This is the algorithm of lme4 and MixedModels.jl (Bates et al. 2015,
"Fitting linear mixed-effects models using lme4", section 3), written in the
template's own parameters so that the optimum, the log-likelihood and the
Hessian are those of the general Laplace path (and of glmmTMB).

With the template's spherical random effects ``b_t = T_t(theta) u_t`` the
model is ``y = X beta + Z Lambda u + e``, ``u ~ N(0, I)``,
``e ~ N(0, sigma^2 W^-1)`` with ``sigma^2 = exp(d)`` (glmmTMB's gaussian
``betadisp``) and ``W`` the prior weights (glmmTMB multiplies each row's log
density by its weight). With

    H = Lambda' Z'WZ Lambda + sigma^2 I         (the latent Hessian times sigma^2)
    R = Lambda' [Z'WX | Z'Wy],   G = H^-1 R,    S = X'WX - R_X' G_X

the conditional modes at given ``beta`` are ``u = G_y - G_X beta``, the
penalized residual sum of squares is
``r2(beta) = e'We - (R_y - R_X beta)' u`` with ``e = y - X beta``, and

    -loglik      = sum(w)/2 (d + log 2pi) + r2 / (2 sigma^2) + 1/2 log|H| - q/2 d
    -loglik_REML = the same at beta_hat + 1/2 log|S| - p/2 d - p/2 log 2pi

(``beta_hat = S^-1 (X'Wy - R_X' G_y)``). The first is the general path's
Laplace marginal at any ``(beta, d, theta)``; the second is its REML marginal
(``beta`` integrated). When every covariance structure scales with its log
standard deviations (all but ``rr``), sigma is profiled out too: the
optimizer searches over theta with its sds relative to sigma (lme4's
parameterization, `profiled_rel`); otherwise over ``(theta, d)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sps

from .._config import lmm_compile_options
from .._optim import BFGSOptions, bfgs
from .._internal import eval_method, to_device, unique_sorted
from .._sparse import choose_layout, for_logdet, large_arrays, with_arrays

LOG_2PI = math.log(2 * math.pi)


def lmm_applicable(template, *, map=None, priors=None, nagq=1) -> bool:
    """Whether `ProfiledLMM` fits this template: Gaussian, identity link, no
    zero-inflation, a dispersion model ``~1`` without offset, at least one
    random-effect term, no ``map``, no priors, Laplace (``nagq=1``)."""
    fam, design = template.family, template.design
    if fam.name != "gaussian" or fam.link.name != "identity" or "zi" in design.components:
        return False
    if map or priors is not None or nagq != 1 or template.prior_nll is not None:
        return False
    disp = design.components["disp"]
    if not disp.intercept_only:
        return False
    sp = template.model.space
    if "b" not in sp.names or not template.terms or "theta" not in sp.names:
        return False
    if any(t.struct.name == "rr" for t in template.terms):
        return False  # a reduced-rank factor is singular: the log|H| derivative needs T^-1
    return all(np.all(sp.index[k] >= 0) for k in sp.names)


class ProfiledLMM:
    """Fit a Gaussian LMM template by profiled penalized least squares.

    ``fit()`` returns the engine's result dict (``x, u, f, g, status,
    iterations, hessian`` in the template's parameter space), so the
    `tmbx.Fit` built from it behaves as one from `Model.fit`.
    """

    def __init__(self, template):
        self.template = template
        self.space = template.model.space
        design = template.design
        cond = design.components["cond"]
        terms = [t for t in template.terms if t.component == "cond"]
        self.terms = terms
        self.reml = template.reml
        w = np.asarray(design.weights, float)
        y = np.asarray(design.y, float) - np.asarray(cond.offset, float)
        X = np.asarray(cond.X, float)
        N, p = X.shape
        # work with the weighted least-squares residuals: beta is a free linear
        # parameter, so y -> y - X beta0 only shifts beta_hat by beta0, and y'Wy
        # no longer dwarfs the penalized residual sum of squares it is compared with
        sw = np.sqrt(w)
        self.beta0 = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)[0] if p else np.zeros(0)
        y = y - X @ self.beta0
        q = sum(t.m * t.k for t in terms)
        self.N, self.p, self.q = N, p, q
        kmax = max(t.k for t in terms)
        self.kmax = kmax

        # Z in the b numbering (term t, level i, column a -> b_slice.start + i k + a)
        rows, cols, vals = [], [], []
        for j, t in enumerate(terms):
            idx = np.asarray(cond.re[j].index, np.int64)
            Zt = np.asarray(cond.re[j].Z, float)
            for a in range(t.k):
                rows.append(np.arange(N))
                cols.append(t.b_slice.start + idx * t.k + a)
                vals.append(Zt[:, a])
        Z = sps.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(N, q))
        WZ = Z.multiply(w[:, None]).tocsr()
        # (a sparse product has no duplicates: sorting each row's columns gives the
        # (row, col) order at a fraction of a global sort's cost)
        ZtZ = (Z.T @ WZ).tocsr()
        ZtZ.sort_indices()
        ZtZ = ZtZ.tocoo()
        WX = X * w[:, None]
        ZtXy = np.asarray(WZ.T @ np.column_stack([X, y]))  # (q, p + 1)

        # each b-space row: its term, column a within the term, and the u rows it feeds
        term_of = np.concatenate([np.full(t.m * t.k, j) for j, t in enumerate(terms)])
        col_of = np.concatenate([np.tile(np.arange(t.k), t.m) for t in terms])
        base_of = np.concatenate([t.b_slice.start + np.repeat(np.arange(t.m), t.k) * t.k for t in terms])
        k_of = np.array([t.k for t in terms])[term_of]
        c = np.arange(kmax)
        urow = np.where(c[None, :] < k_of[:, None], base_of[:, None] + c[None, :], q)  # (q, kmax)

        # Z'WZ entry (r, s) spreads over the k_r x k_s block of its two levels
        r, s = ZtZ.row.astype(np.int64), ZtZ.col.astype(np.int64)
        ur = urow[r][:, :, None] + 0 * c[None, None, :]
        us = urow[s][:, None, :] + 0 * c[None, :, None]
        valid = (ur < q) & (us < q)
        diag = np.arange(q)
        pr, pc = np.concatenate([ur[valid], diag]), np.concatenate([us[valid], diag])
        key = unique_sorted(pr * q + pc)
        self.layout = choose_layout(q, key // q, key % q, force=self._layout_hint(terms, q),
                                    solver=template.model.solver)
        size = self.layout.size
        slots = np.full(ur.shape, size, np.int64)
        sl = self.layout.slots(ur[valid], us[valid])
        slots[valid] = np.where(sl >= 0, sl, size)
        pad = np.concatenate([self.layout.padding(), [0.0]])
        # the layout's large index arrays travel as data, not as constants of the
        # compiled program (constants of ~10^7 entries cost seconds of compilation)
        self._traced_attrs = large_arrays(self.layout, getattr(self.layout, "TRACEABLE", ()))

        self.data = dict(
            ZtZ=to_device(ZtZ.data), e_r=to_device(r, np.int32), e_s=to_device(s, np.int32),
            e_term=to_device(term_of[r], np.int32),
            e_col=to_device(col_of[r], np.int32), f_term=to_device(term_of[s], np.int32),
            f_col=to_device(col_of[s], np.int32), slots=to_device(slots, np.int32),
            pad=to_device(pad), diag=to_device(self.layout.diag_slots(), np.int32),
            r_term=to_device(term_of, np.int32), r_col=to_device(col_of, np.int32),
            urow=to_device(urow, np.int32), XtX=to_device(X.T @ WX),
            sw=to_device(float(np.sum(w))), beta0=to_device(self.beta0),
            # response-dependent statistics: replaced by refits' new responses
            ZtXy=to_device(ZtXy), Xty=to_device(WX.T @ y), yty=to_device(float(np.sum(w * y * y))),
            layout={a: to_device(getattr(self.layout, a)) for a in self._traced_attrs},
        )
        # the cross-product of a new response with Z and X (for refits): Z'W and X'W
        self._WZt = WZ.T.tocsr()
        self._WX = WX
        self._w = w
        self._offset = np.asarray(cond.offset, float)
        self._X = X
        self._y = y
        self._compiled = None
        self._compiled_many = {}
        # the k x k diagonal blocks of H^-1 that d log|H| needs (see `_make_core`)
        self._u_term = to_device(term_of, np.int32)
        br, bc, self._blk_slices, off = [], [], [], 0
        for t in terms:
            base = t.b_slice.start + np.arange(t.m)[:, None, None] * t.k
            a_, b_ = np.meshgrid(np.arange(t.k), np.arange(t.k), indexing="ij")
            br.append((base + a_[None]).reshape(-1))
            bc.append((base + b_[None]).reshape(-1))
            self._blk_slices.append(slice(off, off + t.m * t.k * t.k))
            off += t.m * t.k * t.k
        self._blk_rows, self._blk_cols = np.concatenate(br), np.concatenate(bc)
        self._core = self._make_core()
        self.sd_mask = self._log_sd_mask()
        self.relative = self.sd_mask is not None
        self._intercepts = self._intercept_terms() if self.relative else None

    def _options(self, **kw):
        """Optimizer settings ``BFGSOptions(**kw)`` set for the model's cost as
        `Model`'s are (`outer_options`)."""
        from .._model import outer_options

        return outer_options(BFGSOptions(**kw), iterative=self.layout.iterative is not None,
                             large=self.template.model._large)

    def _polish_options(self):
        """The fit's settings: a Newton polish on the finite-difference Hessian,
        which also differences beta (``jac_aux``)."""
        return self._options(polish=True, jac_aux=self.p)

    @staticmethod
    def _layout_hint(terms, q):
        """Arrow layout: the levels of the largest grouping factor (every term on it)
        form the block-diagonal head, the rest the dense tail."""
        big = max(terms, key=lambda t: t.m)
        head = np.concatenate([np.arange(t.b_slice.start, t.b_slice.stop) for t in terms
                               if t.m == big.m and t.levels == big.levels])
        return ("arrow", np.setdiff1d(np.arange(q), head))

    # ------------------------------------------------------------ the criterion
    def _T(self, theta):
        """Every term's factor T_t(theta), zero-padded to (n_terms, kmax, kmax)."""
        out = []
        for t in self.terms:
            T = t.struct.factor(theta[t.theta_slice]).reshape(t.k, t.k)
            out.append(jnp.pad(T, ((0, self.kmax - t.k), (0, self.kmax - t.k))))
        return jnp.stack(out)

    def _log_sd_mask(self):
        """Which theta entries are log standard deviations that scale their term's
        factor (T(theta + c e) = exp(c) T(theta)), or None when some term has none:
        then sigma can be profiled out with the random-effect sds taken relative to
        it (lme4's parameterization); otherwise sigma stays a parameter."""
        nth = self.space.starts["theta"].size
        mask = np.zeros(nth, bool)
        rng = np.random.default_rng(0)
        for t in self.terms:
            names = t.struct.param_names(t.terms)
            m = np.array([n.startswith("log_sd") for n in names])
            if not m.any():
                return None
            th = rng.normal(size=len(names)) * 0.3
            T0, T1 = (eval_method(t.struct, "factor", v) for v in (th, th + 0.37 * m))
            if not np.allclose(T1, math.exp(0.37) * T0, rtol=1e-10, atol=1e-12):
                return None
            mask[t.theta_slice] = m
        return mask

    def _layout(self, D):
        """The layout with its large index arrays taken from ``D`` (see __init__)."""
        if not self._traced_attrs:
            return self.layout
        return with_arrays(self.layout, {a: D["layout"][a] for a in self._traced_attrs})

    def _H(self, T, d, D):
        """The latent Hessian times sigma^2 in the layout's flat storage."""
        a = T[D["e_term"], D["e_col"]]  # (E, kmax): the row of T_s that entry e's row column feeds
        b = T[D["f_term"], D["f_col"]]
        contrib = D["ZtZ"][:, None, None] * a[:, :, None] * b[:, None, :]
        # flat index arrays throughout (see `tmbx._sparse._coupled_to_tail`)
        flat = jnp.zeros(self.layout.size + 1).at[D["slots"].reshape(-1)].add(contrib.reshape(-1)) + D["pad"]
        return flat.at[D["diag"]].add(jnp.exp(d))[:-1]

    def _lam(self, T, V, D):
        """Lambda V: from u (rows urow) to b (the b numbering), V of shape (q, r)."""
        Vp = jnp.concatenate([V, jnp.zeros((1,) + V.shape[1:])])
        Tr = T[D["r_term"], D["r_col"]]  # (q, kmax)
        return jnp.einsum("qc,qcr->qr", Tr, Vp[D["urow"].reshape(-1)].reshape(Tr.shape + V.shape[1:]))

    def _lam_t(self, T, M, D):
        """Lambda' M: from b rows to u rows, M of shape (q, r)."""
        Tr = T[D["r_term"], D["r_col"]]
        upd = (Tr[:, :, None] * M[:, None, :]).reshape(-1, M.shape[1])
        return jnp.zeros((self.q + 1, M.shape[1])).at[D["urow"].reshape(-1)].add(upd)[:-1]

    def _quad(self, B, C, D):
        """B' Z'WZ C over the stored cross-product entries (b numbering)."""
        return jnp.einsum("e,er,es->rs", D["ZtZ"], B[D["e_r"]], C[D["e_s"]])

    def _modes(self, T, d, D):
        """Factor H; log|H|, the conditional modes u and beta_hat,
        G_X = H^-1 Lambda' Z'WX, S and its Cholesky factor L."""
        p = self.p
        F = for_logdet(self._layout(D).factor(self._H(T, d, D)))
        R = self._lam_t(T, D["ZtXy"], D)
        G = F.solve(R)
        S = D["XtX"] - R[:, :p].T @ G[:, :p]
        S = 0.5 * (S + S.T)
        L = jnp.linalg.cholesky(S)
        beta = jax.scipy.linalg.cho_solve((L, True), D["Xty"] - R[:, :p].T @ G[:, p])
        u = G[:, p] - G[:, :p] @ beta
        ok = F.ok().astype(float)
        # F._logdet(), not F.logdet(): the latter's own derivative rule would factor
        # H a second time (`_make_core` supplies the derivative)
        return (F._logdet(), ok, u, beta, G[:, :p], S, L), F

    def _make_core(self):
        """`_modes` with the derivative of log|H| written out, so that nothing is
        differentiated through the factorization (whose reverse mode costs several
        times the factorization itself on crossed designs).

        With H = Lambda' M Lambda + sigma^2 I and Lambda block-diagonal (T_t per
        level), d log|H| = 2 tr((I - sigma^2 H^-1) Lambda^-1 dLambda) + sigma^2
        tr(H^-1) dd: only the k x k diagonal blocks of H^-1 are needed, summed over
        each term's levels (C_t), and the term's coefficient on dT_t is
        2 (C_t T_t^-1)'. The other outputs are modes: no derivative flows through
        them (the envelope theorem, see `profiled`)."""

        @jax.custom_jvp
        def core(T, d, D):
            return self._modes(T, d, D)[0]

        @core.defjvp
        def core_jvp(primals, tangents):
            T, d, D = primals
            dT, dd, _ = tangents
            out, F = self._modes(T, d, D)
            G, tr_hinv = self._logdet_sensitivities(T, d, F)
            dlog = jnp.sum(G * dT) + jnp.exp(d) * tr_hinv * dd
            return out, (dlog,) + tuple(jnp.zeros_like(o) for o in out[1:])

        return core

    def _logdet_sensitivities(self, T, d, F):
        s2 = jnp.exp(d)
        Gs, tr = [], 0.0
        if self.kmax == 1:
            dinv = F.diag_inverse()
            tr = jnp.sum(dinv)
            C = jax.ops.segment_sum(1.0 - s2 * dinv, self._u_term, len(self.terms))
            return (2.0 * C / T[:, 0, 0])[:, None, None], tr
        vals = F.inverse_entries(self._blk_rows, self._blk_cols)
        for j, t in enumerate(self.terms):
            blocks = vals[self._blk_slices[j]].reshape(t.m, t.k, t.k)
            Hsum = jnp.sum(blocks, axis=0)
            tr = tr + jnp.trace(Hsum)
            C = t.m * jnp.eye(t.k) - s2 * Hsum
            Gt = 2.0 * jnp.linalg.solve(T[j, : t.k, : t.k].T, C.T)
            Gs.append(jnp.pad(Gt, ((0, self.kmax - t.k), (0, self.kmax - t.k))))
        return jnp.stack(Gs), tr

    def _pwrss(self, T, d, u, beta, D):
        """||y - X beta - Z Lambda u||^2_W + sigma^2 ||u||^2 from the cross-products."""
        p = self.p
        b = self._lam(T, u[:, None], D)  # (q, 1)
        rhs = D["ZtXy"][:, p] - D["ZtXy"][:, :p] @ beta
        ete = D["yty"] - 2 * beta @ D["Xty"] + beta @ D["XtX"] @ beta
        return ete - 2 * b[:, 0] @ rhs + self._quad(b, b, D)[0, 0] + jnp.exp(d) * u @ u

    @staticmethod
    def _conditioning(L, D):
        """Smallest squared pivot of S relative to X'WX's diagonal (column-scale free)."""
        return jnp.min(jnp.diagonal(L) ** 2 / jnp.maximum(jnp.diagonal(D["XtX"]), 1e-300), initial=1.0)

    def profiled(self, z, D):
        """``(-loglik, aux)`` at ``z = (theta, d)``, beta profiled (ML) or integrated
        (REML); ``aux = [beta_hat, vec(S), u]``.

        Derivatives flow only through log|H| (and, for REML, log|S|): the modes are
        exact minimizers, so by the envelope theorem the penalized residual sum of
        squares differentiates as a function of z at fixed modes, and the REML term
        log|S| through the identity d log|S| = tr(S^-1 dS), with
        dS = -2 sym(dR_X' G_X) + G_X' dH G_X at fixed G_X (a surrogate with that
        derivative and zero value is added)."""
        nth = z.shape[0] - 1
        theta, d = z[:nth], z[nth]
        T = self._T(theta)
        logdet, ok, u, beta, GX, S, L = self._core(T, d, D)
        u, beta, GX, S, L = jax.lax.stop_gradient((u, beta, GX, S, L))
        r2 = self._pwrss(T, d, u, beta, D)
        val = 0.5 * D["sw"] * (d + LOG_2PI) + 0.5 * r2 * jnp.exp(-d) + 0.5 * logdet - 0.5 * self.q * d
        if self.reml:
            p = self.p
            B = self._lam(T, GX, D)  # Lambda G_X (b numbering)
            dS = -2 * D["ZtXy"][:, :p].T @ B + self._quad(B, B, D) + jnp.exp(d) * GX.T @ GX
            Sinv = jax.scipy.linalg.cho_solve((L, True), jnp.eye(p))
            sur = 0.5 * jnp.sum(Sinv * dS)
            val = val + jnp.sum(jnp.log(jnp.diagonal(L))) + sur - jax.lax.stop_gradient(sur)
            val = val - 0.5 * p * (d + LOG_2PI)
        # beta nearly unidentified given the random effects (sigma -> 0 with Z Lambda
        # spanning X): the cross-product formulas cancel catastrophically there, so
        # the optimizer is kept out and `fit_model` hands the fit to the general path
        val = jnp.where((self._conditioning(L, D) > 1e-11) & (ok > 0), val, jnp.inf)
        aux = jnp.concatenate([beta, S.reshape(-1), u])
        return val, aux

    def _n_eff(self, D):
        return D["sw"] - (self.p if self.reml else 0)

    def profiled_rel(self, zeta, D):
        """``(-loglik, aux)`` with sigma profiled too: ``zeta`` is theta with its log
        sds relative to sigma. The system is sigma-free (H = Lambda' Z'WZ Lambda + I),
        sigma^2 = r2 / n (n = sum(w), less p for REML) and

            -loglik = n/2 (1 + log(2 pi r2 / n)) + 1/2 log|H| [+ 1/2 log|S|]

        (Bates et al. 2015, eqs. 34 and 41). ``aux = [beta_hat, grad r2, r2, vec(S), u]``
        with r2's gradient at fixed modes (for the Hessian in sigma, `_fit_rel`)."""
        p = self.p
        T = self._T(zeta)
        zero = jnp.zeros((), zeta.dtype)
        logdet, ok, u, beta, GX, S, L = self._core(T, zero, D)
        u, beta, GX, S, L = jax.lax.stop_gradient((u, beta, GX, S, L))
        r2_at = lambda zz: self._pwrss(self._T(zz), zero, u, beta, D)
        r2 = r2_at(zeta)
        n = self._n_eff(D)
        val = 0.5 * n * (1.0 + jnp.log(2 * math.pi * r2 / n)) + 0.5 * logdet
        if self.reml:
            B = self._lam(T, GX, D)
            dS = -2 * D["ZtXy"][:, :p].T @ B + self._quad(B, B, D) + GX.T @ GX
            Sinv = jax.scipy.linalg.cho_solve((L, True), jnp.eye(p))
            sur = 0.5 * jnp.sum(Sinv * dS)
            val = val + jnp.sum(jnp.log(jnp.diagonal(L))) + sur - jax.lax.stop_gradient(sur)
        ok = (self._conditioning(L, D) > 1e-11) & (ok > 0) & (r2 > 0) & (n > 0)
        val = jnp.where(ok, val, jnp.inf)
        g_r2 = jax.lax.stop_gradient(jax.grad(r2_at)(zeta))
        aux = jnp.concatenate([beta, g_r2, jax.lax.stop_gradient(r2)[None], S.reshape(-1), u])
        return val, aux

    def _fit_rel(self, zeta0, D, hinv0=None):
        """BFGS over zeta (sigma profiled), then the Hessian in the template's
        parameters. With P(zeta, d) the beta-profiled criterion,
        P = n/2 d + r2(zeta) / (2 e^d) + (terms free of d), so at the optimum
        (e^d = r2 / n) P_dd = n / 2 and P_zeta,d = -n grad(r2) / (2 r2), and the
        optimizer's finite-difference Hessian H2 of P(zeta, d(zeta)) gives
        P_zeta,zeta = H2 + P_zeta,d P_d,zeta / P_dd. The map (theta, d) ->
        (zeta = theta - d/2 [log sds], d) is linear; beta's blocks follow as in
        `_fit_impl` (beta_hat depends on zeta only)."""
        p, nth = self.p, zeta0.shape[0]

        def vg(z, aux, data):
            (f, aux_new), g = jax.value_and_grad(self.profiled_rel, has_aux=True)(z, data)
            return f, g, aux_new

        aux0 = jnp.zeros(p + nth + 1 + p * p + self.q)
        res = bfgs(vg, zeta0, aux0, D, self._polish_options(), hinv0=hinv0)
        zeta, aux = res["x"], res["aux"]
        beta, g_r2, r2 = aux[:p], aux[p: p + nth], aux[p + nth]
        o = p + nth + 1
        S, u = aux[o: o + p * p].reshape(p, p), aux[o + p * p:]
        n = self._n_eff(D)
        d = jnp.log(r2 / n)
        s2 = r2 / n
        Pzz = res["hessian"] + n * jnp.outer(g_r2, g_r2) / (2 * r2**2)
        Pzd = -n * g_r2 / (2 * r2)
        Hzd = jnp.block([[Pzz, Pzd[:, None]], [Pzd[None, :], jnp.full((1, 1), n / 2)]])
        e = jnp.asarray(self.sd_mask, float)
        A = jnp.eye(nth + 1).at[:nth, nth].set(-0.5 * e)  # d(zeta, d) / d(theta, d)
        Hx = A.T @ Hzd @ A
        gx = A.T @ jnp.concatenate([res["g"], jnp.zeros(1)])
        Jx = jnp.concatenate([res["aux_jacobian"], jnp.zeros((p, 1))], axis=1) @ A
        if self.reml:
            H, g = Hx, gx
        else:
            Hbb = S / s2
            Hbx = -Hbb @ Jx
            H = jnp.block([[Hbb, Hbx], [Hbx.T, Hx + Jx.T @ Hbb @ Jx]])
            g = jnp.concatenate([jnp.zeros(p), gx])
        z = jnp.concatenate([zeta + 0.5 * d * e, d[None]])
        beta = beta + D["beta0"]
        perm = self._x_order()
        return dict(x=self._x_of(z, beta), u=self._flatten({"b": u / jnp.sqrt(s2), "beta": beta}, "u"),
                    f=res["f"], g=g[perm], status=res["status"], iterations=res["iterations"],
                    hessian=H[perm][:, perm], hessian_zeta=res["hessian"],
                    conditioning=self._conditioning(jnp.linalg.cholesky(S), D),
                    **(self._reml_parts(s2, S, Jx[:, perm]) if self.reml else {}))

    def _fit_impl(self, z0, D):
        """BFGS over (theta, d), then the Hessian of the marginal in the template's
        parameters, all from the optimizer's own evaluations.

        The polish phase differences the exact gradient of the profiled criterion
        P(z) (its Hessian) and beta_hat(z) (its Jacobian J). For ML the Hessian in
        (beta, z) follows exactly: the marginal is quadratic in beta with Hessian
        S / sigma^2, and by the implicit-function theorem its cross block is
        -(S / sigma^2) J, so the z block is P'' + J' (S / sigma^2) J."""
        p = self.p

        def vg(z, aux, data):
            (f, aux_new), g = jax.value_and_grad(self.profiled, has_aux=True)(z, data)
            return f, g, aux_new

        aux0 = jnp.zeros(p + p * p + self.q)
        res = bfgs(vg, z0, aux0, D, self._polish_options())
        z, aux = res["x"], res["aux"]
        beta, S, u = aux[:p], aux[p: p + p * p].reshape(p, p), aux[p + p * p:]
        conditioning = self._conditioning(jnp.linalg.cholesky(S), D)
        beta = beta + D["beta0"]
        Hz, gz, J = res["hessian"], res["g"], res["aux_jacobian"]
        if self.reml:
            H, g = Hz, gz
        else:
            Hbb = S * jnp.exp(-z[-1])
            Hbz = -Hbb @ J
            H = jnp.block([[Hbb, Hbz], [Hbz.T, Hz + J.T @ Hbb @ J]])
            g = jnp.concatenate([jnp.zeros(p), gz])
        # from (beta, theta, d) order to the template's x order
        perm = self._x_order()
        x = self._x_of(z, beta)
        H = H[perm][:, perm]
        g = g[perm]
        uu = self._flatten({"b": u, "beta": beta}, "u")
        return dict(x=x, u=uu, f=res["f"], g=g, status=res["status"], iterations=res["iterations"],
                    hessian=H, conditioning=conditioning,
                    **(self._reml_parts(jnp.exp(z[-1]), S, J[:, perm]) if self.reml else {}))

    def _reml_parts(self, s2, S, J):
        """REML: beta's conditional covariance sigma^2 S^-1 and J = d beta_hat / dx
        (template order), the blocks GlmmFit.vcov needs."""
        return dict(beta_cov=s2 * jnp.linalg.inv(S), beta_jac=J)

    def _x_order(self):
        """Positions in the optimizer's (beta [ML only], theta, d) vector of the
        template's x entries."""
        nth = self.space.starts["theta"].size
        off = 0 if self.reml else self.p
        pos = {"theta": np.arange(off, off + nth), "betadisp": np.array([off + nth])}
        if not self.reml:
            pos["beta"] = np.arange(self.p)
        return np.concatenate([pos[n] for n in self.space.fixed])

    def _x_of(self, z, beta):
        nth = z.shape[0] - 1
        p = {"theta": z[:nth], "betadisp": z[nth:], "beta": beta}
        return self._flatten(p, "x")

    def _flatten(self, p, vec):
        sp = self.space
        names = sp.random if vec == "u" else sp.fixed
        parts = [jnp.reshape(p[n], (-1,)) for n in names]  # no map: every element free, in order
        return jnp.concatenate(parts) if parts else jnp.zeros(0)

    def start(self, user_disp=False):
        """(theta, d) from the template's start values, with ``d`` moved to the log
        variance of the ordinary least-squares residuals unless the user gave
        ``betadisp`` (glmmTMB starts at d = 0: same optimum, more iterations)."""
        sp = self.space
        theta = np.asarray(sp.starts["theta"], float)
        d = float(sp.starts["betadisp"][0])
        if not user_disp:
            v = float(np.sum(self._w * self._y**2) / max(np.sum(self._w), 1e-300))
            if v > 0 and np.isfinite(v):
                d = math.log(v)
        return np.concatenate([theta, [d]])

    def fit(self, D=None, user_disp=False, y=None, user_theta=False):
        """Fit to the data ``D`` (default the model's; ``y``: the centred response
        they were made from, for the start values)."""
        if self._compiled is None:
            model = self.template.model
            self._compiled = model.jit(self._fit_rel if self.relative else self._fit_impl, program="lmm_fit",
                                       compiler_options=lmm_compile_options(model.data, model.space.n_u))
        D = self.data if D is None else D
        z0 = self.start(user_disp)
        if not self.relative:
            return jax.tree_util.tree_map(np.asarray, self._compiled(jnp.asarray(z0), D))
        # the template's start (glmmTMB's: sds of 1 on the response's scale), as sds
        # relative to sigma; or, for random intercepts, moment estimates
        zeta0 = z0[:-1] - 0.5 * z0[-1] * self.sd_mask
        hinv0 = None
        if not user_theta and self._intercepts is not None:
            zeta0, hinv0 = self._moment_start(self._y if y is None else y)
        hinv0 = None if hinv0 is None else to_device(hinv0)
        run = lambda z: jax.tree_util.tree_map(np.asarray, self._compiled(jnp.asarray(z), D, hinv0))
        res = run(zeta0)
        # an sd near zero relative to sigma. On the log scale the boundary is flat (the
        # gradient vanishes with the sd), so the optimizer stops wherever the gradient
        # falls below tolerance: short of a better interior optimum (a path that ran
        # into the boundary: start once more with the sds scaled to their terms'
        # columns), or short of the boundary itself (a singular fit, lme4's theta = 0:
        # restart from there). Each candidate is kept only if no worse.
        if np.any(self._relative(res)[self.sd_mask] < -9.0):
            res = self._better(res, run(self._scaled_start()), 1e-8)
        zeta = self._relative(res)
        low = self.sd_mask & (zeta < -5.0)
        if low.any():
            res = self._better(res, run(np.where(low, -20.0, zeta)), -1e-9 * max(1.0, abs(float(res["f"]))))
        return res

    def _intercept_terms(self):
        """Each term's group index when every term is a random intercept (one level
        column of ones, one log-sd parameter), else None."""
        cond = self.template.design.components["cond"]
        out = []
        for j, t in enumerate(self.terms):
            sl = np.arange(t.theta_slice.start, t.theta_slice.stop)
            Z = np.asarray(cond.re[j].Z, float)
            if t.k != 1 or sl.size != 1 or not self.sd_mask[sl[0]] or not np.all(Z == 1.0):
                return None
            out.append((int(sl[0]), np.asarray(cond.re[j].index, np.int64), t.m))
        return out

    def _moment_start(self, y):
        """Start values for random intercepts from one-way analyses of variance of
        the least-squares residuals ``y`` (already centred on ``X beta0``), and a
        diagonal inverse Hessian to go with them.

        Per term with ``G`` groups of sizes ``n_g``: the within-group variance
        ``s2w`` and ``s2b = var(group means) - s2w mean(1 / n_g)`` (Henderson's
        method I on one factor at a time), ``sigma^2 = var(y) - sum(s2b)`` (at least
        a tenth of ``var(y)``) and ``zeta = log(sqrt(s2b) / sigma)``, clipped to
        [-3, 3]. The curvature of the criterion in ``zeta`` is about ``2 G rho^2``
        with ``rho = s2b / (s2b + s2w / mean(n_g))`` (a balanced one-way model's
        information for its log sd), floored at 1. On the crossed cases these land
        within 0.05 (InstEval's 14-level dept: 0.3) of the optimum, and BFGS takes
        about half the evaluations it takes from glmmTMB's start (all sds 1)."""
        w = self._w
        sw = float(np.sum(w))
        total = float(np.sum(w * y * y)) / sw
        zeta = np.zeros(self.sd_mask.size)
        curv = np.ones(self.sd_mask.size)
        s2b = {}
        for pos, g, m in self._intercepts:
            n = np.bincount(g, weights=w, minlength=m)
            ok = n > 0
            mean = np.bincount(g, weights=w * y, minlength=m) / np.where(ok, n, 1.0)
            s2w = float(np.sum(w * (y - mean[g]) ** 2)) / max(sw - ok.sum(), 1.0)
            between = float(np.var(mean[ok])) - s2w * float(np.mean(1.0 / n[ok]))
            s2b[pos] = max(between, 0.0)
            rho = s2b[pos] / max(s2b[pos] + s2w / float(np.mean(n[ok])), 1e-300)
            curv[pos] = max(2.0 * ok.sum() * rho**2, 1.0)
        sigma2 = max(total - sum(s2b.values()), 0.1 * total, 1e-300)
        for pos, v in s2b.items():
            zeta[pos] = np.clip(0.5 * math.log(max(v, 1e-300) / sigma2), -3.0, 3.0)
        if not np.all(np.isfinite(zeta)):
            return np.zeros_like(zeta), None
        return zeta, np.diag(1.0 / curv)

    def _relative(self, res):
        return res["x"][self._theta_pos()] - 0.5 * res["x"][self._disp_pos()] * self.sd_mask

    @staticmethod
    def _better(res, alt, margin):
        """``alt`` if it converged at an nll lower than ``res``'s by ``margin``."""
        ok = np.isfinite(alt["f"]) and int(alt["status"]) == 0 and alt["f"] < res["f"] - margin
        return alt if ok else res

    def _theta_pos(self):
        return self.space.index["theta"]

    def _disp_pos(self):
        return int(self.space.index["betadisp"][0])

    def _scaled_start(self):
        """Relative log sds at -log of each term's root-mean-square column value (a
        slope on a covariate in the tens starts with a small sd), the rest at 0."""
        zeta = np.zeros(self.sd_mask.size)
        for j, t in enumerate(self.terms):
            Zt = np.asarray(self.template.design.components["cond"].re[j].Z, float)
            rms = float(np.sqrt(np.mean(Zt**2))) if Zt.size else 1.0
            sl = np.arange(t.theta_slice.start, t.theta_slice.stop)
            zeta[sl[self.sd_mask[sl]]] = -math.log(max(rms, 1e-12))
        return zeta

    def _centred(self, y):
        """Response(s) (rows last) less the offset and ``X beta0``: the residuals the
        cross-products and the moment start are computed from."""
        return np.asarray(y, float) - self._offset - self._X @ self.beta0

    def data_for(self, y):
        """The statistics for a new response vector (same design): a refit's data;
        ``y`` already centred (`_centred`)."""
        D = dict(self.data)
        D["ZtXy"] = to_device(np.column_stack([np.asarray(self.data["ZtXy"])[:, :-1], self._WZt @ y]))
        D["Xty"] = to_device(self._WX.T @ y)
        D["yty"] = to_device(float(np.sum(self._w * y * y)))
        return D

    def fit_model(self, D=None, user_disp=False, y=None, user_theta=False):
        """`fit` wrapped as the engine's `tmbx.Fit` of the template's model (with
        ``y``: a refit to a new response of the same design); None when the
        optimizer did not converge, for the caller to use the general path."""
        from .._model import Fit

        model = self.template.model
        data = model.data
        yc = None
        if y is not None:
            yc = self._centred(y)
            D = self.data_for(yc)
            data = dict(data, y=jnp.asarray(y, float))
        res = self.fit(D, user_disp, yc, user_theta)
        if int(res["status"]) != 0 or not np.isfinite(float(res["f"])) or float(res["conditioning"]) < 1e-8:
            # the general Laplace path takes it (a boundary such as sigma -> 0, where
            # the fixed effects are barely identified beside the random effects)
            return None
        fit = Fit(model, data, res)
        fit._lmm = self
        fit._zeta_hessian = np.asarray(res["hessian_zeta"]) if "hessian_zeta" in res else None
        if self.reml:  # beta's conditional covariance and d beta_hat / dx, for GlmmFit.vcov
            fit._reml_beta = (np.asarray(res["beta_cov"]), np.asarray(res["beta_jac"]))
        fit._warn()
        return fit

    def _z_of_x(self, x):
        p = self.space.unflatten(jnp.asarray(x), jnp.zeros(self.space.n_u))
        return jnp.concatenate([p["theta"], p["betadisp"]])

    # ------------------------------------------------------------ batched refits
    def _refit_impl(self, zeta0, D, options, max_evals=None, hinv0=None):
        """One refit for the bootstrap: BFGS over zeta from ``zeta0`` (inverse Hessian
        ``hinv0`` to start with), no Hessian."""
        p, nth = self.p, zeta0.shape[0]

        def vg(z, aux, data):
            (f, aux_new), g = jax.value_and_grad(self.profiled_rel, has_aux=True)(z, data)
            return f, g, aux_new

        res = bfgs(vg, zeta0, jnp.zeros(p + nth + 1 + p * p + self.q), D, options, max_evals, hinv0)
        zeta, aux = res["x"], res["aux"]
        beta, r2 = aux[:p] + D["beta0"], aux[p + nth]
        s2 = r2 / self._n_eff(D)
        d = jnp.log(s2)
        e = jnp.asarray(self.sd_mask, float)
        x = self._x_of(jnp.concatenate([zeta + 0.5 * d * e, d[None]]), beta)
        u = self._flatten({"b": aux[p + nth + 1 + p * p:] / jnp.sqrt(s2), "beta": beta}, "u")
        return {"x": x, "u": u, "zeta": zeta, "f": res["f"], "status": res["status"], "iterations": res["iterations"],
                "gmax": jnp.max(jnp.abs(res["g"]), initial=0.0)}

    def refit_many(self, Y, x_start, batch_size, bar=None, first_pass=12, max_evals=300, hessian=None):
        """Refit to each row of the responses ``Y`` (B, N) in one vmapped program;
        only the response's cross-products differ between replicates (Z'Wy, X'Wy,
        y'Wy), the rest of the data is shared.

        A vmapped loop runs as long as its slowest member, so every replicate gets
        a short first pass (most converge in under a dozen evaluations from the
        original estimate) and only the rest continue. Both passes run one compiled
        program, ``batch_size / 4`` replicates at a time, with the evaluation budget
        an argument: a second program (another budget or batch shape) cost
        sleepstudy's 1,000-replicate bootstrap 4-5 s of compilation, about as much
        as everything else together.

        ``hessian``: the fitted model's Hessian in zeta (the original fit's): its
        inverse starts each replicate's BFGS, whose first steps are then close to
        Newton steps (sleepstudy: 7.6 evaluations per replicate on average, against
        9.5 from a scaled identity)."""
        Yc = self._centred(Y)
        stats = (np.asarray((self._WZt @ Yc.T).T), Yc @ self._WX, np.sum(self._w * Yc * Yc, axis=1))
        z = np.asarray(self._z_of_x(x_start))
        B = Yc.shape[0]
        zeta0 = np.broadcast_to(z[:-1] - 0.5 * z[-1] * self.sd_mask, (B, z.size - 1))
        size = max(8, batch_size // 4)
        hinv0 = _inverse_if_pd(hessian)
        out = self._refit_chunks(zeta0, stats, np.arange(B), size, first_pass, bar, hinv0)
        again = np.flatnonzero(out["status"] != 0)
        if again.size:
            more = self._refit_chunks(out["zeta"], stats, again, size, max_evals, None, hinv0)
            for k in out:
                out[k][again] = more[k]
        del out["zeta"]
        return out

    def _refit_chunks(self, zeta0, stats, rows, size, max_evals, bar=None, hinv0=None):
        key = (size, hinv0 is None)
        if key not in self._compiled_many:
            options = self._options(polish=False, gtol=1e-7)

            def one(z0, zty, xty, yty, D, budget, h0):
                Dy = dict(D, ZtXy=jnp.concatenate([D["ZtXy"][:, :-1], zty[:, None]], axis=1), Xty=xty, yty=yty)
                return self._refit_impl(z0, Dy, options, budget, h0)

            self._compiled_many[key] = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, None, None, None)))
        run = self._compiled_many[key]
        out = {}
        for lo in range(0, rows.size, size):
            idx = rows[lo: lo + size]
            idx = np.concatenate([idx, np.repeat(idx[:1], size - idx.size)])  # pad: one program
            args = [to_device(np.asarray(a)[idx]) for a in (zeta0,) + stats]
            res = run(*args, self.data, to_device(max_evals), None if hinv0 is None else to_device(hinv0))
            n = min(size, rows.size - lo)
            for k, v in res.items():
                out.setdefault(k, []).append(np.asarray(v)[:n])
            if bar is not None:
                bar.update(n)
        return {k: np.concatenate(v) for k, v in out.items()}


def _inverse_if_pd(H):
    """``H^-1`` of a symmetric positive definite Hessian (NumPy), else None."""
    if H is None:
        return None
    H = 0.5 * (np.asarray(H, float) + np.asarray(H, float).T)
    if H.size == 0 or not np.all(np.isfinite(H)):
        return None
    try:
        L = np.linalg.cholesky(H)
    except np.linalg.LinAlgError:
        return None
    Linv = np.linalg.inv(L)
    return Linv.T @ Linv
