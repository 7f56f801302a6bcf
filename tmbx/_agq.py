"""Adaptive Gauss-Hermite quadrature (AGQ) over conditionally independent blocks.

When the latent effects split into blocks ``u = (u_1, ..., u_G)`` that the
joint nll couples only through the fixed parameters, ``f(x, u) = c(x) +
sum_g f_g(x, u_g)``, the marginal likelihood is a product of G
low-dimensional integrals. Each is computed with a product Gauss-Hermite
rule centred at the block's mode ``u*_g`` (the Laplace inner Newton solve)
and scaled by its curvature ``H_g = L_g L_g'`` (lme4's ``nAGQ``,
GLMMadaptive)::

    I_g = |L_g|^-1 sum_z w_z exp(-f_g(u*_g + L_g^-T z) + |z|^2 / 2)
    L(x) = c(x) - sum_g log I_g

with nodes ``z`` and weights ``w_z`` of the rule for the weight
``exp(-|z|^2/2)`` (``nagq`` points per dimension, ``nagq^k`` per block of
size ``k``). With ``nagq = 1`` (one node at 0, weight ``(2 pi)^(k/2)``) this
is the Laplace approximation. Gradients are exact: AD runs through the
quadrature, the block Cholesky factors and ``u*(x)`` (implicit, as in
`_laplace.py`).

Per-block terms ``f_g(u*_g + delta) - f_g(u*_g)`` at every node:

- latent-Gaussian templates (``eta`` linear in ``u``): every observation
  belongs to one block, so its linear predictor at a node is ``eta*_i +
  J_i delta_g(i)``; the observation nll is evaluated at all nodes at once
  (``nagq^k x N`` values) and summed per block. A quadratic latent density
  (Gaussian random effects) contributes ``g' delta + delta' H delta / 2``
  exactly, from one Hessian-vector product per node.
- any other template: ``nll(u* + delta_g e_g) - nll(u*)`` for each block
  separately (a sum over all blocks cannot be split), vmapped over blocks and
  nodes: ``G x nagq^k`` evaluations of the nll. Fine for small problems;
  declare a `LatentGaussian` for large ones.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from ._internal import LazyModule
from ._laplace import INNER_NONFINITE, INNER_NOT_PD, INNER_OK, INNER_SINGULAR

asdex = LazyModule("asdex")

MAX_NODES = 100_000  # nagq^k per block: beyond this the program is too large to be useful

_ALTERNATIVES = ("use the Laplace approximation (nagq=1) or sample the posterior "
                 "(fit.sample())")


def check_nagq(nagq) -> int:
    """``nagq`` as a positive int, or a clear error."""
    if (isinstance(nagq, (bool, np.bool_)) or not isinstance(nagq, numbers.Real)
            or not float(nagq).is_integer()):
        raise ValueError(
            f"nagq must be a positive integer (quadrature points per random effect; 1 is the "
            f"Laplace approximation), got {nagq!r}"
        )
    if nagq < 1:
        raise ValueError(
            f"nagq must be at least 1 (1 is the Laplace approximation; 5-25 adaptive Gauss-Hermite "
            f"points per random effect are typical), got {nagq}"
        )
    return int(nagq)


def gauss_hermite(nagq: int, k: int):
    """Product rule for ``int exp(-|z|^2/2) h(z) dz`` in k dimensions: nodes (M, k), log weights (M,)."""
    z, w = np.polynomial.hermite_e.hermegauss(nagq)
    grids = np.meshgrid(*([z] * k), indexing="ij")
    nodes = np.stack([g.reshape(-1) for g in grids], axis=1)
    logw = sum(np.meshgrid(*([np.log(w)] * k), indexing="ij")).reshape(-1)
    return nodes, logw


def block_labels(space, groups) -> np.ndarray:
    """Block label of each latent effect (length n_u), checked against the parameter space."""
    if not isinstance(groups, dict):
        raise TypeError(
            "groups must be a dict mapping each random parameter to an integer array of its shape "
            "giving the block of each element, e.g. groups={'u': np.arange(q)}"
        )
    unknown = [k for k in groups if k not in space.random]
    if unknown:
        raise ValueError(f"groups names {unknown} are not random parameters ({space.random})")
    missing = [k for k in space.random if k not in groups]
    if missing:
        raise ValueError(
            f"groups gives no blocks for the random parameters {missing}: AGQ needs every latent "
            f"effect in a block (REML's integrated fixed effects cannot be: fit by ML with AGQ)"
        )
    label = np.full(space.n_u, np.iinfo(np.int64).min, np.int64)
    for name in space.random:
        g = np.asarray(groups[name])
        if g.shape != space.shapes[name]:
            raise ValueError(f"groups[{name!r}] has shape {g.shape}; parameter {name!r} has shape "
                             f"{space.shapes[name]}: give one block label per element")
        if g.size and not np.issubdtype(g.dtype, np.integer):
            raise ValueError(f"groups[{name!r}] must hold integer block labels, got dtype {g.dtype}")
        idx = space.index[name]
        for pos, lab in zip(idx[idx >= 0], g.reshape(-1)[idx >= 0]):
            if label[pos] != np.iinfo(np.int64).min and label[pos] != lab:
                raise ValueError(f"map makes one latent effect of {name!r} shared by blocks "
                                 f"{label[pos]} and {lab}; blocks must not share effects")
            label[pos] = lab
    return label


class AGQ:
    """Adaptive Gauss-Hermite marginal of a `Model` whose latent effects form
    conditionally independent blocks (``groups``), ``nagq`` points per dimension."""

    def __init__(self, model, nagq, groups, latent_gaussian=None):
        self.nagq = check_nagq(nagq)
        if model.laplace is None:
            raise ValueError("nagq/groups apply to models with random effects (random=[...])")
        if groups is None:
            raise ValueError(
                "nagq > 1 needs the blocks of the random effects: pass groups={'u': labels}, an "
                "integer array per random parameter (e.g. the cluster of each random intercept)"
            )
        self.laplace = lap = model.laplace
        self.f = model.f
        hess = lap.hessian
        label = block_labels(model.space, groups)
        self.labels, block = np.unique(label, return_inverse=True)  # block: 0..G-1 per effect
        self._check_independent(block, hess.rows, hess.cols)
        self.block = block
        self.G = len(self.labels)
        # blocks grouped by size: each size class is one batched computation
        members = [np.nonzero(block == g)[0] for g in range(self.G)]
        sizes = np.array([len(m) for m in members])
        self.classes = []
        for k in np.unique(sizes):
            ids = np.nonzero(sizes == k)[0]
            elems = np.stack([members[g] for g in ids])  # (G_c, k)
            if self.nagq ** int(k) > MAX_NODES:
                raise ValueError(
                    f"nagq={self.nagq} with {k} random effects per block needs {self.nagq}^{k} "
                    f"quadrature nodes per block (more than {MAX_NODES}); lower nagq, or "
                    + _ALTERNATIVES)
            nodes, logw = gauss_hermite(self.nagq, int(k))
            self.classes.append({
                "ids": ids, "elems": elems, "k": int(k), "nodes": jnp.asarray(nodes),
                "logw": jnp.asarray(logw + 0.5 * np.sum(nodes**2, axis=1)),
                "slots": jnp.asarray(self._block_slots(hess, elems), jnp.int32)})
        self.lg = None
        if latent_gaussian is not None and hasattr(hess, "eta_fn"):
            self._setup_latent_gaussian(model, hess, latent_gaussian)

    # ----------------------------------------------------------------- setup
    def _check_independent(self, block, rows, cols):
        bad = np.nonzero(block[rows] != block[cols])[0]
        if bad.size:
            a, b = self.labels[block[rows[bad[0]]]], self.labels[block[cols[bad[0]]]]
            a, b = min(a, b), max(a, b)
            raise ValueError(
                f"random effects in blocks {a} and {b} interact (the Hessian of the joint nll "
                f"couples them): AGQ needs conditionally independent blocks, e.g. one grouping "
                f"factor's levels; " + _ALTERNATIVES)

    def _block_slots(self, hess, elems):
        """(G_c, k, k) positions of each block's Hessian entries in the layout's flat
        storage, extended by one zero slot for entries outside the sparsity pattern."""
        layout, n = hess.layout, len(self.block)
        zero = layout.size + 1  # flat storage ends with the dummy slot; one more is a zero
        r = np.broadcast_to(elems[:, :, None], elems.shape + (elems.shape[1],)).reshape(-1)
        c = np.broadcast_to(elems[:, None, :], elems.shape + (elems.shape[1],)).reshape(-1)
        pattern = np.isin(r * n + c, np.asarray(hess.rows) * n + np.asarray(hess.cols)) | (r == c)
        out = np.full(r.shape, zero, np.int64)
        if pattern.any():
            s1 = layout.slots(r[pattern], c[pattern])
            s2 = layout.slots(c[pattern], r[pattern])  # layouts may store one triangle only
            out[pattern] = np.where(s1 >= 0, s1, s2)
        return out.reshape(elems.shape + (elems.shape[1],))

    def _setup_latent_gaussian(self, model, hess, lg):
        """Observation -> block map from the Jacobian pattern of eta; is the latent density quadratic?"""
        sp = model.space
        x0, u0 = jnp.asarray(sp.start("x")), jnp.asarray(sp.start("u"))
        if lg.jacobian is not None:
            jr, jc = np.asarray(lg.jacobian[0], np.int64), np.asarray(lg.jacobian[1], np.int64)
        else:
            flat = lambda u: hess.eta_fn(x0, u, model.data).reshape(-1)
            pat = asdex.jacobian_coloring(flat, u0).sparsity
            jr, jc = np.asarray(pat.rows, np.int64), np.asarray(pat.cols, np.int64)
        obs = jr // hess.K
        obs_block = np.full(hess.N, self.G, np.int64)  # G: touches no random effect
        obs_block[obs] = self.block[jc]
        where = np.full(self.G, -1)
        for cl in self.classes:
            where[cl["ids"]] = np.arange(len(cl["ids"]))
            o = np.nonzero((obs_block < self.G) & np.isin(obs_block, cl["ids"]))[0]
            cl["obs"] = jnp.asarray(o, jnp.int32)  # observations of this class's blocks
            cl["obs_local"] = jnp.asarray(where[obs_block[o]], jnp.int32)
        self.lg = hess
        self.latent_quadratic = _is_quadratic(lambda u: hess.latent_nll(x0, u, model.data), u0)

    # ---------------------------------------------------------- the marginal
    def objective(self, x, u0, data):
        """``(L(x), (u*, status))``: the AGQ marginal nll, as `Laplace.objective`."""
        lap = self.laplace
        u, status = lap.u_star(x, jax.lax.stop_gradient(u0), data)
        flat = jnp.concatenate([lap.hessian(x, u, data), jnp.zeros(1)])
        val = self.f(x, u, data)
        pivots = []
        ctx = self._context(x, u, data)
        for cl in self.classes:
            H = flat[cl["slots"]]
            L = jnp.linalg.cholesky(H, symmetrize_input=True) if cl["k"] > 1 else jnp.sqrt(H)
            diag = jnp.diagonal(L, axis1=1, axis2=2)
            pivots.append(diag.reshape(-1))
            # node offsets delta = L^-T z for every block and node: (G_c, M, k)
            M = cl["nodes"].shape[0]
            zt = jnp.broadcast_to(cl["nodes"].T, (L.shape[0], cl["k"], M))
            delta = jnp.swapaxes(jsl.solve_triangular(L, zt, lower=True, trans=1), 1, 2)
            df = self._block_deltas(cl, x, u, data, delta, ctx)  # (G_c, M)
            lse = jax.nn.logsumexp(cl["logw"][None, :] - df, axis=1)
            val = val + jnp.sum(jnp.sum(jnp.log(diag), axis=1) - lse)
        piv = jax.lax.stop_gradient(jnp.abs(jnp.concatenate(pivots)))
        status = jnp.where((status == INNER_OK) & ~jnp.all(jnp.isfinite(piv)), INNER_NOT_PD, status)
        singular = jnp.min(piv) ** 2 < 1e-14 * jnp.max(piv) ** 2
        status = jnp.where((status == INNER_OK) & singular, INNER_SINGULAR, status)
        status = jnp.where((status == INNER_OK) & ~jnp.isfinite(val), INNER_NONFINITE, status)
        return val, (u, status)

    def _context(self, x, u, data):
        """Quantities at the mode shared by all size classes (latent-Gaussian path)."""
        if self.lg is None:
            return None
        lg = self.lg
        eta = lg.eta_fn(x, u, data)
        base = lg.obs_nll(eta, x, u, data)
        glat = jax.grad(lg.latent_nll, argnums=1)(x, u, data) if self.latent_quadratic else None
        return eta, base, glat

    def _block_deltas(self, cl, x, u, data, delta, ctx):
        """``f_g(u*_g + delta_gm) - f_g(u*_g)`` for each block g and node m: (G_c, M)."""
        if self.lg is None:
            return self._separately(lambda uu: self.f(x, uu, data), u, cl, delta)
        lg = self.lg
        eta, base, glat = ctx
        G, M, k = delta.shape
        # eta is linear in u and each observation sees one block: eta_i + J_i delta_g(i)
        J = jnp.stack([jax.jvp(lambda uu: lg.eta_fn(x, uu, data), (u,),
                               (jnp.zeros_like(u).at[cl["elems"][:, l]].set(1.0),))[1][cl["obs"]]
                       for l in range(k)])  # (k, n_obs[, K])
        d_obs = delta[cl["obs_local"]]  # (n_obs, M, k)
        shift = jnp.einsum("lo...,oml->mo...", J, d_obs)  # (M, n_obs[, K])
        eta_nodes = jnp.broadcast_to(eta, (M,) + eta.shape).at[:, cl["obs"]].add(shift)
        obs = jax.vmap(lambda e: lg.obs_nll(e, x, u, data)[cl["obs"]])(eta_nodes) - base[cl["obs"]]
        df = jax.ops.segment_sum(obs.T, cl["obs_local"], num_segments=G)  # (G, M)
        if self.latent_quadratic:
            full = self._scatter(u, cl, delta)  # (M, n_u): every block at its own node m
            hd = jax.vmap(lambda dv: jax.jvp(lambda uu: jax.grad(lg.latent_nll, argnums=1)(x, uu, data),
                                             (u,), (dv,))[1])(full)
            per_elem = full * (glat[None, :] + 0.5 * hd)
            df = df + jnp.sum(per_elem[:, cl["elems"]], axis=-1).T
        else:
            df = df + self._separately(lambda uu: lg.latent_nll(x, uu, data), u, cl, delta)
        return df

    @staticmethod
    def _scatter(u, cl, delta):
        """(M, n_u): node m's offsets of all blocks of the class in one vector."""
        M = delta.shape[1]
        return jnp.zeros((M,) + u.shape, u.dtype).at[:, cl["elems"]].set(jnp.swapaxes(delta, 0, 1))

    @staticmethod
    def _separately(fn, u, cl, delta):
        """``fn(u + delta_gm e_g) - fn(u)`` block by block: G_c x M evaluations of ``fn``."""
        f0 = fn(u)

        def one(elems, d):  # d: (k,) offsets of one block at one node
            return fn(u.at[elems].add(d)) - f0

        per_block = jax.vmap(one, in_axes=(None, 0))
        return jax.vmap(per_block, in_axes=(0, 0))(jnp.asarray(cl["elems"]), delta)


def _is_quadratic(fn, u0) -> bool:
    """True when ``fn`` is quadratic in u: its third directional derivatives vanish
    (checked along two random directions at two points)."""
    @jax.jit
    def derivs(at, v):
        d1 = lambda uu: jax.jvp(fn, (uu,), (v,))[1]
        d2 = lambda uu: jax.jvp(d1, (uu,), (v,))[1]
        return jax.jvp(d2, (at,), (v,))

    rng = np.random.default_rng(0)
    for _ in range(2):
        v = jnp.asarray(rng.standard_normal(u0.shape))
        d2, d3 = derivs(u0 + jnp.asarray(rng.standard_normal(u0.shape)), v)
        if not np.isfinite(float(d3)) or abs(float(d3)) > 1e-10 * (abs(float(d2)) + 1.0):
            return False
    return True
