"""``tmbx.glmm_batch``: one glmmTMB-style model per member, fitted in batch.

The R workflow this replaces is a loop of ``glmmTMB(y ~ group + (1|donor),
data = subset(d, gene == g), family = nbinom2)`` over thousands of genes.
Here the formula is turned into a template once per bucket of same-shaped
members (see `_layout`), and every member of the bucket goes through one
``jit(vmap(fit))``. Members that cannot be fitted (no rows, a response
outside the family's support, all zeros, unidentifiable fixed effects) are
flagged with the reason and never reach the compiled program.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..formula._design import _parse_all, _used_columns, build_design
from ..formula._parse import suggest
from ..formula._template import _start_beta, resolve_family
from . import _layout
from ._result import GlmmBatchFit, Member
from ._run import Bucket, BucketSpec, run_buckets

_MIN_BUCKET = 16  # a bucket with fewer members joins a larger shape (one compile less)
# Shape classes are grouped into buckets (`_merge_small`) weighing a program of
# their own, about 2 s of tracing and lowering with a warm cache (3-5 s more of XLA
# compilation with a cold one), against ~3e-5 s per member and padded row of fit
# (NB2 genes on 2 CPU cores: 10.5 s for 2,000 genes, 388,000 member-rows).
_BUCKET_SECONDS = 3.0
_ROW_SECONDS = 3e-5


def glmm_batch(formula: str, data: pd.DataFrame, by: str, family="gaussian", batch_size=None, device=None, *,
               ziformula=None, dispformula=None, weights=None, offset=None, backend=None,
               progress: bool = True, reml: bool = False) -> GlmmBatchFit:
    """Fit ``formula`` to every subset of ``data`` with one value of ``by``
    (a loop of glmmTMB fits, as one compiled, vectorized fit).

    >>> fits = tmbx.glmm_batch("y ~ group + (1|donor)", data=long_df, by="gene", family="nbinom2")
    >>> fits.table()      # one row per gene: estimates, ses, Wald p, BH-adjusted p, sds, dispersion
    >>> fits["g00012"]    # that gene's full fit (a GlmmFit)

    ``batch_size``: members per compiled call (default: from the device's free
    memory); ``device``: "cpu", "gpu" or a ``jax.Device``; ``backend``: None
    (this process), "dask" (the running Dask client, else a local cluster) or
    "ray"; ``weights``/``offset``: column names.
    """
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    if by not in data.columns:
        raise ValueError(f"by={by!r} is not a column of the data.{suggest(by, data.columns)} "
                         f"Columns: {', '.join(map(str, data.columns))}.")
    if reml:
        raise ValueError("reml=True is not available in glmm_batch (the fixed effects would be integrated "
                         "out of each member); fit by maximum likelihood, or loop tmbx.glmm(..., reml=True).")
    for name, arg in (("weights", weights), ("offset", offset)):
        if arg is not None and not isinstance(arg, str):
            raise TypeError(f"{name} must be a column name in glmm_batch (one vector cannot serve every member)")
    fam = resolve_family(family, ziformula is not None)
    call = dict(formula=formula, family=family, ziformula=ziformula, dispformula=dispformula,
                weights=weights, offset=offset)
    keys, groups = _split(data, by)
    source, members, flags = _members(call, data, by, keys, groups, fam)
    return fit_members(source, members, fam, call, keys, by=by, flags=flags, data=data, groups=groups,
                       batch_size=batch_size, device=device, backend=backend, progress=progress)


def fit_members(source, members: dict, fam, call, keys, *, by="member", flags=None, data=None, groups=None,
                template_kw=None, batch_size=None, device=None, backend=None, progress=True) -> GlmmBatchFit:
    """Fit members given as ``{key: (rows of source, y)}`` (the engine of glmm_batch and power)."""
    buckets, placed = _buckets(source, members, fam, template_kw or {})
    results = run_buckets(buckets, batch_size=batch_size, device=device, backend=backend, progress=progress)
    groups = groups if groups is not None else [None] * len(keys)
    return GlmmBatchFit(keys, by, call, fam, source, buckets, results, placed, flags or {}, data, groups)


# ----------------------------------------------------------------------- members
def _split(data, by):
    """Member keys in order (a categorical's categories, else sorted values) and
    each member's row positions in ``data``."""
    col = data[by]
    if col.isna().any():
        raise ValueError(f"The by column {by!r} has {int(col.isna().sum())} missing value(s); drop those rows "
                         "or give them a value.")
    if isinstance(col.dtype, pd.CategoricalDtype):
        keys = list(col.cat.categories)
        codes = col.cat.codes.to_numpy()
    else:
        # hashing, not np.unique: sorting millions of strings (gene names) took seconds
        codes, keys = pd.factorize(col, sort=True)
        keys = list(keys)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(keys) + 1))
    groups = [order[bounds[i]:bounds[i + 1]] for i in range(len(keys))]
    return keys, groups


