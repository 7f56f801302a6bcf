"""The linear-cost path: matrix-free Newton steps and stochastic log-determinants.

An arrow layout (`tmbx._sparse.ArrowLayout`: a block-diagonal head, one block
per level of the largest grouping factor, coupled to a tail of the other
factors' levels) is factorized exactly by eliminating the head and factoring
the tail's Schur complement ``S = T - B' D^-1 B`` densely. That costs
``t^3 / 3`` in the tail size ``t`` and ``t^2`` memory, which outgrows the data
on large crossed designs (the smaller factor's levels grow with the rows).
This module keeps the exact head elimination (block Cholesky, linear in the
rows) and replaces everything on the tail by iterations whose cost is a
number of products with ``S``, each linear in the rows (``S`` is applied
through the head blocks, never formed):

- the ``exact_probes`` tail levels H with the most couplings (a small factor
  crossed with everything) are eliminated exactly first: ``S_HH`` (h x h) is
  factored densely and the iterations run on ``S' = S_LL - S_LH S_HH^-1 S_HL``
  on the other levels L, applied as ``S`` plus a rank-h correction;
- solves with ``S'``: conjugate gradients on several right-hand sides at once,
  preconditioned by ``d = diag(S')`` (computed exactly from the head blocks);
- ``log det S' ``: stochastic Lanczos quadrature (Ubaru, Chen and Saad 2017) on
  ``M = d^-1/2 S' d^-1/2``, whose diagonal is exactly one, with fixed-seed
  Rademacher probes and two control variates of known mean, ``r'(M - I)r``
  (mean 0) and ``|(M - I) r|^2`` (mean ``tr((M - I)^2)``, computed exactly from
  the head blocks' coupling pairs); ``log det d`` and ``log det S_HH`` are exact;
- its gradient ``tr(S^-1 dS)``: Hutchinson's estimator with the same probes,
  ``S'^-1 ~ sum_p w_p (S'^-1 d^1/2 r_p)(d^-1/2 r_p)'``, extended to ``S^-1``'s
  blocks exactly (unbiased; exact where ``S'`` is diagonal);
- deflation: ``M``'s few smallest eigenvalues (tail directions confounded with
  the other factors and the intercept: ``Z_a 1 = Z_b 1``, so a tail factor's
  constant vector is nearly null) dominate the probes' variance, about
  ``2 log(lambda)^2`` each. Ritz vectors ``U`` of the ``deflate`` smallest
  (block inverse iteration from ``d^1/2 1`` and Gaussian vectors, solves to
  a relative residual of 1e-8, then Rayleigh-Ritz: a deterministic function
  of the parameters, smooth to that tolerance) are probed exactly and the
  Rademacher probes projected off them, ``[U c, (I - U a U')R]`` with
  weights ``[1, 1/P]`` (``c`` from the Ritz value: 1 for an outlier, 0 near 1;
  ``(1 - a)^2 = 1 - c^2``), still an unbiased estimate of the identity for any
  ``U``, so every estimate stays unbiased and loses the outliers' variance.
  The same Ritz pairs make the conjugate gradients' preconditioner two-level
  (Jacobi, with the Ritz directions scaled by their Ritz values' inverses).

A tail of at most ``probes`` levels is probed with its unit vectors instead,
which makes every estimate exact.

The probes come from a fixed seed, so the approximate marginal likelihood is a
deterministic function of the parameters and a fit is reproducible. Its error
against the exact path falls as ``1/sqrt(probes)`` and grows with the coupling
(``tr((M - I)^2)``); a fit reports it (`IterativeArrowFactor.logdet_mc_se`,
``fit.loglik_mc_se``), and `benchmarks/bench_iterative.py` measures it on the
cases where both paths run.

No JAX library offers PCG with several right-hand sides under ``vmap`` and
stochastic Lanczos quadrature with a custom operator (``jax.scipy.sparse.linalg.cg``
solves one right-hand side and has no log-determinant), so both are written here.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._sparse import _logdiag, _tri_inv, arrow_scatter, arrow_solve, logdet

# the scale of |log theta| above which a Ritz direction of the scaled tail is
# deflated in full, and the relative residual of the inverse iteration's solves
# (`IterativeArrowFactor._deflation`)
DEFLATE_SCALE = 0.5
DEFLATE_TOL = 1e-8


class IterativeOptions(eqx.Module):
    """Settings of the linear-cost path.

    ``probes``: Rademacher probes of the log-determinant and its gradient (the
    error falls as 1/sqrt(probes); a tail of at most ``probes`` levels is probed
    with its unit vectors instead, which makes both exact); ``exact_probes``:
    on a larger tail, how many of its most coupled levels are eliminated
    exactly before the iterations; ``lanczos_steps``: Lanczos steps per probe;
    ``tol``: relative residual at which conjugate gradients stop;
    ``max_iter``: their iteration limit; ``seed``: of the probes;
    ``deflate``: how many of the scaled tail's smallest eigenvectors are
    approximated and probed exactly (0: none), by ``deflate_iters`` block inverse
    iterations of at most ``deflate_cg`` conjugate-gradient steps each.
    """

    probes: int = 64
    exact_probes: int = 32
    lanczos_steps: int = 20
    tol: float = 1e-11
    max_iter: int = 1000
    seed: int = 0
    deflate: int = 32
    deflate_iters: int = 3
    deflate_cg: int = 50


def _tail_matvec(layout, Tv, We, v):
    """``S v = T v - W' W v`` for ``v`` of shape (t, r): ``T`` from its stored
    pattern, ``W = Lh^-1 B`` from its real coupling entries ``We`` (E, k);
    linear in the stored entries, with sorted segment sums throughout."""
    lay = layout
    y = jax.ops.segment_sum(Tv[:, None] * v[lay.tail_cols], lay.tail_rows, lay.t, indices_are_sorted=True)
    g = v[lay.ent_t]  # (E, r)
    a = jax.ops.segment_sum(We[:, :, None] * g[:, None, :], lay.ent_b, lay.m, indices_are_sorted=True)
    back = jnp.sum(We[:, :, None] * a[lay.ent_b], axis=1)  # (E, r)
    return y - jax.ops.segment_sum(back[lay.ent_perm], lay.ent_t_sorted, lay.t, indices_are_sorted=True)


def pcg(matvec, b, prec, tol, max_iter):
    """Preconditioned conjugate gradients on every column of ``b`` (n, r) at once;
    a column stops changing once its residual is below ``tol * |b|``. ``prec``:
    the inverse diagonal (Jacobi), or the preconditioner as a function of (n, r)
    blocks."""
    if not callable(prec):
        dinv = prec
        prec = lambda r: dinv[:, None] * r
    bnorm = jnp.sqrt(jnp.sum(b * b, axis=0))
    x = prec(b)
    r = b - matvec(x)
    z = prec(r)
    p = z
    rz = jnp.sum(r * z, axis=0)

    def active(r):
        return jnp.sqrt(jnp.sum(r * r, axis=0)) > tol * bnorm

    def cond(st):
        it, x, r, p, rz = st
        return (it < max_iter) & jnp.any(active(r))

    def body(st):
        it, x, r, p, rz = st
        on = active(r)
        Sp = matvec(p)
        den = jnp.sum(p * Sp, axis=0)
        alpha = jnp.where(on & (den > 0), rz / jnp.where(den > 0, den, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * Sp
        z = prec(r)
        rz_new = jnp.sum(r * z, axis=0)
        beta = jnp.where(on & (rz > 0), rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
        p = jnp.where(on, z + beta * p, p)
        return it + 1, x, r, p, jnp.where(on, rz_new, rz)

    _, x, r, _, _ = jax.lax.while_loop(cond, body, (0, x, r, p, rz))
    return x


def probe_matrix(n, probes, seed, exclude=None):
    """The probes ``R`` (n, P) and their weights ``w`` (P,), with ``sum_p w_p r_p
    r_p'`` an unbiased estimate of the identity on the levels not in
    ``exclude``: where ``n <= probes``, the unit vectors (exact); otherwise
    ``probes`` Rademacher vectors, zero on ``exclude`` (weight 1/probes)."""
    if n <= probes:
        return jnp.eye(n), jnp.ones(n)
    Z = jax.random.rademacher(jax.random.PRNGKey(seed), (n, probes), dtype=jnp.float64)
    if exclude is not None and len(exclude):
        Z = Z.at[exclude].set(0.0)
    return Z, jnp.full(probes, 1.0 / probes)


def slq_logdet(matvec, R, w, steps, trE2=None, per_probe=False):
    """Stochastic Lanczos quadrature: ``log det M`` for a symmetric positive
    definite ``M`` **with unit diagonal**, given by ``matvec`` on (n, r) blocks,
    from the weighted probes ``(R, w)`` of `probe_matrix`: ``sum_p w_p r_p' log(M)
    r_p``, each term ``|r_p|^2`` times the Gauss quadrature of ``e1' log(T_p) e1``
    on the probe's Lanczos tridiagonal ``T_p``, less control variates of known
    mean. ``per_probe``: also each probe's term ``|r_p|^2 (...)`` (their spread
    is the estimate's Monte Carlo error)."""
    probes = R.shape[1]
    rr = jnp.sum(R * R, axis=0)  # |r_p|^2
    q = R / jnp.sqrt(jnp.where(rr > 0, rr, 1.0))  # a zero probe (weight c = 0) adds nothing
    eps = 1e-12

    def step(carry, _):
        q, q_prev, beta = carry
        v = matvec(q) - beta * q_prev
        alpha = jnp.sum(q * v, axis=0)
        v = v - alpha * q
        beta_new = jnp.sqrt(jnp.sum(v * v, axis=0))
        # breakdown (an invariant subspace found, e.g. M = I): the rest of the
        # tridiagonal decouples with zero weight on e1
        live = beta_new > eps * jnp.maximum(jnp.abs(alpha), 1.0)
        q_next = jnp.where(live, v / jnp.where(live, beta_new, 1.0), 0.0)
        beta_new = jnp.where(live, beta_new, 0.0)
        return (q_next, q, beta_new), (alpha, beta_new)

    _, (alphas, betas) = jax.lax.scan(step, (q, jnp.zeros_like(q), jnp.zeros(probes)), None,
                                      length=steps)
    # tridiagonal per probe: (probes, steps, steps)
    Tm = jax.vmap(lambda a, b: jnp.diag(a) + jnp.diag(b[:-1], 1) + jnp.diag(b[:-1], -1))(alphas.T, betas.T)
    theta, vecs = jnp.linalg.eigh(Tm)
    tau = vecs[:, 0, :] ** 2
    logs = jnp.log(jnp.maximum(theta, 1e-300))
    quad = jnp.sum(jnp.where(tau > 0, tau * logs, 0.0), axis=1)  # q' log(M) q
    # control variates with known means. M has unit diagonal, so with E = M - I,
    # r'E r has mean tr(E) = 0: subtracting it (alpha_1 = q'M q, free) removes the
    # first-order part of the noise, log M - E = -E^2 / 2 + ...; and r'E^2 r =
    # |E r|^2 has mean tr(E^2), exact when known, for the second-order part.
    # (Both vanish exactly on unit-vector probes.)
    est = quad - (alphas[0] - 1.0)
    total = 0.0
    if trE2 is not None:
        Eq = matvec(q) - q
        est = est + 0.5 * jnp.sum(Eq * Eq, axis=0)
        total = -0.5 * trE2
    if per_probe:
        return jnp.sum(w * rr * est) + total, rr * est
    return jnp.sum(w * rr * est) + total


