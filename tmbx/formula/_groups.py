"""Grouping factors and coordinate factors, coded as R codes them.

- A grouping factor's levels are R's: a pandas categorical keeps its category
  order, strings are sorted, numbers are sorted numerically and labelled as R's
  ``as.character`` writes them ("3", "0.5"), booleans are "FALSE" < "TRUE";
  levels not present in the data are dropped (lme4's ``factor(ff, exclude = NA)``).
- An interaction ``a:b`` has the observed combinations as levels, ordered with
  ``a`` varying slowest (R's ``a:b`` on factors), labelled "a_level:b_level".
- ``pos(x, y)`` is glmmTMB's ``numFactor``: one level per distinct coordinate,
  labelled "(x,y)", ordered by the last coordinate, then the one before, ...
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def r_label(value) -> str:
    """A value as R's ``as.character`` writes it in a factor level."""
    if isinstance(value, (bool, np.bool_)):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return format(float(value), ".15g")
    return str(value)


def r_labels(values) -> list[str]:
    """`r_label` of each value; integers and booleans at NumPy's speed (a crossed
    design has 10^5-10^6 levels)."""
    v = np.asarray(values)
    if v.dtype.kind == "b":
        return np.where(v, "TRUE", "FALSE").tolist()
    if v.dtype.kind in "iu":
        return v.astype(str).tolist()
    if v.dtype.kind == "U" or (v.dtype.kind == "O" and pd.api.types.infer_dtype(v, skipna=False) == "string"):
        return [str(x) for x in v.tolist()]  # strings are their own labels (no per-value dispatch)
    return [r_label(x) for x in values]


def _all_levels(s: pd.Series) -> tuple[np.ndarray, list[str]]:
    """(codes, labels) over all levels of ``s`` in R's order (codes -1 for missing)."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.cat.codes.to_numpy(np.int64), r_labels(s.cat.categories)
    if pd.api.types.is_bool_dtype(s):
        v = s.to_numpy(bool)
        return v.astype(np.int64), ["FALSE", "TRUE"]
    if pd.api.types.is_numeric_dtype(s):
        uniq, codes = np.unique(s.to_numpy(float), return_inverse=True)
        if pd.api.types.is_integer_dtype(s):
            return codes.astype(np.int64), r_labels(uniq.astype(np.int64))
        return codes.astype(np.int64), r_labels(uniq)
    labels = s.astype(str).to_numpy()
    uniq, codes = np.unique(labels, return_inverse=True)
    return codes.astype(np.int64), [str(u) for u in uniq]


def row_labels(s: pd.Series) -> np.ndarray:
    """Each row's level label (for mapping new data onto fitted levels)."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        cats = np.array(r_labels(s.cat.categories) + [""], dtype=object)
        return cats[s.cat.codes.to_numpy()]
    values = s.to_numpy()
    try:  # each distinct value labelled once (newdata may have millions of rows)
        uniq, inv = np.unique(values, return_inverse=True)
    except TypeError:  # values NumPy cannot order (None among strings)
        return np.array([r_label(v) for v in values], dtype=object)
    return np.array(r_labels(uniq), dtype=object)[inv.reshape(-1)]


def group_factor(data: pd.DataFrame, variables: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    """Code the grouping ``a:b:...`` on ``data``: (index 0..m-1 per row, level labels)."""
    codes, labels = zip(*(_all_levels(data[v]) for v in variables))
    sizes = [max(len(lv), 1) for lv in labels]
    combined = np.ravel_multi_index(codes, sizes) if len(codes) > 1 else codes[0]
    observed, index = np.unique(combined, return_inverse=True)
    parts = np.unravel_index(observed, sizes) if len(codes) > 1 else (observed,)
    levels = np.asarray(labels[0], dtype=object)[parts[0]]
    for j in range(1, len(codes)):  # (elementwise on object arrays: no loop over levels)
        levels = levels + ":" + np.asarray(labels[j], dtype=object)[parts[j]]
    return index.astype(np.int32), levels.tolist()


def map_groups(data: pd.DataFrame, variables: tuple[str, ...], levels: list[str]) -> np.ndarray:
    """Index of each row of ``data`` among fitted ``levels``; -1 for a level not seen in fitting."""
    rows = row_labels(data[variables[0]])
    for v in variables[1:]:
        rows = rows + ":" + row_labels(data[v])
    lookup = {lv: i for i, lv in enumerate(levels)}
    return np.array([lookup.get(r, -1) for r in rows], dtype=np.int32)


def _coordinate_labels(data: pd.DataFrame, columns: tuple[str, ...]) -> np.ndarray:
    rows = None
    for c in columns:
        lab = np.array([r_label(float(v)) for v in data[c].to_numpy(float)], dtype=object)
        rows = lab if rows is None else rows + "," + lab
    return "(" + rows + ")"


def num_factor(data: pd.DataFrame, columns: tuple[str, ...]) -> tuple[pd.Categorical, np.ndarray]:
    """glmmTMB's ``numFactor``: the coordinates as a categorical, and the (k, ndim) coordinates.

    Levels are the distinct coordinates, sorted by the last column first (R sorts
    stably by each column in turn), labelled "(x,y)".
    """
    for c in columns:
        if not pd.api.types.is_numeric_dtype(data[c]) or pd.api.types.is_bool_dtype(data[c]):
            raise ValueError(f"pos() needs numeric coordinate columns; {c!r} has dtype {data[c].dtype}.")
    coords = data[list(columns)].to_numpy(float)
    labels = _coordinate_labels(data, columns)
    _, first = np.unique(labels, return_index=True)
    first = np.sort(first)
    unique = coords[first]
    order = np.lexsort(tuple(unique[:, j] for j in range(unique.shape[1])))
    levels = list(labels[first][order])
    return pd.Categorical(labels, categories=levels), unique[order]


def num_factor_like(data: pd.DataFrame, columns: tuple[str, ...], levels: list[str]) -> pd.Categorical:
    """Coordinates of new data as a categorical over fitted ``levels`` (new ones become NaN)."""
    return pd.Categorical(_coordinate_labels(data, columns), categories=levels)