def _shared_columns(call, data, by, groups) -> bool:
    """Do all members have the same rows in every column the model uses except
    the response (e.g. genes measured on the same cells)?"""
    parsed = _parse_all(call["formula"], call["ziformula"], call["dispformula"])
    resp = parsed["cond"].response_text
    if parsed["cond"].response_is_cbind or resp not in data.columns or data[resp].isna().any() \
            or not pd.api.types.is_numeric_dtype(data[resp]):
        return False
    sizes = {len(g) for g in groups if len(g)}
    if len(sizes) != 1:
        return False
    cols = {c for p in parsed.values() for c in _used_columns(p, data.columns)} - {resp, by}
    cols |= {c for c in (call["weights"], call["offset"]) if c is not None}
    index = np.stack([g for g in groups if len(g)])
    for c in cols:
        col = data[c]
        # a categorical's codes, not its values: comparing 1e8 strings took seconds
        v = col.cat.codes.to_numpy() if isinstance(col.dtype, pd.CategoricalDtype) else col.to_numpy()
        block = v[index]
        if not (block == block[:1]).all():
            return False
    return True


def _members(call, data, by, keys, groups, fam):
    """The design the members' rows index into, each member's (rows, y), and flags."""
    kw = dict(ziformula=call["ziformula"], dispformula=call["dispformula"], weights=call["weights"],
              offset=call["offset"], family_needs_trials=getattr(fam, "needs_trials", False))
    flags = {}
    nonempty = [i for i, g in enumerate(groups) if len(g)]
    for i, g in enumerate(groups):
        if not len(g):
            flags[keys[i]] = "no rows for this member (an unused level of the by column)"
    if not nonempty:
        raise ValueError("No member has any rows.")
    source = None
    if _shared_columns(call, data, by, groups):
        # one design for all (only the response differs): built on the first member
        source = build_design(call["formula"], data.iloc[groups[nonempty[0]]], **kw)
        if len(source.dropped) or source.trials is not None:
            source = None  # rows with missing values or binomial trials: the general path
    if source is not None:
        resp = data[source.response_name].to_numpy()
        Y = resp[np.stack([groups[i] for i in nonempty])].astype(float)
        rows = np.arange(source.nobs)
        members = {keys[i]: (rows, Y[j]) for j, i in enumerate(nonempty)}
        for j in _suspect_rows(fam, Y):  # checked at once; member by member only where that fails
            reason = _check_member(fam, source, rows, Y[j], check_rank=False)
            if reason:
                flags[keys[nonempty[j]]] = reason
                del members[keys[nonempty[j]]]
        return source, members, flags
    frame = data.reset_index(drop=True)
    source = build_design(call["formula"], frame, **kw)
    used = source.data.index.to_numpy()  # rows kept (no missing values)
    member_of = np.full(len(frame), -1)
    for i in nonempty:
        member_of[groups[i]] = i
    of_row = member_of[used]
    members = {}
    for i in nonempty:
        rows = np.flatnonzero(of_row == i)
        if not len(rows):
            flags[keys[i]] = "no rows left for this member after dropping rows with missing values"
            continue
        members[keys[i]] = (rows, source.y[rows].astype(float))
    for key, (rows, y) in list(members.items()):
        reason = _check_member(fam, source, rows, y)
        if reason:
            flags[key] = reason
            del members[key]
    return source, members, flags


def _suspect_rows(fam, Y) -> np.ndarray:
    """Rows of ``Y`` (members x shared rows) that `_check_member` may flag: every
    row if any response is outside the family's support, else the all-zero rows."""
    try:
        fam.check_support(Y.reshape(-1), None)
    except ValueError:
        return np.arange(len(Y))
    return np.flatnonzero(~Y.any(axis=1))


def _check_member(fam, source, rows, y, check_rank=True) -> str | None:
    """Why this member cannot be fitted, or None."""
    trials = None if source.trials is None else source.trials[rows]
    try:
        fam.check_support(y, trials)
    except ValueError as err:
        return f"response outside the {fam.name} family's support: {err}"
    if np.all(y == 0):
        return ("all responses are zero: the intercept has no finite estimate (drop this member, e.g. "
                "genes not expressed)")
    if check_rank:
        for key, comp in source.components.items():
            X = comp.X[rows]
            if X.shape[1] and np.linalg.matrix_rank(X) < X.shape[1]:
                return (f"the fixed effects of the {key} model are not identifiable in this member's rows (a "
                        f"factor level or a covariate without variation); columns {comp.names}")
    return None


