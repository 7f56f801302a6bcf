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
    """

    #: index arrays that its evaluation reads through jax operations only
    #: (`tmbx._laplace.Laplace.index_data`)
    TRACEABLE = ("ent", "prd", "obs_slots", "lat_slots", "jcolor_of_entry", "jrows", "jseeds")

    def __init__(self, eta_fn, obs_nll, latent_nll, x0, u0, data0, *, layout_kind=None,
                 jacobian=None, latent_diagonal=False, solver="exact"):
        self.eta_fn, self.obs_nll, self.latent_nll = eta_fn, obs_nll, latent_nll
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
        self.jrows = to_device(jr, np.int32)
        self.jcolor_of_entry = to_device(colors[jc], np.int32)
        self.ncolors = ncolors
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
        self.ent, self.prd, self.R = to_device(ent, np.int32), to_device(prd, np.int32), R
        # pattern: J^T J pairs within observations, the latent pattern, the diagonal
        pr = np.broadcast_to(ucol[:, :, None], (self.N, R, R)).reshape(-1)
        pc = np.broadcast_to(ucol[:, None, :], (self.N, R, R)).reshape(-1)
        valid = np.broadcast_to((ent < len(jr))[:, :, None] & (ent < len(jr))[:, None, :], (self.N, R, R)).reshape(-1)
        diag = np.arange(n)
        allr = np.concatenate([pr[valid], self.lat.rows, diag])
        allc = np.concatenate([pc[valid], self.lat.cols, diag])
        key = unique_sorted(allr * n + allc)
        rows, cols = key // n, key % n
        self.rows, self.cols = rows, cols
        self.layout = choose_layout(n, rows, cols, force=layout_kind, solver=solver)
        s = self.layout.slots(pr, pc)
        s = np.where(valid & (s >= 0), s, self.layout.size)
        self.obs_slots = to_device(s.reshape(self.N, R, R), np.int32)
        self.lat_slots = to_device(_slots_with_dummy(self.layout, self.lat.rows, self.lat.cols))
        self.jseeds = to_device(_seeds(colors, ncolors))

    def jacobian_values(self, x, u, data):
        """Values of J = d eta / du at its pattern entries: one JVP per colour, then
        each entry read from its column's colour (columns of a colour never share a row)."""
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
        jv = jnp.concatenate([jv, jnp.zeros(1, jv.dtype)])[self.ent]  # (N, R)
        W = self.weights(x, u, data)
        Wpq = W[jnp.arange(self.N)[:, None, None], self.prd[:, :, None], self.prd[:, None, :]]
        contrib = jv[:, :, None] * jv[:, None, :] * Wpq
        flat = jnp.zeros(self.layout.size + 1, jv.dtype)
        flat = flat.at[self.obs_slots.reshape(-1)].add(contrib.reshape(-1))
        return flat.at[self.lat_slots].add(self.lat(x, u, data))


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
