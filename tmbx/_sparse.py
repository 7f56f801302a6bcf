"""Static layouts of sparse symmetric matrices and their Cholesky factorizations.

The Hessian of a joint negative log-likelihood with respect to the latent
effects is sparse, with a pattern that is known before any number is computed
(it is read off the template's jaxpr). This module turns such a pattern into a
*layout*: a fixed storage of small dense blocks that XLA factorizes with
batched dense Cholesky, so that everything jit-compiles, vmaps over batches of
data sets and runs on a GPU. We write these by hand because no maintained JAX
library offers a jit/vmap/GPU-capable sparse Cholesky with a differentiable
log-determinant; the block forms below are the ones mixed-model codes rely on
(MixedModels.jl's blocked Cholesky; banded Cholesky for GMRFs).

Three layouts, chosen by predicted cost (`choose_layout`):

- `DenseLayout`: a dense n x n matrix. Small problems whose pattern does not
  split into blocks.
- `ArrowLayout`: a block-diagonal head (m blocks of size <= k, e.g. one block
  per level of the largest grouping factor) coupled sparsely to a dense tail
  (the other factors' levels). The tail's Schur complement is accumulated
  from per-block contributions, so the coupling is never dense. With no tail
  it is a block-diagonal factorization, used even for small patterns
  (`_block_diagonal`).
- `BandedLayout`: reverse Cuthill-McKee ordering, then a block-tridiagonal
  Cholesky with blocks of the bandwidth (lattice GMRFs such as AR1 x AR1).

Every layout stores values in one flat vector. `slots(rows, cols)` maps matrix
entries to positions in it, so callers assemble a matrix with one scatter-add
(`flat.at[slots].add(values)`), and `factor(flat)` returns a factorization
with `logdet()`, `solve(b)` and `diag_inverse()`. Indices refer to the
original (unpermuted) numbering throughout; permutations stay inside.

The log-determinant has its own derivative rule (`logdet`): ``d log det H =
sum_ij (H^-1)_ij dH_ij`` needs ``H^-1`` only on the stored pattern (the
*selected inverse*: Takahashi's recursion on the factor), so neither reverse
mode through the factorization (a backward pass over every block operation)
nor its compile time is ever paid. Each factor's `logdet_grad()` returns that
selected inverse laid out like ``flat``; the rule is a `jax.custom_jvp`, so it
can be differentiated again (forward mode through the recursion) for exact
second derivatives.
"""

from __future__ import annotations

import copy
import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import scipy.sparse as sps
from scipy.sparse.csgraph import connected_components, reverse_cuthill_mckee

from . import _dense
from ._internal import unique_sorted


def _chol(a):
    if a.shape[-1] == 1:  # 1 x 1 blocks (one random intercept per level): no LAPACK call
        return jnp.sqrt(a)
    # symmetrize_input keeps the factor well defined under rounding
    return jnp.linalg.cholesky(a, symmetrize_input=True)


def _tri_solve(L, b, trans=False):
    if L.shape[-1] == 1:
        return b / L[..., :1, :1] if b.ndim == L.ndim else b / L[..., 0, :1]
    return jsl.solve_triangular(L, b, lower=True, trans=1 if trans else 0)


def _logdiag(L):
    return jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)))


#: the order from which `_tri_inv` splits a factor in two
TRI_INV_SPLIT = 64


def _tri_inv(L):
    """L^-1 of a (batch of) lower-triangular factor(s).

    From order `TRI_INV_SPLIT` by 2 x 2 blocks, ``[[A, 0], [C, B]]^-1 =
    [[A^-1, 0], [-B^-1 C A^-1, B^-1]]``: LAPACK's triangular solve against the
    identity costs ``n^3`` (it cannot skip the identity's zeros) where the
    inverse needs ``n^3 / 3``, and the off-diagonal block is then two
    (batched, multi-threaded) matrix products. ar1xar1 100 x 100's 100 blocks
    of 101: 3 ms against 9-17 ms, a third of its selected inverse.

    ``A`` (padded with a unit diagonal to ``B``'s order) and ``B`` are inverted
    in one batched call: two independent batched LAPACK calls in one program
    can deadlock jaxlib's CPU thread pool (`tmbx._config._xla_flags`; it hung
    `sdreport` when they were two)."""
    n = L.shape[-1]
    if n < TRI_INV_SPLIT:
        eye = jnp.broadcast_to(jnp.eye(n, dtype=L.dtype), L.shape)
        return _tri_solve(L, eye)
    h = n // 2
    m = n - h
    A, B, C = L[..., :h, :h], L[..., h:, h:], L[..., h:, :h]
    if m > h:
        pad = [(0, 0)] * (L.ndim - 2) + [(0, m - h), (0, m - h)]
        A = jnp.pad(A, pad).at[..., h:, h:].set(jnp.eye(m - h, dtype=L.dtype))
    both = _tri_inv(jnp.stack([A, B]))
    Ai, Bi = both[0][..., :h, :h], both[1]
    X = -(Bi @ (C @ Ai))
    zeros = jnp.zeros(L.shape[:-2] + (h, m), L.dtype)
    return jnp.concatenate([jnp.concatenate([Ai, zeros], axis=-1), jnp.concatenate([X, Bi], axis=-1)], axis=-2)


def _recursive(n: int) -> bool:
    """Whether a dense factor of order ``n`` goes through `tmbx._dense`'s recursive
    blocking (on the CPU above its block size) rather than one LAPACK call."""
    return n > _dense.BLOCK and jax.default_backend() == "cpu"


def _chol_inverse(L):
    """``S^-1`` from the Cholesky factor ``L`` of ``S``, for one dense factor.

    Above `_dense.BLOCK` on the CPU this is ``(L^-T)(L^-T)'`` by recursive
    blocking in matrix products (`tmbx._dense`): LAPACK's ``dpotri`` flop count
    at XLA's multi-threaded matrix-product speed, as fast as ``dpotri`` itself on
    every core and a third of the time of ``cho_solve(L, I)`` (two single-threaded
    triangular solves of ``n^3`` flops each), and differentiable like any XLA
    program. Otherwise (small factors, GPU) one ``cho_solve``.
    """
    n = L.shape[-1]
    if L.ndim == 2 and _recursive(n):
        return _dense.upper_gram(_dense.upper_inverse(L.T))
    return jsl.cho_solve((L, True), jnp.broadcast_to(jnp.eye(n, dtype=L.dtype), L.shape))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def logdet(layout, flat):
    """``log det H`` of the symmetric matrix that ``layout`` stores in ``flat``.

    Every layout factorizes the symmetrized matrix, so ``d log det H =
    tr(H^-1 dH)`` sums ``(H^-1)_ij`` over the matrix entries that each storage
    slot feeds: ``Sigma_ij`` for a slot read once (both triangles stored) and
    ``2 Sigma_ij`` for an off-diagonal slot that stands for ``(i, j)`` and
    ``(j, i)``. The factor's `logdet_grad` computes exactly that.
    """
    return layout.factor(flat)._logdet()