# ----------------------------------------------------------------------- buckets
def _buckets(source, members, fam, template_kw):
    """Group members by padded shape and build each bucket's arrays and spec."""
    if not members:
        return [], {}
    level = _layout.single_factor(source)
    shared_rows = all(len(r) == source.nobs for r, _ in members.values())
    if level is None:
        if not shared_rows:
            raise ValueError(
                "glmm_batch fits members of different designs only when every random-effect term is on one "
                "grouping factor; this model has several. Give every member the same rows (only the response "
                "differing), or loop tmbx.glmm over the members.")
        return _unmerged_bucket(source, members, fam, template_kw)
    pattern = _layout.row_patterns(source, level)
    if shared_rows:
        merged = dict(zip(members, _layout.merge_shared_rows(np.stack([y for _, y in members.values()]),
                                                             pattern, level)))
    else:
        merged = {k: _layout.merge_rows(rows, y, pattern, level) for k, (rows, y) in members.items()}
    shapes = {k: _layout.bucket_shape(m.M, m.R) for k, m in merged.items()}
    shapes = _merge_small(shapes)
    buckets, placed = [], {}
    for shape in sorted(set(shapes.values())):
        ks = [k for k in merged if shapes[k] == shape]
        # the bucket's shape class, trimmed to what its members need
        M, R = max(merged[k].M for k in ks), max(merged[k].R for k in ks)
        arrays = [_layout.padded_rows(merged[k], M, R) for k in ks]
        rows, y, count = (np.stack(a) for a in zip(*arrays))
        names = [f"slot{j}" for j in range(M)]
        canon = _layout.canonical_design(source, rows[0], y[0], count[0], M, R, names)
        spec = BucketSpec(canon, fam, template_kw, blocks=(M, R))
        x0, pooled = _starts(spec, fam, source, [members[k] for k in ks])
        bucket = Bucket(spec, source, rows, y, count, x0, ks, pooled)
        for j, k in enumerate(ks):
            placed[k] = Member(len(buckets), j, merged[k])
        buckets.append(bucket)
    return buckets, placed


def _unmerged_bucket(source, members, fam, template_kw):
    """Members that share every row (several grouping factors): only y differs."""
    ks = list(members)
    N = source.nobs
    rows = np.broadcast_to(np.arange(N), (len(ks), N))
    y = np.stack([members[k][1] for k in ks])
    count = np.ones((len(ks), N))
    spec = BucketSpec(source, fam, template_kw)
    x0, pooled = _starts(spec, fam, source, [members[k] for k in ks])
    placed = {k: Member(0, j, None) for j, k in enumerate(ks)}
    return [Bucket(spec, source, rows, y, count, x0, ks, pooled)], placed


def _merge_small(shapes: dict) -> dict:
    """Group the shape classes so that the programs plus the padding cost least:
    classes sorted by size are cut into runs, each padded to its last class (which
    must hold the others); a run costs ``_BUCKET_SECONDS`` plus ``_ROW_SECONDS`` per
    member and padded row (a shortest path over the cuts). A class that no larger
    class holds (fewer levels) keeps a program of its own."""
    counts = pd.Series(list(shapes.values())).value_counts().to_dict()
    order = sorted(counts, key=lambda b: (b[0] * b[1], b))
    area = [b[0] * b[1] for b in order]

    def cost(i, j):  # classes i..j padded to class j
        if any(order[k][0] > order[j][0] or order[k][1] > order[j][1] for k in range(i, j)):
            return math.inf
        small = sum(counts[order[k]] for k in range(i, j + 1)) < _MIN_BUCKET and j < len(order) - 1
        pad = sum(counts[order[k]] * (area[j] - area[k]) for k in range(i, j)) * _ROW_SECONDS
        # a run of fewer than _MIN_BUCKET members (unless it is the largest): a program
        # for so few members is rarely worth it, so it joins a larger class if one holds it
        return _BUCKET_SECONDS * (10.0 if small else 1.0) + pad

    best, cut = [0.0], []  # best[j]: cost of classes 0..j-1; cut[j-1]: where its last run starts
    for j in range(len(order)):
        c, i = min((best[i] + cost(i, j), i) for i in range(j + 1))
        best.append(c)
        cut.append(i)
    remap, j = {}, len(order) - 1
    while j >= 0:
        i = cut[j]
        remap.update({order[k]: order[j] for k in range(i, j + 1)})
        j = i - 1
    return {k: remap[s] for k, s in shapes.items()}


def _starts(spec, fam, source, members):
    """Per-member start values (glmmTMB's zeros, the intercept at link(mean y)), and
    the entries a pilot chunk may set for all (everything but fixed effects)."""
    from ._run import bucket_model

    tmpl, _ = bucket_model(spec)
    sp = tmpl.model.space
    cond = source.components["cond"]
    base = {k: sp.starts[k].reshape(sp.shapes[k]) for k in sp.names}
    x0 = []
    for rows, y in members:
        trials = None if source.trials is None else source.trials[rows]
        base["beta"] = _start_beta(fam, cond, y, trials)
        x0.append(sp.flatten(base, "x"))
    pooled = np.ones(sp.n_x, bool)
    for key in ("beta", "betazi"):
        if key in sp.index:
            idx = sp.index[key]
            pooled[idx[idx >= 0]] = False
    return np.stack(x0), pooled
