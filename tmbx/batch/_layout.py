"""A canonical row layout that lets members of different sizes share one program.

The engine reads the latent Hessian's sparsity (which observation touches
which random effect) off the template's data once, when the model is built;
every data set that goes through one compiled fit must have the same
pattern. For models with one grouping factor (every random-effect term on the
same factor, e.g. ``(1|donor)`` or ``(1 + x|site)``) that pattern is made the
same for every member by laying rows out by level:

- rows that agree in everything the likelihood sees (level, fixed-effect
  rows, random-effect columns, offsets, trials, prior weight, response) are
  merged into one row whose weight is their number: the nll is a sum of
  per-row terms, so this is exact. Per-gene counts on shared cells collapse
  from thousands of cells to a few distinct (donor, count) rows;
- a member's levels take the slots ``0..m-1`` in the data's level order and
  each slot holds ``R`` rows; unused rows copy one of the member's rows with
  weight 0 (a response inside the family's support, contributing exactly 0);
- unused level slots get no data: a spherical ``N(0, 1)`` effect with no data
  has its mode at 0 and unit curvature, so it adds ``0`` to the Laplace
  marginal (``1/2 u^2 + 1/2 log(2 pi) + 1/2 log 1 - 1/2 log(2 pi)``).

Members are bucketed by ``(M, R)`` with ``R`` rounded up to a power of two,
so padding stays small and each bucket compiles one program.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ..formula._design import Component, Design, ReTerm


@dataclasses.dataclass
class MemberRows:
    """One member's merged rows: design row each copies, response, count, level slot."""

    rows: np.ndarray      # (n,) design row of each merged row
    y: np.ndarray         # (n,) response
    count: np.ndarray     # (n,) number of original rows merged
    slot: np.ndarray      # (n,) level slot 0..m-1
    within: np.ndarray    # (n,) position inside the slot
    levels: np.ndarray    # (m,) design level index of each slot
    M: int
    R: int


def single_factor(design: Design):
    """The level index (N,) of the model's one grouping factor; zeros when the
    model has no random effects; None when terms sit on several factors."""
    terms = [t for c in design.components.values() for t in c.re]
    if not terms:
        return np.zeros(design.nobs, np.int64)
    first = terms[0]
    for t in terms[1:]:
        if t.levels != first.levels or not np.array_equal(t.index, first.index):
            return None
    return np.asarray(first.index, np.int64)


def row_patterns(design: Design, level: np.ndarray) -> np.ndarray:
    """(N,) id of each design row's pattern: everything but the response. The
    level is the first column, so pattern ids ascend with the level (which
    `merge_shared_rows` relies on)."""
    cols = [level[:, None].astype(float), design.weights[:, None]]
    if design.trials is not None:
        cols.append(design.trials[:, None])
    for comp in design.components.values():
        cols += [comp.X, comp.offset[:, None]] + [t.Z for t in comp.re]
    return np.unique(np.hstack(cols), axis=0, return_inverse=True)[1].reshape(-1)