def for_logdet(F):
    """``F`` as its log-determinant and gradient will use it: the linear-cost
    path's factor computes its deflation basis here, once for both
    (`IterativeArrowFactor.with_deflation`); every other factor is ready as is."""
    prepare = getattr(F, "with_deflation", None)
    return prepare() if prepare is not None else F


@logdet.defjvp
def _logdet_jvp(layout, primals, tangents):
    (flat,), (dflat,) = primals, tangents
    F = for_logdet(layout.factor(flat))
    return F._logdet(), jnp.sum(F.logdet_grad() * dflat)


#: index arrays above this many entries travel as a program's arguments rather
#: than as its constants (constants of ~10^7 entries cost seconds of compilation
#: and make the cached executable tens of megabytes)
INDEX_MIN_SIZE = 10_000


def large_arrays(obj, names) -> list[str]:
    """Those of ``obj``'s attributes ``names`` that hold more than `INDEX_MIN_SIZE`
    entries: the ones a program takes as arguments (`with_arrays`)."""
    return [a for a in names if np.size(getattr(obj, a, None)) > INDEX_MIN_SIZE]


def with_arrays(obj, arrays: dict):
    """A shallow copy of ``obj`` (a layout, a Hessian evaluator) whose attributes
    ``arrays`` names are replaced, inside a trace, by the program's arguments."""
    out = copy.copy(obj)
    for name, value in arrays.items():
        setattr(out, name, value)
    return out


class _Layout:
    """Plain (non-pytree) static description; fields set by keyword."""

    iterative = None  # `IterativeOptions` on the linear-cost path (arrow layouts only)
    #: whether inner Newton steps may factorize in single precision
    #: (`tmbx._laplace.Laplace._newton_factor`): where the factorization is
    #: LAPACK's and XLA's matrix products (dense, banded), which run twice as
    #: fast in single precision. Not an arrow layout's: its factorization is
    #: mostly gathers of the coupling pairs, and on the crossed Bernoulli
    #: ladder single precision gained nothing (1e5 rows: 0.92 s a fit either
    #: way; 1e6 rows, a 3,000-level dense tail: 13.8 s against 13.2 s) for a
    #: second copy of the Newton iteration to compile (1 s at 1e5, 9 s at 1e6)
    mixed = False
    #: the order of the largest dense block it factors: a dense layout's n, an
    #: arrow's tail, a banded layout's blocks (`tmbx._config.fit_compile_options`)
    dense_order = 0

    def __init__(self, **fields):
        for k, v in fields.items():
            setattr(self, k, v)


# --------------------------------------------------------------------------
# Dense