class IterativeArrowFactor(eqx.Module):
    """An arrow layout's "factorization" for the linear-cost path: the head blocks'
    Cholesky factors, ``W = Lh^-1 B`` and the exact diagonal of the tail's Schur
    complement; the tail itself is only ever applied (see the module docstring).
    Offers what the exact `ArrowFactor` does: ``solve``, ``_logdet``,
    ``logdet_grad``, ``diag_inverse``, ``inverse_entries``, ``pivots``, ``ok``."""

    layout: object = eqx.field(static=True)
    flat: jax.Array
    Lh: jax.Array
    W: jax.Array
    We: jax.Array  # W at the real coupling entries, (E, k)
    Tv: jax.Array  # the tail's stored entries
    dS: jax.Array  # diag(S), exact
    # the heavy levels H (`layout.heavy`) eliminated exactly: S' = S_LL - S_LH S_HH^-1 S_HL
    # on the other levels L, with S_HH = LH LH' and G = S_LH LH^-T (rows of H zero)
    LH: jax.Array
    G: jax.Array
    d: jax.Array  # diag(S') on L (1 on H), exact: the Jacobi preconditioner
    trE2: jax.Array  # tr(E^2), E = d^-1/2 S' d^-1/2 - I on L, exact
    # the deflation basis (t, k), orthonormal Ritz vectors of M, zero on H, and
    # their Ritz values (k,); computed on demand (`with_deflation`), since Newton
    # steps only solve
    U: jax.Array | None = None
    theta: jax.Array | None = None

    @classmethod
    def build(cls, layout, flat, D, B, Tv, Lh, W):
        lay = layout
        tdiag = Tv[lay.tail_diag]
        We = W[lay.ent_b, :, lay.ent_c]  # (E, k)
        upd = jnp.sum(We * We, axis=1)[lay.ent_perm]  # diag of W'W, entry by entry
        dS = tdiag - jax.ops.segment_sum(upd, lay.ent_t_sorted, lay.t, indices_are_sorted=True)
        # S's off-diagonal entries (upper triangle), from the head blocks' pairs of
        # coupling columns and the tail's own pattern: linear in the rows (each
        # block contributes its c^2 pairs), never a dense t x t matrix
        nseg = lay.off_rows.shape[0]
        contrib = jnp.sum(W[lay.pair_b, :, lay.pair_i] * W[lay.pair_b, :, lay.pair_j], axis=-1)
        Soff = (jnp.zeros(nseg + 1, flat.dtype).at[lay.tail_seg].add(Tv)
                - jax.ops.segment_sum(contrib, lay.pair_seg, nseg + 1))[:nseg]
        S = lambda v: _tail_matvec(lay, Tv, We, v)
        heavy, h = lay.heavy, len(lay.heavy)
        light = np.ones(lay.t)
        light[heavy] = 0.0
        if h:
            # S's columns at H by one product with their unit vectors (t x h)
            C = S(jnp.zeros((lay.t, h), flat.dtype).at[heavy, np.arange(h)].set(1.0))
            LH = jnp.linalg.cholesky(0.5 * (C[heavy] + C[heavy].T))
            G = jax.scipy.linalg.solve_triangular(LH, C.T, lower=True).T * light[:, None]
        else:
            LH, G = jnp.zeros((0, 0), flat.dtype), jnp.zeros((lay.t, 0), flat.dtype)
        d = jnp.where(light > 0, dS - jnp.sum(G * G, axis=1), 1.0)
        dd = jnp.where(d > 0, d, 1.0)
        # tr(E^2) = sum over j != l in L of S'_jl^2 / (d_j d_l), S' = S - G G'
        lt = jnp.asarray(light)  # indexed by the layout's arrays, which may be traced
        both = lt[lay.off_rows] * lt[lay.off_cols]
        trE2 = 2.0 * jnp.sum(both * Soff**2 / (dd[lay.off_rows] * dd[lay.off_cols]))
        if h:
            Gt, Gd = G / jnp.sqrt(dd)[:, None], G / dd[:, None]
            cross = jnp.sum(Gd * (light[:, None] * S(Gd))) - jnp.sum(dS * jnp.sum(Gd * Gd, axis=1))
            gram = jnp.sum((Gt.T @ Gt) ** 2) - jnp.sum(jnp.sum(Gt * Gt, axis=1) ** 2)
            trE2 = trE2 - 2.0 * cross + gram
        return cls(layout=layout, flat=flat, Lh=Lh, W=W, We=We, Tv=Tv, dS=dS, LH=LH, G=G, d=d, trE2=trE2)

    @property
    def options(self) -> IterativeOptions:
        return self.layout.iterative

    def _light(self):
        light = np.ones(self.layout.t)
        light[self.layout.heavy] = 0.0
        return light

    def _S(self, v):
        return _tail_matvec(self.layout, self.Tv, self.We, v)

    def _Sr(self, v):
        """``S' v`` for ``v`` (t, r) zero on H (and zero there in the result)."""
        y = self._S(v)
        if not len(self.layout.heavy):
            return y
        z = jax.scipy.linalg.solve_triangular(self.LH, y[self.layout.heavy], lower=True)
        return self._light()[:, None] * (y - self.G @ z)

    def tail_solve(self, b):
        """``S^-1 b``, ``b`` of shape (t, r): the heavy levels by their Schur
        complement, the rest by conjugate gradients on ``S'``."""
        o, heavy = self.options, self.layout.heavy
        light = self._light()
        dinv = light / jnp.where(self.d > 0, self.d, 1.0)
        prec = dinv  # Jacobi
        if self.U is not None and self.U.shape[1]:
            # with the deflation basis at hand: Jacobi, with M's Ritz directions
            # scaled by their Ritz values' inverses, ``d^-1/2 (I + U (Theta^-1 -
            # I) U') d^-1/2``; the near-null directions that set conjugate
            # gradients' iteration count are then solved in one step
            Ud = jnp.sqrt(dinv)[:, None] * self.U
            corr = 1.0 / self.theta - 1.0
            prec = lambda r: dinv[:, None] * r + Ud @ (corr[:, None] * (Ud.T @ r))
        tri = jax.scipy.linalg.solve_triangular

        def solve(_, b):
            if not len(heavy):
                return pcg(self._S, b, prec, o.tol, o.max_iter)
            z = tri(self.LH, b[heavy], lower=True)
            xl = pcg(self._Sr, light[:, None] * (b - self.G @ z), prec, o.tol, o.max_iter)
            xh = tri(self.LH, z - self.G.T @ xl, lower=True, trans=1)
            return xl.at[heavy].set(xh)

        # custom_linear_solve: linear in b and transposable (S is symmetric), so the
        # solves inside derivative rules can be transposed for reverse mode, which
        # a while loop cannot
        return jax.lax.custom_linear_solve(self._S, b, solve, symmetric=True)

    # -- what the Laplace machinery asks of a factor -------------------------
    def ok(self):
        return jnp.all(jnp.isfinite(self.pivots())) & jnp.all(self.d > 0)

    def pivots(self):
        return jnp.concatenate([jnp.diagonal(self.Lh, axis1=1, axis2=2).ravel(), jnp.diagonal(self.LH),
                                jnp.sqrt(jnp.maximum(self.d, 0.0))])

    def _deflation(self):
        """The deflation basis ``U`` and its Ritz values ``theta`` (module docstring):
        ``deflate_iters`` steps of block inverse iteration on ``M = d^-1/2 S'
        d^-1/2`` from ``d^1/2 1`` (the scaled constant vector, nearly null on
        crossed designs) and Gaussian vectors, each solve to a relative residual
        of ``DEFLATE_TOL`` (at most ``deflate_cg`` conjugate-gradient steps),
        then Rayleigh-Ritz.
        A Ritz vector with value ``theta`` gets ``c^2 = 1 - exp(-(log theta /
        DEFLATE_SCALE)^2)``: 1 for an outlier, 0 where ``theta ~ 1``, whose
        direction the Rademacher probes already handle well (exactly, for the
        diagonal, where ``M = I``) (`_probe_set`). Empty
        where the probes are unit vectors (exact) or ``deflate = 0``. Not
        differentiated: the estimates are unbiased for any fixed ``U, theta``."""
        if self.U is not None:
            return self.U, self.theta
        o, t = self.options, self.layout.t
        light = self._light()
        k = min(o.deflate, int(light.sum()) // 2)
        if t <= o.probes or k <= 0:
            return jnp.zeros((t, 0), self.flat.dtype), jnp.zeros((0,), self.flat.dtype)
        dd = jnp.where(self.d > 0, self.d, 1.0)
        sq = jnp.sqrt(dd) * light
        dinv = light / dd
        X = jax.random.normal(jax.random.PRNGKey(o.seed + 1), (t, k), self.flat.dtype) * light[:, None]
        X = jnp.linalg.qr(X.at[:, 0].set(sq))[0]
        for _ in range(o.deflate_iters):
            X = sq[:, None] * pcg(self._Sr, sq[:, None] * X, dinv, DEFLATE_TOL, o.deflate_cg)  # M^-1 X
            X = jnp.linalg.qr(X)[0]
        K = X.T @ self._M(X)
        theta, Y = jnp.linalg.eigh(0.5 * (K + K.T))
        return jax.lax.stop_gradient(X @ Y), jax.lax.stop_gradient(jnp.maximum(theta, 1e-300))

    def with_deflation(self):
        """This factor with its deflation basis computed, for the log-determinant,
        its gradient and their solves to share (Newton steps never need it)."""
        U, theta = self._deflation()
        return eqx.tree_at(lambda f: (f.U, f.theta), self, (U, theta), is_leaf=lambda x: x is None)

    def _probe_set(self):
        """The weighted probes ``(R, w)`` of every estimate: ``[U diag(c), (I - U
        diag(a) U') R]`` with weights ``[1, w]`` for `probe_matrix`'s ``(R, w)``
        and ``a = 1 - sqrt(1 - c^2)``, so that ``sum_p w_p r_p r_p'`` is still
        unbiased for the identity (``(I - A)^2 = I - U diag(c^2) U'``); the first
        ``U.shape[1]`` columns are exact."""
        R, w = probe_matrix(self.layout.t, self.options.probes, self.options.seed, self.layout.heavy)
        U, theta = self._deflation()
        if not U.shape[1]:
            return R, w
        c = jnp.sqrt(-jnp.expm1(-(jnp.log(theta) / DEFLATE_SCALE) ** 2))
        a = 1.0 - jnp.sqrt(jnp.maximum(1.0 - c * c, 0.0))
        R = jnp.concatenate([U * c, R - (U * a) @ (U.T @ R)], axis=1)
        return R, jnp.concatenate([jnp.ones(U.shape[1], w.dtype), w])

    def _M(self, v):
        """``M v`` for the scaled tail ``M = d^-1/2 S' d^-1/2`` (unit diagonal on L,
        zero on H), ``v`` of shape (t, r)."""
        s = self._light() / jnp.sqrt(jnp.where(self.d > 0, self.d, 1.0))
        return s[:, None] * self._Sr(s[:, None] * v)

    def _slq(self, per_probe=False):
        """`slq_logdet` of ``M = d^-1/2 S' d^-1/2`` with this factor's probes."""
        o, t = self.options, self.layout.t
        R, w = self._probe_set()
        return slq_logdet(self._M, R, w, min(o.lanczos_steps, t + 1), self.trE2, per_probe=per_probe)

    def _logdet(self):
        head = 2.0 * _logdiag(self.Lh)
        if not self.layout.t:
            return head
        d = jnp.where(self.d > 0, self.d, 1.0)
        heavy = 2.0 * jnp.sum(jnp.log(jnp.diagonal(self.LH)))
        return head + heavy + jnp.sum(self._light() * jnp.log(d)) + self._slq()

    def logdet(self):
        return logdet(self.layout, self.flat)

    def logdet_mc_se(self):
        """The Monte Carlo standard error of `_logdet`: the spread of its probes'
        terms over sqrt(probes) (zero where the probes are unit vectors: exact)."""
        o = self.options
        if self.layout.t <= o.probes:
            return jnp.zeros(())
        F = self.with_deflation()
        _, terms = F._slq(per_probe=True)
        terms = terms[F.U.shape[1]:]  # the deflated columns are exact
        return jnp.std(terms, ddof=1) / jnp.sqrt(o.probes)

    def _probes(self):
        """``(V, Wt)`` (t, P) with ``S^-1 ~ Wt V'``: on L, ``V = d^-1/2 R`` and ``Wt =
        S'^-1 d^1/2 R w`` for the weighted probes ``(R, w)`` (`probe_matrix`), so
        that ``S'^-1 ~ Wt V'``; then ``S^-1``'s blocks, ``[[S'^-1, -S'^-1 Y'], [-Y
        S'^-1, S_HH^-1 + Y S'^-1 Y']]`` with ``Y = S_HH^-1 S_HL``, by extending both to
        H (rows ``-Y Wt``, ``-Y V``) and appending ``S_HH^-1`` exactly as ``h``
        columns ``X X'``, ``X = LH^-T`` on the rows of H."""
        t, heavy = self.layout.t, self.layout.heavy
        R, w = self._probe_set()
        d = jnp.where(self.d > 0, self.d, 1.0)
        V = R / jnp.sqrt(d)[:, None]
        Wt = self.tail_solve(R * jnp.sqrt(d)[:, None]) * w
        if not len(heavy):
            return V, Wt
        # tail_solve already solved the full S: its H rows are -Y (S'^-1 d^1/2 R)
        tri = jax.scipy.linalg.solve_triangular
        V = V.at[heavy].set(-tri(self.LH, self.G.T @ V, lower=True, trans=1))
        X = jnp.zeros((t, len(heavy))).at[heavy].set(tri(self.LH, jnp.eye(len(heavy)), lower=True, trans=1))
        return jnp.concatenate([V, X], axis=1), jnp.concatenate([Wt, X], axis=1)

    def solve(self, b):
        return arrow_solve(self.layout, self.Lh, self.W, b, self.tail_solve)

    def _pieces(self):
        """``D^-1`` head blocks, the probes ``V, Wt`` (`_probes`), ``Vhe`` = ``D^-1 B``
        at the real coupling entries (E, k), and the probe products ``A = Vh Wt[cols]``,
        ``C = Vh V[cols]`` per head block (m, k, P), summed over those entries only
        (a block's padded coupling columns would multiply the (m, c, P) memory)."""
        lay = self.layout
        Lhinv = _tri_inv(self.Lh)
        Dinv = jnp.einsum("mji,mjl->mil", Lhinv, Lhinv)
        if not lay.t:
            return Dinv, None, None, None, None, None
        Vhe = jnp.einsum("eji,ej->ei", Lhinv[lay.ent_b], self.We)
        V, Wt = self._probes()

        def per_block(P):
            return jax.ops.segment_sum(Vhe[:, :, None] * P[lay.ent_t][:, None, :], lay.ent_b, lay.m,
                                       indices_are_sorted=True)

        return Dinv, Vhe, V, Wt, per_block(Wt), per_block(V)

    def logdet_grad(self):
        """d logdet / d flat, estimated: ``H^-1`` on the head blocks ``D^-1 + Vh S^-1
        Vh'``, on the coupling ``-Vh S^-1`` (twice: stored once for both
        triangles; real entries only, padding stays zero) and on the tail's
        stored entries, with ``S^-1`` replaced by the symmetrized probe estimate
        ``(Wt V' + V Wt') / 2``."""
        lay = self.layout
        Dinv, Vhe, V, Wt, A, C = self._pieces()
        if not lay.t:
            return Dinv.reshape(-1)
        head = Dinv + (jnp.einsum("mir,mjr->mij", A, C) + jnp.einsum("mir,mjr->mij", C, A)) / 2
        b, t = lay.ent_b, lay.ent_t
        coup_e = -(jnp.einsum("ekr,er->ek", A[b], V[t]) + jnp.einsum("ekr,er->ek", C[b], Wt[t]))
        coup = jnp.zeros((lay.m, lay.c, lay.k), Dinv.dtype).at[b, lay.ent_c].set(coup_e)
        tr, tc = lay.tail_rows, lay.tail_cols
        tail = jnp.sum(Wt[tr] * V[tc] + V[tr] * Wt[tc], axis=1) / 2
        return jnp.concatenate([head.reshape(-1), jnp.swapaxes(coup, 1, 2).reshape(-1), tail])

    def diag_inverse(self):
        Dinv, _, V, Wt, A, C = self._pieces()
        dh = jnp.diagonal(Dinv, axis1=1, axis2=2)
        if not self.layout.t:
            return arrow_scatter(self.layout, dh, jnp.zeros((0,)))
        dh = dh + jnp.sum(A * C, axis=2)
        return arrow_scatter(self.layout, dh, jnp.sum(Wt * V, axis=1))

    def inverse_entries(self, rows, cols):
        lay = self.layout
        rows, cols = np.asarray(rows), np.asarray(cols)
        br, bc = lay.where_block[rows], lay.where_block[cols]
        if np.any((br != bc) | ((br < 0) != (bc < 0))):
            raise NotImplementedError("inverse entries across arrow blocks")
        Dinv, _, V, Wt, A, C = self._pieces()
        pr, pc = lay.where_pos[rows], lay.where_pos[cols]
        hb = np.maximum(br, 0)
        out_h = Dinv[hb, pr, pc]
        if not lay.t:
            return out_h
        out_h = out_h + jnp.sum(A[hb, pr] * C[hb, pc] + C[hb, pr] * A[hb, pc], axis=1) / 2
        tr, tc = np.where(br < 0, pr, 0), np.where(br < 0, pc, 0)
        out_t = jnp.sum(Wt[tr] * V[tc] + V[tr] * Wt[tc], axis=1) / 2
        return jnp.where(jnp.asarray(br >= 0), out_h, out_t)