def merge_rows(rows: np.ndarray, y: np.ndarray, pattern: np.ndarray, level: np.ndarray) -> MemberRows:
    """Merge a member's identical rows and number them level by level."""
    pid = pattern[rows]
    order = np.lexsort((y, pid))
    p, yy = pid[order], y[order]
    new = np.ones(len(order), bool)
    new[1:] = (p[1:] != p[:-1]) | (yy[1:] != yy[:-1])
    first = np.flatnonzero(new)
    count = np.diff(np.append(first, len(order)))
    rep = rows[order[first]]
    lev = level[rep]
    levels, slot = np.unique(lev, return_inverse=True)
    by_slot = np.argsort(slot, kind="stable")
    sizes = np.bincount(slot, minlength=len(levels))
    within = np.empty(len(slot), np.int64)
    within[by_slot] = np.arange(len(slot)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return MemberRows(rep, y[order[first]].astype(float), count.astype(float), slot, within, levels,
                      len(levels), int(sizes.max()))


def merge_shared_rows(Y: np.ndarray, pattern: np.ndarray, level: np.ndarray) -> list[MemberRows]:
    """`merge_rows` of members that share every design row (rows ``0..N-1``) and
    differ only in their responses ``Y`` (G, N), all at once: a row-wise sort of
    ``pattern * span + y`` (count responses), instead of a sort per member (20,000
    genes x 5,000 cells: a Python loop of 20,000 lexsorts). Responses that are not
    small non-negative integers go member by member."""
    G, N = Y.shape
    rows = np.arange(N)
    yi = Y.astype(np.int64)
    span = int(yi.max(initial=0)) + 1
    P = int(pattern.max(initial=0)) + 1
    if not np.array_equal(yi, Y) or yi.min(initial=0) < 0 or P * span >= 2**62:
        return [merge_rows(rows, y, pattern, level) for y in Y]
    key = np.sort(pattern[None, :] * span + yi, axis=1)
    new = np.ones((G, N), bool)
    new[:, 1:] = key[:, 1:] != key[:, :-1]
    g, pos = np.nonzero(new)  # member-major: each member's distinct (pattern, y) in sorted order
    count = np.diff(np.append(g * N + pos, G * N))
    k = key[g, pos]
    first_row = np.unique(pattern, return_index=True)[1]  # a design row of each pattern (ids 0..P-1)
    rep = first_row[k // span]
    lev = level[rep]
    bounds = np.searchsorted(g, np.arange(G + 1))
    # ids ascend with the level: each member's levels come in runs, in order
    starts = np.zeros(len(g), bool)
    starts[bounds[:-1]] = True
    starts[1:] |= lev[1:] != lev[:-1]
    run = np.cumsum(starts) - 1
    run_start = np.flatnonzero(starts)
    within = np.arange(len(g)) - run_start[run]
    run_len = np.diff(np.append(run_start, len(g)))
    slot = run - run[bounds[:-1]][g]
    out = []
    for m in range(G):
        a, b = bounds[m], bounds[m + 1]
        r0, r1 = run[a], run[b - 1] + 1
        out.append(MemberRows(rep[a:b], (k[a:b] % span).astype(float), count[a:b].astype(float), slot[a:b],
                              within[a:b], lev[run_start[r0:r1]], int(r1 - r0), int(run_len[r0:r1].max())))
    return out


def bucket_shape(M: int, R: int) -> tuple[int, int]:
    """The shape class of a member's (levels, rows per level): rows per level
    rounded up to a power of two (at least 4)."""
    up = lambda n: 1 << max(int(n) - 1, 0).bit_length()
    return M, max(up(R), 4)


def padded_rows(member: MemberRows, M: int, R: int):
    """(rows, y, count) of length M * R in the canonical order (pads: weight 0)."""
    n = M * R
    rows = np.full(n, member.rows[0])
    y = np.full(n, member.y[0])
    count = np.zeros(n)
    pos = member.slot * R + member.within
    rows[pos], y[pos], count[pos] = member.rows, member.y, member.count
    return rows, y, count


def canonical_design(design: Design, rows, y, count, M: int, R: int, level_names) -> Design:
    """The design of one member in the canonical layout (the bucket's template)."""
    index = np.repeat(np.arange(M), R).astype(np.int32)

    def comp(c: Component) -> Component:
        re = [ReTerm(t.group, t.terms, t.structure, t.args, index, list(level_names), t.Z[rows]) for t in c.re]
        return Component(c.X[rows], c.names, re, c.offset[rows], c.formula)

    return dataclasses.replace(
        design, y=y, trials=None if design.trials is None else design.trials[rows],
        weights=design.weights[rows] * count, nobs=M * R,
        components={k: comp(c) for k, c in design.components.items()},
    )


def stacked_data(design: Design, rows, y, count, template_data: dict) -> tuple[dict, dict]:
    """Data pytree of many members (rows, y, count: (B, N)) shaped like the template's,
    and the vmap axes (random-effect indices are shared: the canonical ones)."""
    def comp(key):
        c = design.components[key]
        d = {"X": c.X[rows], "offset": c.offset[rows]}
        ax = {"X": 0, "offset": 0}
        if "index" in template_data[key]:
            d["index"] = list(template_data[key]["index"])
            d["Z"] = [t.Z[rows] for t in c.re]
            ax["index"] = [None] * len(c.re)
            ax["Z"] = [0] * len(c.re)
        return d, ax

    data, axes = {"y": y, "weights": design.weights[rows] * count}, {"y": 0, "weights": 0}
    if design.trials is not None:
        data["trials"], axes["trials"] = design.trials[rows], 0
    for key in template_data:
        if key in design.components:
            data[key], axes[key] = comp(key)
    return data, axes


class LevelBlockHessian:
    """The latent Hessian ``J' W J + I`` of a template in the canonical layout.

    The engine's `LatentGaussianHessian` scatters every observation's ``J'WJ``
    contribution into the Hessian's storage; under ``vmap`` that scatter is
    most of the cost of an inner Newton step. In the canonical layout row
    ``r`` belongs to level slot ``r // R`` and every row of a slot touches the
    same entries, so the contributions are first summed within each slot (a
    reshape and a sum) and only ``M`` blocks are scattered. Same values, same
    storage; everything else is the wrapped evaluator's.
    """

    def __init__(self, inner, M: int, R: int):
        self.inner = inner
        slots = np.asarray(inner.obs_slots).reshape(M, R, inner.R, inner.R)
        if not np.all(slots == slots[:, :1]):
            raise ValueError("rows of a level slot touch different random effects: not a canonical layout")
        self.block_slots = slots[:, 0].reshape(-1)
        self.M, self.R = M, R

    def __getattr__(self, name):  # layout, rows, cols, ...: the wrapped evaluator's
        return getattr(self.inner, name)

    def __call__(self, x, u, data):
        h = self.inner
        jv = h.jacobian_values(x, u, data)
        jv = jnp.concatenate([jv, jnp.zeros(1, jv.dtype)])[h.ent]  # (N, Rj)
        W = h.weights(x, u, data)
        Wpq = W[jnp.arange(h.N)[:, None, None], h.prd[:, :, None], h.prd[:, None, :]]
        contrib = (jv[:, :, None] * jv[:, None, :] * Wpq).reshape(self.M, self.R, h.R, h.R).sum(axis=1)
        flat = jnp.zeros(h.layout.size + 1, jv.dtype).at[self.block_slots].add(contrib.reshape(-1))
        return flat.at[h.lat_slots].add(h.lat(x, u, data))