class DenseLayout(_Layout):
    """A dense ``n x n`` matrix stored row-major."""

    n: int
    mixed = True

    @property
    def size(self) -> int:
        return self.n * self.n

    @property
    def dense_order(self) -> int:
        return self.n

    @property
    def kind(self) -> str:
        return "dense"

    def slots(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return np.asarray(rows, np.int64) * self.n + np.asarray(cols, np.int64)

    def padding(self) -> np.ndarray:
        return np.zeros(self.size)

    def diag_slots(self) -> np.ndarray:
        i = np.arange(self.n)
        return self.slots(i, i)

    def cost(self) -> float:
        return self.n**3 / 3.0

    def to_dense(self, flat):
        return flat.reshape(self.n, self.n)

    def factor(self, flat) -> "DenseFactor":
        return DenseFactor(layout=self, flat=flat, L=_chol(flat.reshape(self.n, self.n)))


class DenseFactor(eqx.Module):
    layout: DenseLayout = eqx.field(static=True)
    flat: jax.Array  # the factorized storage (for `logdet`'s derivative rule)
    L: jax.Array

    def logdet(self):
        return logdet(self.layout, self.flat)

    def _logdet(self):
        return 2.0 * _logdiag(self.L)

    def logdet_grad(self):
        """d logdet / d flat: the full inverse (every entry is stored)."""
        return _chol_inverse(self.L).reshape(-1)

    def ok(self):
        return jnp.all(jnp.isfinite(jnp.diagonal(self.L)))

    def pivots(self):
        return jnp.diagonal(self.L)

    def solve(self, b):
        return jsl.cho_solve((self.L, True), b)

    def diag_inverse(self):
        Linv = _tri_inv(self.L)
        return jnp.sum(Linv**2, axis=0)

    def inverse_entries(self, rows, cols):
        """Entries (rows[i], cols[i]) of H^-1."""
        Linv = _tri_inv(self.L)
        return jnp.sum(Linv[:, rows] * Linv[:, cols], axis=0)


# --------------------------------------------------------------------------
# Arrow: block-diagonal head + sparse coupling + dense tail


class ArrowLayout(_Layout):
    """Block-diagonal head (``m`` blocks of size ``k``), dense tail (``t``).

    ``head[b, j]`` is the original index of position ``j`` of head block ``b``
    (``-1`` for padding); ``tail[j]`` the original index of tail position ``j``.
    ``cols[b, c]`` lists the tail positions that head block ``b`` couples to
    (padded with position 0 and zero values).
    Storage: head blocks ``(m, k, k)``, coupling ``(m, k, c)``, tail ``(t, t)``.
    """

    n: int
    m: int
    k: int
    t: int
    c: int
    head: np.ndarray
    tail: np.ndarray
    cols: np.ndarray
    # lookup tables (numpy, static)
    where_block: np.ndarray  # original -> block (-1: tail)
    where_pos: np.ndarray  # original -> position in block/tail
    coupling_keys: np.ndarray  # sorted block * t + tail pos
    coupling_idx: np.ndarray  # c index of each key
    ncoup: np.ndarray  # (m,): real coupling columns of each block (the first ncoup of its c)
    # on the linear-cost path (`tmbx._iterative`) the tail is stored on its
    # pattern only (sorted keys row * t + col, both triangles, the diagonal
    # always) instead of densely
    tail_keys = None
    #: index arrays that traced code reads only through jax operations: a program
    #: may take them as arguments instead of embedding them as constants
    #: (`tmbx._laplace.Laplace.index_data`, `tmbx.formula._lmm`)
    TRACEABLE = ("pair_b", "pair_i", "pair_j", "pair_dest", "cols", "ncoup", "ent_t", "ent_flat",
                 "tail_rows", "tail_cols", "tail_diag", "pair_seg", "tail_seg", "off_rows", "off_cols",
                 "ent_b", "ent_c", "ent_perm", "ent_t_sorted")

    @property
    def kind(self) -> str:
        return "arrow"

    @property
    def dense_order(self) -> int:
        return self.t

    @property
    def _tail_size(self) -> int:
        return self.t * self.t if self.tail_keys is None else len(self.tail_keys)

    @property
    def size(self) -> int:
        return self.m * self.k * self.k + self.m * self.k * self.c + self._tail_size

    def cost(self) -> float:
        return self.m * (self.k**3 / 3 + self.k**2 * self.c + self.k * self.c**2) + self.t**3 / 3

    def slots(self, rows, cols):
        rows = np.asarray(rows, np.int64)
        cols = np.asarray(cols, np.int64)
        out = np.full(rows.shape, -1, np.int64)
        br, bc = self.where_block[rows], self.where_block[cols]
        pr, pc = self.where_pos[rows], self.where_pos[cols]
        hh = (br >= 0) & (bc >= 0)
        if np.any(hh & (br != bc)):
            raise ValueError("pattern entry couples two head blocks of an arrow layout")
        out[hh] = (br[hh] * self.k + pr[hh]) * self.k + pc[hh]
        off = self.m * self.k * self.k
        ht = (br >= 0) & (bc < 0)
        if np.any(ht):
            keys = br[ht] * self.t + pc[ht]
            at = np.searchsorted(self.coupling_keys, keys)
            cidx = self.coupling_idx[np.minimum(at, len(self.coupling_keys) - 1)]
            out[ht] = off + (br[ht] * self.k + pr[ht]) * self.c + cidx
        # tail-head entries are the transpose of head-tail ones: stored once
        tt = (br < 0) & (bc < 0)
        key = pr[tt] * self.t + pc[tt]
        if self.tail_keys is not None:
            at = np.searchsorted(self.tail_keys, key)
            if np.any(self.tail_keys[np.minimum(at, len(self.tail_keys) - 1)] != key):
                raise ValueError("pattern entry outside the arrow layout's tail pattern")
            key = at
        out[tt] = off + self.m * self.k * self.c + key
        return out

    def padding(self) -> np.ndarray:
        pad = np.zeros(self.size)
        b, j = np.nonzero(self.head < 0)
        pad[(b * self.k + j) * self.k + j] = 1.0
        return pad

    def diag_slots(self) -> np.ndarray:
        i = np.arange(self.n)
        return self.slots(i, i)

    def cmask(self):
        """(m, c): 1 for a block's real coupling columns, 0 for padding. Built in the
        program from ``ncoup`` (a block's columns are its first ``ncoup``): as a
        constant the (m, c) mask made InstEval's compiled program 5 MB larger."""
        return (jnp.arange(self.c)[None, :] < self.ncoup[:, None]).astype(jnp.float64)

    def _split(self, flat):
        m, k, c, t = self.m, self.k, self.c, self.t
        o1 = m * k * k
        o2 = o1 + m * k * c
        if self.tail_keys is not None:  # the tail's stored entries, (nnz,)
            return flat[:o1].reshape(m, k, k), flat[o1:o2].reshape(m, k, c), flat[o2:]
        return (flat[:o1].reshape(m, k, k), flat[o1:o2].reshape(m, k, c), flat[o2:].reshape(t, t))

    def _dense_tail(self, T):
        if self.tail_keys is None:
            return T
        return jnp.zeros(self.t * self.t, T.dtype).at[self.tail_keys].set(T).reshape(self.t, self.t)

    def to_dense(self, flat):
        D, B, T = self._split(flat)
        T = self._dense_tail(T)
        out = jnp.zeros((self.n + 1, self.n + 1))
        h = np.where(self.head < 0, self.n, self.head)
        out = out.at[h[:, :, None], h[:, None, :]].add(D)
        tc = self.tail[self.cols]  # (m, c)
        out = out.at[h[:, :, None], tc[:, None, :]].add(B)
        out = out.at[tc[:, :, None], h[:, None, :]].add(jnp.swapaxes(B, 1, 2))
        out = out.at[self.tail[:, None], self.tail[None, :]].add(T)
        return out[: self.n, : self.n]

    def factor(self, flat) -> "ArrowFactor":
        D, B, T = self._split(flat)
        # padded coupling columns never hold values; zeroing them keeps the factor
        # (and so `logdet_grad`) an exact function of the real entries alone
        B = B * self.cmask().astype(B.dtype)[:, None, :]
        Lh = _chol(D)
        W = jax.vmap(_tri_solve)(Lh, B)  # Lh^-1 B   (m, k, c)
        if self.iterative is not None:
            from ._iterative import IterativeArrowFactor

            return IterativeArrowFactor.build(self, flat, D, B, T, Lh, W)
        T = self._dense_tail(T)
        S = T
        if self.t:
            # B' D^-1 B on its upper triangle (the pairs i <= j), mirrored
            contrib = jnp.sum(W[self.pair_b, :, self.pair_i] * W[self.pair_b, :, self.pair_j], axis=-1)
            U = jnp.zeros(self.t * self.t, T.dtype).at[self.pair_dest].add(contrib, indices_are_sorted=True)
            U = U.reshape(T.shape)
            S = T - U - U.T + jnp.diag(jnp.diagonal(U))
            if _recursive(self.t):
                # the factor and L^-T together: S^-1 (for the gradient) is then
                # one product away, and XLA drops L^-T where nothing needs it
                Lt, Mt = _dense.chol_with_inverse(S)
            else:
                Lt, Mt = _chol(S), None
        else:
            Lt, Mt = jnp.zeros((0, 0)), None
        return ArrowFactor(layout=self, flat=flat, Lh=Lh, W=W, Lt=Lt, Mt=Mt)


class ArrowFactor(eqx.Module):
    layout: ArrowLayout = eqx.field(static=True)
    flat: jax.Array
    Lh: jax.Array
    W: jax.Array
    Lt: jax.Array
    Mt: jax.Array | None = None  # Lt^-T, when the tail went through `_dense`

    def _tail_inverse(self):
        """S^-1 of the tail's Schur complement."""
        if self.Mt is not None:
            return _dense.upper_gram(self.Mt)
        return _chol_inverse(self.Lt)

    def logdet(self):
        return logdet(self.layout, self.flat)

    def _logdet(self):
        return 2.0 * (_logdiag(self.Lh) + _logdiag(self.Lt))

    def ok(self):
        return jnp.all(jnp.isfinite(self.pivots()))

    def pivots(self):
        return jnp.concatenate([jnp.diagonal(self.Lh, axis1=1, axis2=2).ravel(), jnp.diagonal(self.Lt)])

    def _gather(self, b):
        return arrow_gather(self.layout, b)

    def _scatter(self, xh, xt):
        return arrow_scatter(self.layout, xh, xt)

    def solve(self, b):
        def tail(rt):
            return _tri_solve(self.Lt, _tri_solve(self.Lt, rt), trans=True)

        return arrow_solve(self.layout, self.Lh, self.W, b, tail)

    def _selected_inverse(self):
        """Sigma = H^-1 on the arrow's storage: head blocks ``(m, k, k)``, head-tail
        coupling ``(m, k, c)`` and tail ``(t, t)``.

        With ``H = [[D, B], [B', T]]``, ``S = T - B' D^-1 B = Lt Lt'`` and
        ``V = D^-1 B = Lh^-T W``: ``Sigma_tail = S^-1``, ``Sigma_head-tail =
        -V S^-1`` and ``Sigma_head = D^-1 + V S^-1 V'``, each needed only on the
        coupling columns of its block.
        """
        lay = self.layout
        Lhinv = _tri_inv(self.Lh)  # (m, k, k)
        head = jnp.einsum("mji,mjl->mil", Lhinv, Lhinv)  # D^-1 blocks
        if not lay.t:
            return head, jnp.zeros((lay.m, lay.k, 0)), jnp.zeros((0, 0))
        Sinv = self._tail_inverse()
        V = jnp.einsum("mji,mjc->mic", Lhinv, self.W)  # (m, k, c)
        VS = self._times_coupled_inverse(V, Sinv)
        head = head + jnp.einsum("mid,mld->mil", VS, V)
        return head, -VS, Sinv

    def _times_coupled_inverse(self, V, Sinv):
        """``V S^-1[cols, cols]`` per head block, (m, k, c), summed over the
        layout's real coupling pairs (``i <= j``: ``V[:, i] S_ij`` feeds column
        ``j`` and, off the diagonal, ``V[:, j] S_ij`` column ``i``), not through a
        padded (m, c, c) gather of ``S^-1``: blocks of crossed designs couple to
        very different numbers of tail levels, and the padded gather is several
        times the memory traffic (at 1e6 crossed rows it took a gradient from
        0.44 to 0.58 s)."""
        lay = self.layout
        m, k, c = V.shape
        pb, pi, pj = lay.pair_b, lay.pair_i, lay.pair_j
        s = Sinv.reshape(-1)[lay.pair_dest]
        s_off = jnp.where(pi == pj, 0.0, s)
        terms = jnp.concatenate([V[pb, :, pi] * s[:, None], V[pb, :, pj] * s_off[:, None]])
        dest = jnp.concatenate([pb * c + pj, pb * c + pi])
        VS = jax.ops.segment_sum(terms, dest, m * c)  # (m c, k)
        return jnp.swapaxes(VS.reshape(m, c, k), 1, 2)

    def logdet_grad(self):
        """d logdet / d flat: Sigma on the head blocks and the tail (both triangles
        stored), twice Sigma on the coupling (stored once for both triangles)."""
        head, coup, tail = self._selected_inverse()
        coup = 2.0 * coup * self.layout.cmask()[:, None, :]
        return jnp.concatenate([head.reshape(-1), coup.reshape(-1), tail.reshape(-1)])

    def inverse_entries(self, rows, cols):
        """Entries (rows[i], cols[i]) of H^-1 on the arrow's own pattern (the
        selected inverse): pairs inside one head block, inside the tail, or
        between a head block and a tail level it couples to (either order)."""
        lay = self.layout
        rows, cols = np.asarray(rows), np.asarray(cols)
        # head-tail pairs with the head first (H^-1 is symmetric)
        swap = (lay.where_block[rows] < 0) & (lay.where_block[cols] >= 0)
        rows, cols = np.where(swap, cols, rows), np.where(swap, rows, cols)
        br, bc = lay.where_block[rows], lay.where_block[cols]
        pr, pc = lay.where_pos[rows], lay.where_pos[cols]
        ht = (br >= 0) & (bc < 0)
        if np.any((br != bc) & ~ht):
            raise NotImplementedError("inverse entries between two head blocks of an arrow layout")
        ci = np.zeros(rows.shape, np.int64)
        if np.any(ht):
            keys = br[ht] * lay.t + pc[ht]
            at = np.minimum(np.searchsorted(lay.coupling_keys, keys), len(lay.coupling_keys) - 1)
            if np.any(lay.coupling_keys[at] != keys):
                raise NotImplementedError("inverse entries off an arrow layout's coupling pattern")
            ci[ht] = lay.coupling_idx[at]
        head, coup, Sinv = self._selected_inverse()
        if not lay.t:
            Sinv = jnp.zeros((1, 1))
        hb = np.maximum(br, 0)
        out_h = head[hb, np.where(br >= 0, pr, 0), np.where((br >= 0) & ~ht, pc, 0)]
        out_t = Sinv[np.where(br < 0, pr, 0), np.where(br < 0, pc, 0)]
        out = jnp.where(jnp.asarray(br >= 0), out_h, out_t)
        if np.any(ht):
            out = jnp.where(jnp.asarray(ht), coup[hb, pr, ci], out)
        return out

    def diag_inverse(self):
        """Diagonal of H^-1 without forming it: ``diag(D^-1) + diag(V S^-1 V')`` per
        head block (``V = Lh^-T W``), from `_times_coupled_inverse` (the layout's
        real coupling pairs) without forming the head blocks of ``H^-1``;
        ``diag(S^-1)`` on the tail."""
        lay = self.layout
        Lhinv = _tri_inv(self.Lh)  # (m, k, k)
        dh = jnp.sum(Lhinv**2, axis=1)  # (m, k)
        if not lay.t:
            return self._scatter(dh, jnp.zeros((0,)))
        Sinv = self._tail_inverse()
        V = jnp.einsum("mji,mjc->mic", Lhinv, self.W)  # (m, k, c)
        dh = dh + jnp.sum(V * self._times_coupled_inverse(V, Sinv), axis=2)
        return self._scatter(dh, jnp.diagonal(Sinv))


# Every gather and scatter below indexes with one flat index array, and the
# head-tail coupling is summed over its real entries alone. On XLA:GPU (jaxlib
# 0.11.2, an H100) the solve's ``bt.at[cols].add(upd)``, a scatter of the padded
# (m, c) coupling into the tail, took 29 ms at 1e5 crossed Bernoulli rows
# (m = 14,272 blocks, c = 15, 948 tail levels) and was most of a fit's time;
# the same sum as a segment sum over the 80,549 real entries took 0.13 ms
# (spreading the padding over the tail did not help: 31 ms). Scatters into a
# small array are a known XLA:GPU weak spot (jax-ml/jax#38806).


def _coupled_to_tail(lay, V):
    """``sum_c V[b, c] -> tail position cols[b, c]`` over real couplings: (m, c, ...) -> (t, ...)."""
    m, c = V.shape[:2]
    vals = V.reshape((m * c,) + V.shape[2:])[lay.ent_flat]
    return jax.ops.segment_sum(vals, lay.ent_t, lay.t)


def _tail_to_coupled(lay, x):
    """``x[cols[b, c]]`` on real couplings, zero on padding: (t, ...) -> (m, c, ...)."""
    m, c = lay.m, lay.c
    out = jnp.zeros((m * c,) + x.shape[1:], x.dtype)
    out = out.at[lay.ent_flat].set(x[lay.ent_t], indices_are_sorted=True, unique_indices=True)
    return out.reshape((m, c) + x.shape[1:])


def _head_index(lay):
    """Flat head positions as indices into ``b`` extended by one zero per padded
    position: distinct dummies make the scatter back a plain unique-index store."""
    h = lay.head.reshape(-1).copy()
    pad = h < 0
    h[pad] = lay.n + np.arange(int(pad.sum()))
    return h, int(pad.sum())


def _run_start(idx) -> int | None:
    """``s`` where ``idx == s + arange(len(idx))`` (a slice does), else None."""
    idx = np.asarray(idx)
    if idx.size and idx[0] >= 0 and np.array_equal(idx, idx[0] + np.arange(idx.size)):
        return int(idx[0])
    return None


def arrow_gather(lay, b):
    """``b`` (n, ...) split into head blocks (m, k, ...) and tail (t, ...): slices
    where the head and the tail are runs of consecutive indices, as for crossed
    factors' levels (index arrays there are constants the size of the levels)."""
    h, npad = _head_index(lay)
    sh, st = _run_start(h), _run_start(lay.tail)
    # (padding's dummies extend the run when the head's last block is padded)
    bpad = jnp.concatenate([b, jnp.zeros((npad,) + b.shape[1:], b.dtype)]) if npad else b
    bh = bpad[sh:sh + h.size] if sh is not None else bpad[h]
    bt = b[st:st + lay.t] if st is not None else b[lay.tail]
    return bh.reshape(lay.head.shape + b.shape[1:]), bt


def arrow_scatter(lay, xh, xt):
    """The inverse of `arrow_gather`."""
    h, npad = _head_index(lay)
    xh = xh.reshape((h.size,) + xh.shape[2:])
    sh, st = _run_start(h), _run_start(lay.tail)
    if sh == 0 and st == h.size and h.size + lay.t == lay.n:
        return jnp.concatenate([xh, xt])
    if st == 0 and sh == lay.t and h.size + lay.t == lay.n:
        return jnp.concatenate([xt, xh])
    out = jnp.zeros((lay.n + npad,) + xh.shape[1:], xh.dtype)
    out = out.at[h].set(xh, unique_indices=True)
    out = out.at[lay.tail].set(xt, unique_indices=True)
    return out[: lay.n]


def arrow_solve(lay, Lh, W, b, tail_solve):
    """``H^-1 b`` (``b`` of shape (n,) or (n, r)) by block elimination of the head
    (Cholesky factors ``Lh``, ``W = Lh^-1 B``), with ``tail_solve`` applying the
    tail's Schur complement's inverse to (t, r) blocks."""
    bh, bt = arrow_gather(lay, jnp.asarray(b))
    vec = bh.ndim == 2
    if vec:
        bh, bt = bh[..., None], bt[..., None]
    yh = jax.vmap(_tri_solve)(Lh, bh)  # (m, k, r)
    if lay.t:
        upd = jnp.einsum("mkc,mkr->mcr", W, yh)
        xt = tail_solve(bt - _coupled_to_tail(lay, upd))
        yh = yh - jnp.einsum("mkc,mcr->mkr", W, _tail_to_coupled(lay, xt))
    else:
        xt = bt
    xh = jax.vmap(lambda L, y: _tri_solve(L, y, trans=True))(Lh, yh)
    if vec:
        xh, xt = xh[..., 0], xt[..., 0]
    return arrow_scatter(lay, xh, xt)


def _stable_argsort(a: np.ndarray) -> np.ndarray:
    """``np.argsort(a, kind="stable")`` for non-negative integers, as an
    unstable sort of ``a * len(a) + position`` (distinct keys, so the same
    order): NumPy's stable sort of 32-bit integers is a timsort, 5x slower than
    its quicksort on a million random keys."""
    n = a.size
    if n == 0 or n >= 2**31 or int(a.max()) >= 2**62 // n:  # (a key a * n + position must fit in int64)
        return np.argsort(a, kind="stable")
    return np.argsort(a.astype(np.int64) * n + np.arange(n, dtype=np.int64))


def _block_upper_pairs(nvalid: np.ndarray):
    """``(block, i, j)`` for every ``i <= j < nvalid[block]``, block by block and
    row-major within a block. Blocks with the same count share one
    `np.triu_indices` pattern: a crossed design has 10^5-10^6 blocks but only a
    few distinct counts, and building the full squares to keep half of them took
    most of a second at 10^6 rows."""
    counts = nvalid * (nvalid + 1) // 2
    offs = np.concatenate([[0], np.cumsum(counts)[:-1]])
    total = int(counts.sum())
    # int32 (blocks and coupling counts are far below 2^31): half the memory
    # traffic of the sorts and gathers over 10^7 pairs that follow
    pb = np.repeat(np.arange(len(nvalid), dtype=np.int32), counts)
    pi = np.empty(total, np.int32)
    pj = np.empty(total, np.int32)
    for n in np.unique(nvalid[nvalid > 0]):
        blocks = np.nonzero(nvalid == n)[0]
        ti, tj = np.triu_indices(int(n))
        at = (offs[blocks][:, None] + np.arange(ti.size)[None, :]).reshape(-1)
        pi[at] = np.tile(ti, blocks.size)
        pj[at] = np.tile(tj, blocks.size)
    return pb, pi, pj


def arrow_layout(n: int, rows: np.ndarray, cols: np.ndarray, tail: np.ndarray,
                 iterative=None) -> ArrowLayout:
    """Arrow layout of a symmetric pattern given the tail (dense) index set;
    with ``iterative`` (`IterativeOptions`), the tail is stored on its pattern
    and factorized by the linear-cost path."""
    tail = unique_sorted(np.asarray(tail, np.int64))
    is_tail = np.zeros(n, bool)
    is_tail[tail] = True
    head_nodes = np.nonzero(~is_tail)[0]
    keep = ~is_tail[rows] & ~is_tail[cols]
    g = sps.coo_matrix((np.ones(keep.sum()), (rows[keep], cols[keep])), shape=(n, n))
    ncomp, lab = connected_components(g, directed=False)
    lab_h = lab[head_nodes]
    uniq, comp = np.unique(lab_h, return_inverse=True)
    m = len(uniq)
    sizes = np.bincount(comp, minlength=m) if m else np.zeros(0, np.int64)
    k = int(sizes.max()) if m else 0
    head = np.full((m, max(k, 1) if m else 0), -1, np.int64)
    order = np.argsort(comp, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if m else np.zeros(0, np.int64)
    where_block = np.full(n, -1, np.int64)
    where_pos = np.zeros(n, np.int64)
    if m:
        blk = comp[order]
        pos = np.arange(order.size) - starts[blk]
        node = head_nodes[order]
        head[blk, pos] = node
        where_block[node] = blk
        where_pos[node] = pos
    where_pos[tail] = np.arange(len(tail))
    k = head.shape[1] if m else 0
    # coupling columns per block
    ht = (where_block[rows] >= 0) & is_tail[cols]
    t = len(tail)
    keys = unique_sorted(where_block[rows[ht]] * t + where_pos[cols[ht]])  # sorted
    kb = keys // t if t else keys
    # rank of each key within its block
    first = np.searchsorted(kb, kb, side="left")
    cidx = np.arange(len(keys)) - first
    c = int(cidx.max()) + 1 if len(keys) else 0
    colsarr = np.zeros((m, max(c, 1) if t else 0), np.int64)
    if len(keys):
        colsarr[kb, cidx] = keys % t
    # the Schur complement's updates: only real coupling pairs of each block (a
    # padded c x c block per head block wastes work when couplings vary in number),
    # and of those only i <= j (a block's columns are sorted, so these fall on the
    # upper triangle; the factor mirrors them), sorted by destination so the
    # scatter is a sorted segment sum
    if len(keys):
        nvalid = np.bincount(kb, minlength=m)
        pb, pi, pj = _block_upper_pairs(nvalid)
        cl = colsarr.astype(np.int32) if t * t < 2**31 else colsarr
        dest = cl[pb, pi] * cl.dtype.type(t) + cl[pb, pj]
        order = _stable_argsort(dest)
        pair_b, pair_i, pair_j, pair_dest = pb[order], pi[order], pj[order], dest[order]
    else:
        pair_b = pair_i = pair_j = pair_dest = np.zeros(0, np.int64)
    # the real couplings as entries (block, coupling column, tail position), sorted
    # by block; ``ent_flat`` indexes the (m, c) coupling storage
    ent_b = np.repeat(np.arange(m), np.bincount(kb, minlength=m)) if len(keys) else np.zeros(0, np.int64)
    ent_c = cidx if len(keys) else np.zeros(0, np.int64)
    ent_t = colsarr[ent_b, ent_c] if len(keys) else np.zeros(0, np.int64)
    extra = {}
    if iterative is not None:
        tt = is_tail[rows] & is_tail[cols]
        diag = np.arange(t, dtype=np.int64)
        tkeys = unique_sorted(np.concatenate([where_pos[rows[tt]] * t + where_pos[cols[tt]], diag * t + diag]))
        # the off-diagonal entries of the Schur complement S = T - B' D^-1 B (upper
        # triangle): the union of the pairs' destinations and the tail pattern's;
        # their squares give tr(E^2) of the estimator's control variate exactly
        off = pair_i != pair_j
        tu = (tkeys // max(t, 1)) < (tkeys % max(t, 1))
        skeys = unique_sorted(np.concatenate([pair_dest[off], tkeys[tu]]))
        nseg = len(skeys)
        pair_seg = np.where(off, np.searchsorted(skeys, pair_dest), nseg)
        tail_seg = np.full(len(tkeys), nseg, np.int64)
        tail_seg[tu] = np.searchsorted(skeys, tkeys[tu])
        # the permutation that sorts the coupling entries by tail position: the
        # iterations' products with S run over the real entries alone (a block's
        # padded coupling columns would double the work on unbalanced crossed designs)
        ent_perm = np.argsort(ent_t, kind="stable")
        # the tail levels eliminated exactly before the iterations (`exact_probes`
        # of them, where the tail has more levels than probes): those with the most
        # off-diagonal entries in S, e.g. a small factor coupled to all levels of
        # the others, which also leave S' better conditioned
        deg = np.bincount(skeys // max(t, 1), minlength=t) + np.bincount(skeys % max(t, 1), minlength=t)
        nh = min(iterative.exact_probes, t) if t > iterative.probes else 0
        heavy = np.sort(np.argsort(-deg, kind="stable")[:nh])
        extra = dict(iterative=iterative, tail_keys=tkeys, pair_seg=pair_seg.astype(np.int32),
                     heavy=heavy.astype(np.int32),
                     ent_b=ent_b.astype(np.int32), ent_c=ent_c.astype(np.int32),
                     ent_perm=ent_perm.astype(np.int32), ent_t_sorted=ent_t[ent_perm].astype(np.int32),
                     tail_seg=tail_seg.astype(np.int32), off_rows=(skeys // max(t, 1)).astype(np.int32),
                     off_cols=(skeys % max(t, 1)).astype(np.int32),
                     tail_rows=(tkeys // max(t, 1)).astype(np.int32), tail_cols=(tkeys % max(t, 1)).astype(np.int32),
                     tail_diag=np.searchsorted(tkeys, diag * t + diag).astype(np.int32))
    return ArrowLayout(
        n=n, m=m, k=k, t=len(tail), c=c, head=head, tail=tail, cols=colsarr, **extra,
        ncoup=np.bincount(kb, minlength=m).astype(np.int32),
        where_block=where_block, where_pos=where_pos, coupling_keys=keys, coupling_idx=cidx,
        pair_b=pair_b.astype(np.int32), pair_i=pair_i.astype(np.int32), pair_j=pair_j.astype(np.int32),
        pair_dest=pair_dest.astype(np.int32),
        ent_t=ent_t.astype(np.int32), ent_flat=(ent_b * c + ent_c).astype(np.int32),
    )


# --------------------------------------------------------------------------
# Banded (block tridiagonal after reverse Cuthill-McKee)


class BandedLayout(_Layout):
    """Block-tridiagonal storage after a bandwidth-reducing permutation.

    ``perm[i]`` is the original index at permuted position ``i``. Blocks have
    size ``s`` (>= the bandwidth), so the permuted matrix is block
    tridiagonal: diagonal blocks ``(nb, s, s)`` and sub-diagonal blocks
    ``(nb - 1, s, s)`` (block ``(i + 1, i)``).
    """

    n: int
    s: int
    nb: int
    perm: np.ndarray
    iperm: np.ndarray
    mixed = True

    @property
    def kind(self) -> str:
        return "banded"

    @property
    def dense_order(self) -> int:
        return self.s

    @property
    def size(self) -> int:
        return (2 * self.nb - 1) * self.s * self.s

    def cost(self) -> float:
        return self.nb * self.s**3 * (1 / 3 + 2)

    def slots(self, rows, cols):
        pr = self.iperm[np.asarray(rows, np.int64)]
        pc = self.iperm[np.asarray(cols, np.int64)]
        br, bc = pr // self.s, pc // self.s
        ir, ic = pr % self.s, pc % self.s
        out = np.full(pr.shape, -1, np.int64)
        same = br == bc
        out[same] = (br[same] * self.s + ir[same]) * self.s + ic[same]
        sub = br == bc + 1
        off = self.nb * self.s * self.s
        out[sub] = off + (bc[sub] * self.s + ir[sub]) * self.s + ic[sub]
        if np.any(np.abs(br - bc) > 1):
            raise ValueError("pattern entry outside the band of a banded layout")
        return out  # entries above the block diagonal (br == bc - 1) stay -1

    def padding(self) -> np.ndarray:
        pad = np.zeros(self.size)
        for p in range(self.n, self.nb * self.s):
            b, i = divmod(p, self.s)
            pad[(b * self.s + i) * self.s + i] = 1.0
        return pad

    def diag_slots(self):
        i = np.arange(self.n)
        return self.slots(i, i)

    def _split(self, flat):
        off = self.nb * self.s * self.s
        D = flat[:off].reshape(self.nb, self.s, self.s)
        C = flat[off:].reshape(self.nb - 1, self.s, self.s)
        return D, C

    def to_dense(self, flat):
        D, C = self._split(flat)
        N = self.nb * self.s
        A = jnp.zeros((N, N))
        for b in range(self.nb):
            A = A.at[b * self.s:(b + 1) * self.s, b * self.s:(b + 1) * self.s].set(D[b])
        for b in range(self.nb - 1):
            r, c = (b + 1) * self.s, b * self.s
            A = A.at[r:r + self.s, c:c + self.s].set(C[b])
            A = A.at[c:c + self.s, r:r + self.s].set(C[b].T)
        A = A[: self.n, : self.n]
        return A[self.iperm][:, self.iperm]

    def factor(self, flat) -> "BandedFactor":
        D, C = self._split(flat)
        L0 = _chol(D[0])

        def step(Lprev, dc):
            Di, Ci = dc
            # C L^-T: LAPACK's right-side solve in double precision (11.4 ms
            # against 13.0 ms for ar1xar1's 100 blocks of 101 with the transposes
            # of a left-side one); in single precision the left-side one is the
            # faster (5.6 against 6.4 ms)
            if Ci.dtype == jnp.float64:
                M = jax.lax.linalg.triangular_solve(Lprev, Ci, left_side=False, lower=True, transpose_a=True)
            else:
                M = _tri_solve(Lprev, Ci.T).T
            Li = _chol(Di - M @ M.T)
            return Li, (Li, M)

        _, (Ls, Ms) = jax.lax.scan(step, L0, (D[1:], C))
        L = jnp.concatenate([L0[None], Ls])
        return BandedFactor(layout=self, flat=flat, L=L, M=Ms)


class BandedFactor(eqx.Module):
    layout: BandedLayout = eqx.field(static=True)
    flat: jax.Array
    L: jax.Array  # (nb, s, s)
    M: jax.Array  # (nb - 1, s, s): block (i + 1, i) of the factor

    def logdet(self):
        return logdet(self.layout, self.flat)

    def _logdet(self):
        return 2.0 * _logdiag(self.L)

    def ok(self):
        return jnp.all(jnp.isfinite(self.pivots()))

    def pivots(self):
        return jnp.diagonal(self.L, axis1=1, axis2=2).ravel()

    def solve(self, b):
        lay = self.layout
        b = jnp.asarray(b)
        vec = b.ndim == 1
        bb = b[:, None] if vec else b
        r = bb.shape[1]
        bp = jnp.zeros((lay.nb * lay.s, r), bb.dtype).at[: lay.n].set(bb[lay.perm])
        bp = bp.reshape(lay.nb, lay.s, r)
        y0 = _tri_solve(self.L[0], bp[0])

        def fwd(yprev, inp):
            Li, Mi, bi = inp
            yi = _tri_solve(Li, bi - Mi @ yprev)
            return yi, yi

        _, ys = jax.lax.scan(fwd, y0, (self.L[1:], self.M, bp[1:]))
        y = jnp.concatenate([y0[None], ys])
        xl = _tri_solve(self.L[-1], y[-1], trans=True)

        def bwd(xnext, inp):
            Li, Mnext, yi = inp
            xi = _tri_solve(Li, yi - Mnext.T @ xnext, trans=True)
            return xi, xi

        _, xs = jax.lax.scan(bwd, xl, (self.L[:-1], self.M, y[:-1]), reverse=True)
        x = jnp.concatenate([xs, xl[None]]).reshape(lay.nb * lay.s, r)[: lay.n]
        x = x[lay.iperm]
        return x[:, 0] if vec else x

    def _selected_inverse(self):
        """Diagonal blocks ``(nb, s, s)`` and sub-diagonal blocks ``(nb - 1, s, s)``
        of Sigma = H^-1, by the block Takahashi recursion (backwards)::

            Sigma_{i+1,i} = -Sigma_{i+1,i+1} Y_i,          Y_i = M_i L_i^-1
            Sigma_{i,i}   = L_i^-T L_i^-1 - Y_i' Sigma_{i+1,i}

        (from ``Sigma L = L^-T``). Everything that does not depend on the
        recursion is batched outside the scan, whose steps are two matrix
        products (triangular solves inside the scan run slower on CPU).
        """
        Linv = _tri_inv(self.L)
        # L_i^-T L_i^-1 as a batched product of the transpose (an einsum
        # contracting both factors' first axes took 1-2 ms more of ar1xar1's
        # 19-24 ms)
        P = jnp.matmul(jnp.swapaxes(Linv, 1, 2), Linv)
        Y = self.M @ Linv[:-1]

        def step(Snext, inp):
            Pi, Yi = inp
            W = Snext @ Yi
            Sii = Pi + Yi.T @ W
            return Sii, (Sii, -W)

        _, (Sd, Ssub) = jax.lax.scan(step, P[-1], (P[:-1], Y), reverse=True)
        return jnp.concatenate([Sd, P[-1:]]), Ssub

    def logdet_grad(self):
        """d logdet / d flat: Sigma on the diagonal blocks (both triangles stored),
        twice Sigma on the sub-diagonal blocks (stored once for both triangles)."""
        Sd, Ssub = self._selected_inverse()
        return jnp.concatenate([Sd.reshape(-1), 2.0 * Ssub.reshape(-1)])

    def diag_inverse(self):
        """Diagonal of H^-1 (the selected inverse's diagonal blocks)."""
        lay = self.layout
        Sd, _ = self._selected_inverse()
        d = jnp.diagonal(Sd, axis1=1, axis2=2).reshape(-1)[: lay.n]
        return d[lay.iperm]

    def inverse_entries(self, rows, cols):
        """Entries (rows[i], cols[i]) of H^-1 on the band (the selected inverse):
        pairs in one diagonal block or in neighbouring blocks of the permuted
        order, which every pair of H's own pattern is (a random effect's levels'
        blocks for `ranef`'s conditional variances, a row's effects for
        prediction standard errors)."""
        lay = self.layout
        pr = lay.iperm[np.asarray(rows, np.int64)]
        pc = lay.iperm[np.asarray(cols, np.int64)]
        # the upper neighbour's entries are the lower one's transposed
        up = pr // lay.s < pc // lay.s
        pr, pc = np.where(up, pc, pr), np.where(up, pr, pc)
        br, bc = pr // lay.s, pc // lay.s
        if np.any(br - bc > 1):
            raise NotImplementedError("inverse entries outside the band of a banded layout")
        ir, ic = pr % lay.s, pc % lay.s
        Sd, Ssub = self._selected_inverse()
        sub = br == bc + 1
        out = Sd[br, ir, ic]
        if np.any(sub) and lay.nb > 1:
            out = jnp.where(jnp.asarray(sub), Ssub[np.where(sub, bc, 0), ir, ic], out)
        return out


def banded_layout(n, rows, cols) -> BandedLayout:
    """Banded layout in the better of the natural and the RCM ordering."""
    g = sps.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    best = None
    for perm in (np.arange(n), np.asarray(reverse_cuthill_mckee(g, symmetric_mode=True))):
        perm = perm.astype(np.int64)
        iperm = np.empty(n, np.int64)
        iperm[perm] = np.arange(n)
        bw = int(np.max(np.abs(iperm[rows] - iperm[cols]))) if len(rows) else 0
        if best is None or bw < best[0]:
            best = (bw, perm, iperm)
    bw, perm, iperm = best
    s = max(bw, 1)
    nb = max(math.ceil(n / s), 2)
    return BandedLayout(n=n, s=s, nb=nb, perm=perm, iperm=iperm)


# --------------------------------------------------------------------------
# Choosing


def _arrow_candidates(n, rows, cols, max_tail):
    deg = np.bincount(rows, minlength=n)
    order = np.argsort(-deg, kind="stable")
    sizes = [0] + [int(2**j) for j in range(0, 30) if 2**j <= max_tail]
    # also cut exactly where the degree drops (e.g. the smaller crossed factor)
    dsorted = deg[order]
    drops = np.nonzero(np.diff(dsorted) < 0)[0] + 1
    sizes += [int(d) for d in drops if d <= max_tail][:8]
    if n > 1:
        ratio = dsorted[:-1] / np.maximum(dsorted[1:], 1)
        for d in np.argsort(-ratio)[:4]:
            if d + 1 <= max_tail:
                sizes.append(int(d + 1))
    return order, sorted(set(sizes))


#: the layouts a caller may force (`choose_layout`)
LAYOUTS = ("dense", "arrow", "banded")


def check_layout(layout) -> None:
    """Refuse a layout name `choose_layout` does not know, naming those it does
    (an arrow layout may also come as ``("arrow", tail indices)``)."""
    if layout is None or layout in LAYOUTS or (isinstance(layout, tuple) and layout and layout[0] == "arrow"):
        return
    raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))} or None (chosen by "
                     f"predicted cost), got {layout!r}")


def choose_layout(n: int, rows: np.ndarray, cols: np.ndarray, *, dense_max: int = 600,
                  force: str | None = None, solver="exact"):
    """Pick the cheapest layout for a symmetric ``n x n`` pattern (rows, cols).

    ``force`` in {"dense", "arrow", "banded"} overrides the choice. ``solver``:
    "exact" (sparse Cholesky), "iterative" (the linear-cost path of
    `tmbx._iterative` on an arrow layout's tail), "auto" (the iterative path
    where its predicted cost is lower), or an `IterativeOptions` (iterative,
    with those settings).
    """
    from ._iterative import IterativeOptions

    if isinstance(solver, IterativeOptions):
        opts, solver = solver, "iterative"
    else:
        opts = IterativeOptions()
    check_layout(force)
    if solver not in ("exact", "iterative", "auto"):
        raise ValueError(f"solver must be 'exact', 'iterative', 'auto' or an IterativeOptions, got {solver!r}")
    layout = _choose_exact(n, rows, cols, dense_max=dense_max, force=force)
    if solver == "exact":
        return layout
    if solver == "iterative" and not (isinstance(layout, ArrowLayout) and layout.t) and force in (None, "arrow"):
        layout = _choose_exact(n, rows, cols, dense_max=0, force="arrow")  # small, but asked for
    elif solver == "iterative" and isinstance(force, tuple) and len(force[1]):
        layout = arrow_layout(n, rows, cols, np.asarray(force[1], np.int64))
    if not isinstance(layout, ArrowLayout) or layout.t == 0:
        if solver == "iterative" and not isinstance(layout, ArrowLayout):
            raise ValueError(
                f"solver='iterative' needs random effects whose Hessian splits into one block per "
                f"level of a grouping factor plus the other factors' levels (crossed or nested "
                f"designs); this one's layout is {layout.kind!r}. Use solver='exact'.")
        return layout  # block-diagonal: the exact factorization is already linear
    if solver == "auto":
        rows_, cols_ = np.asarray(rows), np.asarray(cols)
        is_tail = np.zeros(n, bool)
        is_tail[layout.tail] = True
        nnz_tail = int(np.sum(is_tail[rows_] & is_tail[cols_])) + layout.t
        if iterative_cost(layout.m, layout.k, layout.c, layout.t, nnz_tail, opts) >= layout.cost():
            return layout
    return arrow_layout(n, rows, cols, layout.tail, iterative=opts)


def iterative_cost(m, k, c, t, nnz_tail, options) -> float:
    """Predicted cost of one factorization on the linear-cost path, in the units of
    `ArrowLayout.cost` (flops): the head elimination, then ``probes`` x (Lanczos
    steps + about as many conjugate-gradient steps) products with the tail's Schur
    complement, each a gather/scatter pass over the coupling (weighted 10x a
    dense flop: memory-bound), and the deflation basis's block inverse iteration."""
    per_product = 4 * m * k * c + 2 * nnz_tail + 4 * t
    head = m * (k**3 / 3 + k**2 * c)
    o = options
    products = (o.probes + o.deflate) * 2 * o.lanczos_steps + o.deflate * o.deflate_iters * o.deflate_cg
    return head + 10.0 * products * per_product


def _choose_exact(n, rows, cols, *, dense_max, force):
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    if isinstance(force, tuple) and force[0] == "arrow":
        # the caller names the tail (e.g. all but the largest grouping factor)
        if n <= dense_max:
            return _block_diagonal(n, rows, cols) if len(force[1]) == 0 else DenseLayout(n=n)
        return arrow_layout(n, rows, cols, np.asarray(force[1], np.int64))
    if force is None and n <= dense_max:
        return _block_diagonal(n, rows, cols)
    if force == "dense":
        return DenseLayout(n=n)
    candidates = []
    if force in (None, "arrow"):
        order, sizes = _arrow_candidates(n, rows, cols, max_tail=min(max(n // 2, 1), 8000))
        best = None
        for t in sizes:  # increasing: a larger tail must win clearly (structure over noise)
            lay = _quick_arrow_cost(n, rows, cols, order[:t])
            if lay is not None and (best is None or lay[0] < 0.8 * best[0]):
                best = lay
        if best is not None:
            candidates.append((best[0], "arrow", order[: best[1]]))
    if force in (None, "banded"):
        lay = banded_layout(n, rows, cols)
        candidates.append((lay.cost(), "banded", lay))
    if force is None:
        candidates.append((DenseLayout(n=n).cost(), "dense", None))
    cost, kind, info = min(candidates, key=lambda c: c[0])
    if kind == "arrow":
        return arrow_layout(n, rows, cols, info)
    if kind == "banded":
        return info
    return DenseLayout(n=n)


def _block_diagonal(n, rows, cols):
    """A small pattern: block-diagonal (arrow, no tail) when it splits into at least
    four blocks of at most a quarter of ``n`` each, else dense. Batched small
    factorizations beat one dense one even at n = 36 (sleepstudy's 18 subjects
    x 2): a vmapped bootstrap of it ran 2.5x faster."""
    if n >= 8:
        g = sps.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
        m, lab = connected_components(g, directed=False)
        if m >= 4 and np.bincount(lab).max() <= n // 4:
            return arrow_layout(n, rows, cols, np.zeros(0, np.int64))
    return DenseLayout(n=n)


def _quick_arrow_cost(n, rows, cols, tail):
    is_tail = np.zeros(n, bool)
    is_tail[tail] = True
    keep = ~is_tail[rows] & ~is_tail[cols]
    g = sps.coo_matrix((np.ones(keep.sum()), (rows[keep], cols[keep])), shape=(n, n))
    _, lab = connected_components(g, directed=False)
    lab_h = lab[~is_tail]
    if lab_h.size == 0:
        return None
    _, comp_sizes = np.unique(lab_h, return_counts=True)
    k = comp_sizes.max()
    m = len(comp_sizes)
    t = len(tail)
    ht = ~is_tail[rows] & is_tail[cols]
    if ht.any():
        pairs = np.unique(np.stack([lab[rows[ht]], cols[ht]], 1), axis=0)
        c = np.bincount(np.unique(pairs[:, 0], return_inverse=True)[1]).max()
    else:
        c = 0
    cost = m * (k**3 / 3 + k**2 * c + k * c**2) + t**3 / 3 + 1e-3 * m * k * k
    return cost, len(tail)
