"""Sparse Hessians of the joint nll with respect to the latent effects.

Two evaluators produce the Hessian's values directly in a layout's flat
storage (see `_sparse.py`), never as a dense ``n_u x n_u`` matrix:

- `ColoredHessian` (any template): the pattern is read off the jaxpr by
  asdex, coloured (star colouring), and the values come from one
  Hessian-vector product per colour.
- `LatentGaussianHessian` (templates that declare a linear predictor):
  ``H = J^T W J + H_latent``, with ``J = d eta / d u`` (sparse, a handful of
  colours even for crossed factors), ``W`` the per-observation second
  derivatives of the observation nll with respect to ``eta`` and
  ``H_latent`` the (block-structured) Hessian of the latent density.

Both store an extra dummy slot at the end of the flat vector: pattern
entries that a layout keeps only once (the upper triangle of off-diagonal
blocks) are sent there, so scatters need no masks.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._internal import LazyModule, to_device, unique_sorted
from ._sparse import choose_layout


asdex = LazyModule("asdex")  # and numba behind it: imported when a pattern is detected


def _seeds(colors: np.ndarray, num_colors: int) -> np.ndarray:
    """(num_colors, n) 0/1 seed matrix: one row per colour."""
    n = colors.shape[0]
    S = np.zeros((max(num_colors, 1), n))
    active = colors >= 0
    S[colors[active], np.nonzero(active)[0]] = 1.0
    return S


def _order_by_row(obs, col):
    """The permutation that sorts entries by (obs, col). The formula layer lists
    J's entries term by term, each in row order, so a stable sort by row alone
    (a merge of already sorted runs) usually leaves each row's columns in order
    too: checked, with a full two-key sort otherwise (4x slower at 10^6 rows)."""
    order = np.argsort(obs, kind="stable")
    o, c = obs[order], col[order]
    if np.all((o[1:] > o[:-1]) | (c[1:] > c[:-1])):
        return order
    return np.lexsort((col, obs))


def _slots_with_dummy(layout, rows, cols):
    slots = layout.slots(rows, cols)
    return np.where(slots < 0, layout.size, slots).astype(np.int32)


class ColoredHessian:
    """Hessian of ``f(x, u, data)`` in ``u`` by coloured Hessian-vector products.

    asdex reads the pattern off the template and colours it (star colouring);
    each colour's Hessian-vector product gives a row of the compressed matrix
    ``B`` (colours x n), and every pattern entry is one entry of ``B``. Which one
    is read once, here, off asdex's own decompression (`_extraction`), so that a
    program gathers the values with two index arrays that it can take as
    arguments (`TRACEABLE`), not as constants: TMB's ar1xar1 at 100 x 100 had
    2 MB of constants (seeds, asdex's extraction indices, slots) in its fit
    program.

    ``stored``: this template's `record` from an earlier process (`tmbx.Model`
    keeps it under the template's key), in place of asdex's detection and
    colouring, which take most of a template's setup (0.65 s of ar1xar1 at
    100 x 100); asdex (and numba behind it, 0.3 s to import) is then not even
    imported.
    """

    #: index arrays that traced code reads only through jax operations
    #: (`tmbx._laplace.Laplace.index_data`)
    TRACEABLE = ("colors", "slots", "pick_color", "pick_elem")

    def __init__(self, f: Callable, x0, u0, data0, *, layout=None, layout_kind=None, solver="exact",
                 stored=None):
        self.f = f
        n = u0.shape[0]
        if stored is not None and tuple(stored["shape"]) == (n, n):
            rows, cols, colors = stored["rows"], stored["cols"], stored["colors"]
            num_colors, pick_color, pick_elem = int(stored["num_colors"]), stored["pick_color"], stored["pick_elem"]
        else:
            # data closed over: indices are constants
            rows, cols, colors, num_colors, pick_color, pick_elem = _detect(lambda u: f(x0, u, data0), u0)
        self.n, self.num_colors, self._npat = n, num_colors, len(rows)
        diag = np.arange(n)
        rows = np.concatenate([rows, diag])  # keep the diagonal in the layout
        cols = np.concatenate([cols, diag])
        self.rows, self.cols = rows, cols
        self.layout = layout or choose_layout(n, rows, cols, force=layout_kind, solver=solver)
        self.colors = to_device(colors, np.int32)
        self.slots = to_device(_slots_with_dummy(self.layout, rows[: self._npat], cols[: self._npat]))
        self.pick_color = to_device(pick_color, np.int32)
        self.pick_elem = to_device(pick_elem, np.int32)

    def record(self) -> dict:
        """What `stored` takes (NumPy arrays): the pattern, the colours and the
        extraction indices."""
        return dict(shape=np.array([self.n, self.n]), rows=self.rows[: self._npat], cols=self.cols[: self._npat],
                    colors=np.asarray(self.colors), num_colors=np.array(self.num_colors),
                    pick_color=np.asarray(self.pick_color), pick_elem=np.asarray(self.pick_elem))

    def __call__(self, x, u, data):
        grad = lambda uu: jax.grad(self.f, argnums=1)(x, uu, data)
        vals = _colored_values(grad, u, self.colors, self.num_colors, self.pick_color, self.pick_elem)
        flat = jnp.zeros(self.layout.size + 1, vals.dtype)
        return flat.at[self.slots].add(vals)


def _detect(fu, u0):
    """asdex's pattern and star colouring of the Hessian of ``fu`` at ``u0``, as
    ``(rows, cols, colors, num_colors, pick_color, pick_elem)`` (NumPy; the
    last two from `_extraction`)."""
    coloring = asdex.hessian_coloring(fu, u0)
    rows, cols = np.asarray(coloring.sparsity.rows), np.asarray(coloring.sparsity.cols)
    colors, num_colors = np.asarray(coloring.colors), int(coloring.num_colors)
    return (rows, cols, colors, num_colors) + _extraction(coloring, num_colors, u0.shape[0])


def _colored_values(grad, u, colors, num_colors, pick_color, pick_elem):
    """The Hessian's pattern values at ``u`` (`_detect`'s order): one
    Hessian-vector product of ``grad`` per colour (seeds built from the colours),
    each value gathered from the compressed matrix."""
    hvp = lambda s: jax.jvp(grad, (u,), (s,))[1]
    seeds = (colors[None, :] == jnp.arange(max(num_colors, 1))[:, None]).astype(u.dtype)
    return jax.vmap(hvp)(seeds)[pick_color, pick_elem]


def _extraction(coloring, num_colors: int, n: int):
    """``(color, element)`` of the compressed matrix ``B`` that each pattern entry
    is read from, found by decompressing a ``B`` whose entries are their own
    flat indices (asdex's public ``decompress_data``; exact in float64 below
    2^53), and checked on a random ``B``: a decompression that combined entries
    would fail the check (and asdex's star colouring does not)."""
    if num_colors == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    probe = np.arange(num_colors * n, dtype=np.float64).reshape(num_colors, n)
    at = np.asarray(asdex.decompress_data(jnp.asarray(probe), coloring))
    idx = np.rint(at).astype(np.int64)
    color, elem = np.divmod(idx, n)
    B = np.random.default_rng(0).normal(size=(num_colors, n))
    if not (np.array_equal(idx, at) and np.array_equal(np.asarray(asdex.decompress_data(jnp.asarray(B), coloring)),
                                                      B[color, elem])):
        raise RuntimeError("asdex's decompression is not a gather of the compressed Hessian; "
                           "report this with your asdex version")
    return color, elem


class LatentGaussianHessian:
    """``H = J^T W J + H_latent`` for ``f = sum(obs_nll(eta)) + latent_nll``.

    ``eta_fn(x, u, data)`` returns the linear predictor(s), shape ``(N,)`` or
    ``(N, K)``, linear in ``u``; ``obs_nll(eta, x, u, data)`` the per-observation
    nll ``(N,)`` (depending on ``u`` only through ``eta``); ``latent_nll(x, u,
    data)`` a scalar.

    Each observation's ``J_i' W_i J_i`` (``R`` entries of ``J`` a row: ``R^2``
    products) is scattered into the layout's storage. Where rows touch many
    random effects that all lie in one block of the layout (the dense matrix,
    or one head block of an arrow layout), as an ``ar1``, ``ou`` or spatial
    term's rows do (each depends on all of its group's effects through the
    covariance factor: ``R`` is the number of time points), the blocks are
    instead batched matrix products of each block's rows (`_block_rows`): a
    Poisson ``ar1`` over 100 time points in one group spent 4.3 ms a Hessian
    in the scatter's 10^6 updates, and its (N, R, R) slot table grows as the
    cube of the series' length.
    """

    #: rows with at least this many entries of J are candidates for the blocks'
    #: matrix products (`_block_rows`); fewer are always scattered
    BLOCK_MIN_R = 8

    #: index arrays that its evaluation reads through jax operations only
    #: (`tmbx._laplace.Laplace.index_data`)
    TRACEABLE = ("ent", "prd", "obs_slots", "lat_slots", "jcolor_of_entry", "jrows", "jseeds", "jdest", "wrow",
                 "orows")

    def __init__(self, eta_fn, obs_nll, latent_nll, x0, u0, data0, *, layout_kind=None,
                 jacobian=None, latent_diagonal=False, solver="exact", jacobian_values=None):
        self.eta_fn, self.obs_nll, self.latent_nll = eta_fn, obs_nll, latent_nll
        self._jacobian_values = jacobian_values
        n = u0.shape[0]
        eta0 = jax.eval_shape(eta_fn, x0, u0, data0)
        self.K = 1 if len(eta0.shape) == 1 else eta0.shape[1]
        self.N = eta0.shape[0]
        if jacobian is None:
            # read J's pattern off the jaxpr and colour its columns (asdex)
            flat_eta = lambda u: eta_fn(x0, u, data0).reshape(-1)
            jcol = asdex.jacobian_coloring(flat_eta, u0)
            jr, jc = np.asarray(jcol.sparsity.rows), np.asarray(jcol.sparsity.cols)
            colors, ncolors = np.asarray(jcol.colors), jcol.num_colors
        else:
            # a caller that knows J's structure (the formula layer: one colour per
            # random-effect term column, since two levels of one factor never share
            # an observation) skips the detection, which is slow for millions of rows
            jr, jc, colors = (np.asarray(a, np.int64) for a in jacobian)
            ncolors = int(colors.max()) + 1 if colors.size else 0
        self.ncolors = ncolors
        self._coloring = (jr.astype(np.int32), colors[jc].astype(np.int32), colors, ncolors)
        # the JVP colouring's index arrays (`colored_jacobian_values`), unless the
        # caller gives J's values: an ar1 term's seeds are colours x effects
        self.jrows = self.jcolor_of_entry = self.jseeds = None
        if jacobian_values is None:
            self._colored_arrays()
        # latent part
        if latent_diagonal:  # declared by the caller: no detection (nor asdex's import)
            self.lat = DiagonalHessianPart(n).bind(latent_nll)
        else:
            lat = lambda u: latent_nll(x0, u, data0)
            self.lat = ColoredHessianPart(lat, u0).bind(latent_nll)
        # per-observation nonzeros of J: (N, R) indices into J's value vector
        obs, pred = jr // self.K, jr % self.K
        order = _order_by_row(obs, jc)
        counts = np.bincount(obs, minlength=self.N)
        R = int(counts.max()) if len(counts) else 0
        start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(len(order)) - start[obs[order]]
        ent = np.full((self.N, R), len(jr), np.int64)  # pad -> a zero value
        ent[obs[order], rank] = order
        ucol = np.zeros((self.N, R), np.int64)
        ucol[obs[order], rank] = jc[order]
        prd = np.zeros((self.N, R), np.int64)
        prd[obs[order], rank] = pred[order]
        self.R = R
        # pattern: J^T J pairs within observations, the latent pattern, the diagonal
        # (each row's pairs written out only for layouts' choice: rows whose
        # entries share one row pattern are represented once)
        okent = ent < len(jr)
        pairs_r, pairs_c = _row_pairs(ucol, okent, R >= self.BLOCK_MIN_R)
        diag = np.arange(n)
        allr = np.concatenate([pairs_r, self.lat.rows, diag])
        allc = np.concatenate([pairs_c, self.lat.cols, diag])
        key = unique_sorted(allr * n + allc)
        rows, cols = key // n, key % n
        self.rows, self.cols = rows, cols
        self.layout = choose_layout(n, rows, cols, force=layout_kind, solver=solver)
        self.blocks = None  # (m, rows a block, k): the blocks' product shape, or None
        self.jdest = self.wrow = self.orows = None
        other = np.arange(self.N)
        if R >= self.BLOCK_MIN_R:
            split = _block_rows(self.layout, ucol, okent, obs, pred, jc, self.K)
            if split is not None:
                self.blocks, jdest, wrow, other = split
                self.jdest, self.wrow = to_device(jdest, np.int32), to_device(wrow, np.int32)
                self.orows = to_device(other, np.int32) if other.size < self.N else None
        # the scattered rows (all of them without the blocks' products)
        ent, prd, ucol, okent = ent[other], prd[other], ucol[other], okent[other]
        self.ent, self.prd = to_device(ent, np.int32), to_device(prd, np.int32)
        self.n_scattered = other.size
        pr = np.broadcast_to(ucol[:, :, None], (other.size, R, R)).reshape(-1)
        pc = np.broadcast_to(ucol[:, None, :], (other.size, R, R)).reshape(-1)
        valid = np.broadcast_to(okent[:, :, None] & okent[:, None, :], (other.size, R, R)).reshape(-1)
        s = self.layout.slots(pr, pc)
        s = np.where(valid & (s >= 0), s, self.layout.size)
        self.obs_slots = to_device(s.reshape(other.size, R, R), np.int32)
        self.lat_slots = to_device(_slots_with_dummy(self.layout, self.lat.rows, self.lat.cols))

    def jacobian_values(self, x, u, data):
        """Values of J = d eta / du at its pattern entries: from the caller's
        ``jacobian_values`` where it gives them, else one JVP per colour, each
        entry read from its column's colour (columns of a colour never share a
        row). The formula layer gives them: an ar1 term over k time points has
        k colours, and reverse mode through k JVPs of the covariance factor
        carried k copies of its k x k cotangent (at k = 400, most of a gradient)."""
        if self._jacobian_values is not None:
            return self._jacobian_values(x, u, data)
        return self.colored_jacobian_values(x, u, data)

    def _colored_arrays(self):
        jr, color_of_entry, colors, ncolors = self._coloring
        self.jrows = to_device(jr, np.int32)
        self.jcolor_of_entry = to_device(color_of_entry, np.int32)
        self.jseeds = to_device(_seeds(colors, ncolors))

    def colored_jacobian_values(self, x, u, data):
        """`jacobian_values` by the JVP colouring, whether or not the caller gives
        them (a check of the caller's)."""
        if self.jseeds is None:
            self._colored_arrays()
        f = lambda uu: self.eta_fn(x, uu, data).reshape(-1)
        jvp = lambda s: jax.jvp(f, (u,), (s,))[1]
        B = jax.vmap(jvp)(self.jseeds)  # (ncolors, N*K)
        return B[self.jcolor_of_entry, self.jrows]

    def weights(self, x, u, data):
        """Per-observation Hessian blocks of obs_nll in eta: (N, K, K)."""
        eta = self.eta_fn(x, u, data)
        total = lambda e: jnp.sum(self.obs_nll(e, x, u, data))
        g = jax.grad(total)
        if self.K == 1:
            return jax.jvp(g, (eta,), (jnp.ones_like(eta),))[1][:, None, None]
        cols = [jax.jvp(g, (eta,), (jnp.zeros_like(eta).at[:, k].set(1.0),))[1] for k in range(self.K)]
        return jnp.stack(cols, axis=2)

    def __call__(self, x, u, data):
        jv = self.jacobian_values(x, u, data)
        W = self.weights(x, u, data)
        flat = jnp.zeros(self.layout.size + 1, jv.dtype)
        jv1 = jnp.concatenate([jv, jnp.zeros(1, jv.dtype)])
        if self.blocks is not None:
            m, rmax, k = self.blocks
            K = self.K
            Jb = jnp.zeros(m * rmax * K * k + 1, jv.dtype).at[self.jdest].add(jv1)[:-1]
            Wb = jnp.concatenate([W, jnp.zeros((1, K, K), W.dtype)])[self.wrow].reshape(m, rmax, K, K)
            if K == 1:
                Jb = Jb.reshape(m, rmax, k)
                Hb = jnp.einsum("bpc,bpd->bcd", Jb * Wb[:, :, 0], Jb)
            else:
                Jb = Jb.reshape(m, rmax, K, k)
                Hb = jnp.einsum("bpkc,bpkl,bpld->bcd", Jb, Wb, Jb)
            flat = flat.at[: m * k * k].add(Hb.reshape(-1))
        if self.n_scattered:
            if self.orows is not None:
                W = W[self.orows]
            jo = jv1[self.ent]  # (rows, R)
            Wpq = W[jnp.arange(self.n_scattered)[:, None, None], self.prd[:, :, None], self.prd[:, None, :]]
            contrib = jo[:, :, None] * jo[:, None, :] * Wpq
            flat = flat.at[self.obs_slots.reshape(-1)].add(contrib.reshape(-1))
        return flat.at[self.lat_slots].add(self.lat(x, u, data))


def _row_pairs(ucol, ok, dedupe):
    """The (row, col) pairs of ``J'J``: every pair of each observation's columns
    (``ucol`` (N, R), valid where ``ok``); with ``dedupe``, written out once per
    distinct row pattern (the rows of one group of an ar1 term share theirs:
    otherwise N R^2 pairs, 6.4e7 for a series of 400 points)."""
    keyed = np.where(ok, ucol, -1)
    pats = np.unique(keyed, axis=0) if dedupe and ucol.size else keyed
    pr = np.broadcast_to(pats[:, :, None], pats.shape + (pats.shape[1],)).reshape(-1)
    pc = np.broadcast_to(pats[:, None, :], (pats.shape[0], pats.shape[1], pats.shape[1])).reshape(-1)
    keep = (pr >= 0) & (pc >= 0)
    return pr[keep], pc[keep]


def _block_rows(layout, ucol, ok, obs, pred, jc, K):
    """Rows whose J entries all lie in one block of the layout (the dense
    matrix; one head block of an arrow layout), for `LatentGaussianHessian`'s
    batched products, when those cost less than the rows' scatter.

    Returns None, or ``((m, rmax, k), jdest, wrow, other)``: the blocks' count,
    the most rows a block has and its order; for every entry of J its position
    in the (m, rmax, K, k) stack of the blocks' rows (a dummy past the end for
    entries of scattered rows); for every row slot of the stack its
    observation (``N``, a zero weight, for padding); the scattered rows."""
    from ._sparse import ArrowLayout, DenseLayout

    N = ucol.shape[0]
    if isinstance(layout, DenseLayout):
        m, k = 1, layout.n
        block_of, pos_of = np.zeros(layout.n, np.int64), np.arange(layout.n)
    elif isinstance(layout, ArrowLayout) and layout.iterative is None:
        m, k = layout.m, layout.k
        block_of, pos_of = layout.where_block, layout.where_pos
    else:
        return None
    b = np.where(ok, block_of[ucol], -2)
    first = np.max(b, axis=1)  # a row's block (-2: no entries; -1: the tail)
    inblock = (first >= 0) & np.all((b == first[:, None]) | ~ok, axis=1)
    rows = np.nonzero(inblock)[0]
    if rows.size == 0:
        return None
    rb = first[rows]
    counts = np.bincount(rb, minlength=m)
    rmax = int(counts.max())
    # the products' multiply-adds against the scatter's updates, one of which
    # costs about 100 of them on XLA:CPU (measured: an ar1 term over 100 points)
    scattered = int(np.sum(ok[rows].sum(axis=1) ** 2))
    if m * rmax * K * K * k * k > 100 * scattered or m * rmax * K * k > 2**24:
        return None
    srt = np.argsort(rb, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.empty(rows.size, np.int64)
    slot[srt] = rb[srt] * rmax + (np.arange(rows.size) - starts[rb[srt]])
    slot_of_row = np.full(N, -1, np.int64)
    slot_of_row[rows] = slot
    wrow = np.full(m * rmax, N, np.int64)
    wrow[slot] = rows
    dummy = m * rmax * K * k
    s_ent = slot_of_row[obs]
    jdest = np.where(s_ent >= 0, (s_ent * K + pred) * k + pos_of[jc], dummy)
    jdest = np.concatenate([jdest, [dummy]])  # the zero that pads J's values
    return (m, rmax, k), jdest, wrow, np.nonzero(~inblock)[0]


class ColoredHessianPart:
    """Coloured Hessian values (pattern order) of a scalar ``g(x, u, data)``'s ``u`` part."""

    def __init__(self, g0, u0):
        self.rows, self.cols, colors, self.num_colors, pick_color, pick_elem = _detect(g0, u0)
        self.colors, self.pick_color, self.pick_elem = (to_device(a, np.int32) for a in (colors, pick_color, pick_elem))
        self.fn = None

    def bind(self, g):
        self.fn = g
        return self

    def __call__(self, x, u, data):
        gr = lambda uu: jax.grad(self.fn, argnums=1)(x, uu, data)
        return _colored_values(gr, u, self.colors, self.num_colors, self.pick_color, self.pick_elem)


class DiagonalHessianPart(ColoredHessianPart):
    """The ``u`` Hessian of a scalar ``g(x, u, data)`` known to be diagonal (random
    effects independent a priori, as every formula model's spherical ones): its
    values are one Hessian-vector product with a vector of ones."""

    def __init__(self, n):
        self.rows = self.cols = np.arange(n)
        self.fn = None

    def __call__(self, x, u, data):
        gr = lambda uu: jax.grad(self.fn, argnums=1)(x, uu, data)
        return jax.jvp(gr, (u,), (jnp.ones_like(u),))[1]
