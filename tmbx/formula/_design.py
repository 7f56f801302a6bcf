"""Formula strings + a DataFrame -> the matrices of a glmmTMB-style model.

Pipeline: parse (``_parse``) -> check names -> drop rows with missing values ->
response -> one :class:`Component` per linear predictor ("cond", "zi", "disp"),
each with its fixed-effect matrix (formulaic, rank-deficient columns dropped),
offset and random-effect terms (:class:`ReTerm`). Everything needed to rebuild
the same columns on new data is kept in ``Design.spec`` for :func:`new_design`.

This layer is pure numpy/pandas: covariance structures are plain names checked
against :data:`STRUCTURES`; families are not imported.
"""

from __future__ import annotations

import builtins
import re
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from formulaic import model_matrix
from formulaic.errors import DataMismatchWarning, FormulaicError
from formulaic.transforms import TRANSFORMS, C

from ._groups import group_factor, map_groups, num_factor, num_factor_like
from ._parse import (STRUCTURES, BarTerm, Expr, FormulaError, ParsedFormula,
                     formula_error, parse_formula, suggest)

__all__ = ["ReTerm", "Component", "Design", "DesignSpec", "build_design", "new_design",
           "FormulaError", "STRUCTURES"]

# R spellings that formulaic does not know; `factor(x)` behaves as `C(x)`.
_CONTEXT = {
    "factor": C, "sqrt": np.sqrt, "abs": np.abs, "log1p": np.log1p, "expm1": np.expm1,
    "sin": np.sin, "cos": np.cos, "tan": np.tan, "round": np.round, "pi": np.pi,
}
_KNOWN_NAMES = set(_CONTEXT) | set(TRANSFORMS) | set(dir(builtins)) | {"C"}

_NEEDS_FACTOR = ("ar1", "hetar1")
_NEEDS_COORDS = ("exp", "gau", "mat", "ou")
_ONE_GROUP_OK = ("ar1", "hetar1", "ou", "exp", "gau", "mat", "toep", "cs", "homcs",
                 "homdiag", "propto", "equalto")
_ARGS = {"rr": ("d",), "propto": ("matrix",), "equalto": ("matrix",)}
_RANK_TOL = 1e-7


# --------------------------------------------------------------------------- results

@dataclass
class ReTerm:
    """One random-effect term ``structure(terms | group)`` on the rows of the data.

    ``group``: glmmTMB's group name ("Subject", "recipe:replicate"; a repeated
    name gets ".1", ".2" as glmmTMB's VarCorr does); ``terms``: the k column
    names ("Intercept", "Days", "spp[GP]", "C(age)[8]", "pos(3.1,0)");
    ``structure``: covariance structure name ("us", "diag", "ar1", ...);
    ``args``: {"d": int} for rr, {"coords": (k, ndim)} for exp/gau/mat,
    {"times": (k,)} for ou, {"matrix": (k, k)} for propto/equalto, else {};
    ``index``: (N,) int32 group level of each row (-1: a level not seen in
    fitting, only from :func:`new_design`); ``levels``: the m level labels;
    ``Z``: (N, k) float64 values of the term's columns on each row.
    """

    group: str
    terms: list[str]
    structure: str
    args: dict
    index: np.ndarray
    levels: list[str]
    Z: np.ndarray


@dataclass
class Component:
    """One linear predictor, ``eta = X @ beta + sum_t Z_t b_t[index_t] + offset``.

    ``X``: (N, p) fixed-effect matrix, rank-deficient columns removed;
    ``names``: formulaic column names ("Intercept", "spp[T.PR]"); ``re``: the
    random-effect terms in formula order; ``offset``: (N,) sum of the offset()
    terms (plus the ``offset=`` argument for "cond"); ``formula``: as given.
    """

    X: np.ndarray
    names: list[str]
    re: list[ReTerm]
    offset: np.ndarray
    formula: str

    @property
    def intercept_only(self) -> bool:
        """One value for every row: an intercept column alone, no offset (glmmTMB's
        ``dispformula = ~1``; random effects are the caller's to check)."""
        return self.X.shape[1] == 1 and bool(np.all(self.X == 1.0)) and not np.any(self.offset)


@dataclass
class Design:
    """Everything a fit needs from the formula and the data.

    ``y``: (N,) response (successes for cbind; None from :func:`new_design`
    when new data have no response); ``trials``: (N,) binomial trials or None;
    ``weights``: (N,) prior weights; ``components``: "cond", "disp" and, when
    a zero-inflation formula other than ~0 is given, "zi"; ``nobs``: N;
    ``dropped``: positions in the original data of rows dropped for missing
    values; ``response_name``: the response as written; ``data``: the rows
    used (original index kept); ``spec``: what :func:`new_design` needs.
    """

    y: np.ndarray | None
    trials: np.ndarray | None
    weights: np.ndarray
    components: dict[str, Component]
    nobs: int
    dropped: np.ndarray
    response_name: str
    data: pd.DataFrame
    spec: "DesignSpec"


# --------------------------------------------------------------------------- specs

@dataclass
class _ReSpec:
    bar: BarTerm
    lhs_spec: object            # formulaic ModelSpec of the bar's left side
    pos_levels: list[list[str]]
    terms: list[str]
    levels: list[str]
    group: str
    args: dict


@dataclass
class _ComponentSpec:
    parsed: ParsedFormula
    fixed_spec: object          # formulaic ModelSpec of the fixed part
    names: list[str]            # kept columns
    re: list[_ReSpec] = field(default_factory=list)


@dataclass
class DesignSpec:
    """How a :class:`Design` was built, to rebuild the same columns on new data."""

    components: dict[str, _ComponentSpec]
    family_needs_trials: bool
    weights: str | None         # weights column name, if weights were given by name
    offset: str | None          # offset column name, if the offset= argument was a name
    offset_given: bool
    env: dict


# --------------------------------------------------------------------------- building

def build_design(formula, data, ziformula=None, dispformula=None, weights=None, offset=None,
                 na_action="omit", family_needs_trials=False, *, env=None) -> Design:
    """Build the model matrices of ``formula`` (glmmTMB syntax) on ``data``.

    ``weights`` and ``offset``: None, a column name, or an (N,) array (the
    offset adds to the conditional model). ``na_action``: "omit" drops rows
    with a missing value in any column the model uses (with a warning);
    "fail" raises. ``family_needs_trials``: binomial-type response handling
    (0/1, two-level factor, or proportions with ``weights`` as trials).
    ``env``: a dict of extra names, e.g. the matrix ``M`` of
    ``propto(0 + sp | g, M)``; matrices are looked up in ``env``, then in
    ``data.attrs``.

    Raises :class:`FormulaError` (a ValueError) for anything visible before
    fitting: syntax, unknown columns or structures, bad responses.
    """
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame, got {type(data).__name__}.")
    env = dict(env or {})
    parsed = _parse_all(formula, ziformula, dispformula)
    for p in parsed.values():
        _check_names(p, data, env)
    if len(data) == 0:
        raise ValueError("The data frame has no rows.")
    w_full = _argument_vector(weights, data, "weights")
    o_full = _argument_vector(offset, data, "offset")
    keep = _complete_rows(parsed, data, w_full, o_full, weights, offset, na_action)
    frame = data.loc[keep].reset_index(drop=True)
    n = len(frame)
    if n == 0:
        raise ValueError("No rows left after dropping rows with missing values.")
    cond = parsed["cond"]
    y, trials, prior = _response(cond, frame, family_needs_trials,
                                 None if w_full is None else w_full[keep])
    extra = np.zeros(n) if o_full is None else o_full[keep]
    components, specs = {}, {}
    for role, p in parsed.items():
        comp, cspec = _component(p, role, frame, extra if role == "cond" else np.zeros(n), env)
        components[role], specs[role] = comp, cspec
    if "zi" in components:
        components["zi"].formula = ziformula
    spec = DesignSpec(specs, family_needs_trials, weights if isinstance(weights, str) else None,
                      offset if isinstance(offset, str) else None, offset is not None, env)
    return Design(y, trials, prior, components, n, np.flatnonzero(~keep).astype(np.int64),
                  cond.response_text, data.loc[keep], spec)


def _parse_all(formula, ziformula, dispformula) -> dict[str, ParsedFormula]:
    parsed = {"cond": parse_formula(formula, role="formula")}
    if ziformula is not None:
        zi = parse_formula(ziformula, role="ziformula")
        if zi.fixed.python.strip() == ".":
            zi = replace(parsed["cond"], response=None, response_is_cbind=False, response_text=None)
        if not (zi.fixed.python.strip() in ("0", "-1") and not zi.bars and not zi.offsets):
            parsed["zi"] = zi
    disp = parse_formula("~1" if dispformula is None else dispformula, role="dispformula")
    if disp.bars:
        raise formula_error(disp.text, disp.bars[0].start,
                            "dispformula takes fixed effects only (as in glmmTMB 1.1.5); "
                            "remove the random-effect term.")
    parsed["disp"] = disp
    return parsed


def _exprs(p: ParsedFormula) -> list[Expr]:
    return (list(p.response or []) + [p.fixed] + list(p.offsets) + [b.lhs for b in p.bars])


def _check_names(p: ParsedFormula, data: pd.DataFrame, env: dict) -> None:
    """Unknown columns and functions, with a caret and close names."""
    columns = set(map(str, data.columns))
    placeholders = {c.placeholder for b in p.bars for c in b.pos}
    for e in _exprs(p):
        for name, pos in e.variables:
            if name in columns or name in env or name in placeholders or name.split(".")[0] in _KNOWN_NAMES:
                continue
            raise formula_error(p.text, pos, f"Unknown column {name!r} in the formula.{suggest(name, columns)} "
                                f"Data columns: {', '.join(sorted(columns))}.")
        for name, pos in e.functions:
            root = name.split(".")[0]
            if root in _KNOWN_NAMES or root in env:
                continue
            raise formula_error(p.text, pos, f"Unknown function {name!r} in the formula."
                                f"{suggest(name, sorted(_KNOWN_NAMES - set(dir(builtins))))}")
    for b in p.bars:
        for c in b.pos:
            for col in c.columns:
                if col not in columns:
                    raise formula_error(p.text, c.start,
                                        f"Unknown coordinate column {col!r} in pos().{suggest(col, columns)}")
        for g in b.group:
            if g not in columns:
                raise formula_error(p.text, b.group_start, f"Unknown grouping column {g!r}.{suggest(g, columns)} "
                                    f"Data columns: {', '.join(sorted(columns))}.")


def _used_columns(p: ParsedFormula, columns) -> list[str]:
    names = [n for e in _exprs(p) for n, _ in e.variables]
    names += [g for b in p.bars for g in b.group]
    names += [c for b in p.bars for pc in b.pos for c in pc.columns]
    cols = set(map(str, columns))
    return [n for n in dict.fromkeys(names) if n in cols]


def _argument_vector(value, data: pd.DataFrame, what: str):
    """weights=/offset= as an (N,) float array over the original rows, or None."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in data.columns:
            raise ValueError(f"{what}={value!r} is not a column of the data.{suggest(value, data.columns)}")
        value = data[value]
    arr = np.asarray(value, dtype=float).reshape(-1)
    if arr.shape[0] != len(data):
        raise ValueError(f"{what} has {arr.shape[0]} values but the data have {len(data)} rows.")
    if what == "weights" and np.any(arr[np.isfinite(arr)] < 0):
        raise ValueError("weights must be non-negative.")
    return arr


def _complete_rows(parsed, data, w_full, o_full, weights, offset, na_action) -> np.ndarray:
    """Boolean mask of rows with no missing value in a used column (R's na.omit)."""
    if na_action not in ("omit", "fail", "na.omit", "na.fail"):
        raise ValueError(f"na_action must be 'omit' or 'fail', got {na_action!r}.")
    used = list(dict.fromkeys(c for p in parsed.values() for c in _used_columns(p, data.columns)))
    missing = {c: data[c].isna().to_numpy() for c in used}
    for name, arr, given in (("weights", w_full, weights), ("offset", o_full, offset)):
        if arr is not None and not isinstance(given, str):
            missing[f"{name}="] = np.isnan(arr)
        elif arr is not None:
            missing[given] = np.isnan(arr)
    bad = np.zeros(len(data), bool)
    for m in missing.values():
        bad |= m
    if bad.any():
        detail = ", ".join(f"{c!r} ({int(m.sum())})" for c, m in missing.items() if m.any())
        if na_action in ("fail", "na.fail"):
            raise ValueError(f"Missing values in {detail} (na_action='fail'); "
                             f"drop those rows or use na_action='omit'.")
        warnings.warn(f"{int(bad.sum())} of {len(data)} rows dropped for missing values "
                      f"(as R's na.omit) in columns: {detail}.", stacklevel=3)
    return ~bad


# --------------------------------------------------------------------------- response

def _evaluate(e: Expr, frame: pd.DataFrame, text: str, what: str) -> pd.Series | np.ndarray:
    """A response/offset expression on the data: a column as is, else formulaic's I(...)."""
    if len(e.variables) == 1 and not e.functions and e.python.strip("` ") == e.variables[0][0] \
            and e.variables[0][0] in frame.columns:
        return frame[e.variables[0][0]]
    mm = _formulaic(f"0 + I({e.python})", frame, text, e.start, what)
    if mm.shape[1] != 1:
        raise formula_error(text, e.start, f"The {what} must evaluate to one numeric column.")
    return np.asarray(mm.iloc[:, 0], dtype=float)


def _numeric(values, text: str, e: Expr, what: str) -> np.ndarray:
    if isinstance(values, pd.Series):
        if pd.api.types.is_bool_dtype(values):
            return values.to_numpy(float)
        if not pd.api.types.is_numeric_dtype(values):
            raise formula_error(text, e.start, f"The {what} {e.python!r} is not numeric (dtype {values.dtype}); "
                                "convert it to numbers (a two-level factor is accepted only for binomial families).")
        values = values.to_numpy(float)
    return np.asarray(values, dtype=float)


def _response(p: ParsedFormula, frame, needs_trials: bool, weights):
    """(y, trials, prior weights) as glmmTMB's binomial handling defines them."""
    n = len(frame)
    ones = np.ones(n)
    if p.response_is_cbind:
        s, f = (_numeric(_evaluate(e, frame, p.text, "cbind() argument"), p.text, e, "cbind() argument")
                for e in p.response)
        if np.any(s < 0) or np.any(f < 0):
            raise formula_error(p.text, p.response[0].start if np.any(s < 0) else p.response[1].start,
                                "cbind(successes, failures): counts must be non-negative "
                                "(is the second argument failures, e.g. size - incidence?).")
        return s, s + f, ones if weights is None else weights
    e = p.response[0]
    raw = _evaluate(e, frame, p.text, "response")
    if needs_trials and isinstance(raw, pd.Series) and not pd.api.types.is_numeric_dtype(raw) \
            and not pd.api.types.is_bool_dtype(raw):
        codes = raw.cat.codes.to_numpy() if isinstance(raw.dtype, pd.CategoricalDtype) \
            else np.unique(raw.astype(str).to_numpy(), return_inverse=True)[1]
        return (codes > 0).astype(float), ones, ones if weights is None else weights
    y = _numeric(raw, p.text, e, "response")
    if not needs_trials:
        return y, None, ones if weights is None else weights
    if np.any((y < 0) | (y > 1)):
        raise formula_error(p.text, e.start, "A binomial response must be 0/1, a two-level factor, or proportions "
                            "in [0, 1] (with weights = trials); for counts use cbind(successes, failures).")
    if weights is None:
        if np.any((y != 0) & (y != 1)):
            warnings.warn("non-integer #successes in a binomial model: proportions without weights "
                          "are taken as out of 1 trial; pass the trials as weights.", stacklevel=4)
        return y, ones, ones
    successes = y * weights
    if np.any(np.abs(successes - np.round(successes)) > 1e-8):
        warnings.warn("non-integer #successes in a binomial model (proportion * weights).", stacklevel=4)
    return successes, weights.copy(), ones


# --------------------------------------------------------------------------- components

def _formulaic(text_py: str, frame: pd.DataFrame, text: str, pos: int, what: str, spec=None):
    """Run formulaic, turning its errors into a FormulaError pointing into the formula."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DataMismatchWarning)
            if spec is not None:
                return spec.get_model_matrix(frame, context=_CONTEXT)
            return model_matrix(text_py, frame, context=_CONTEXT, na_action="ignore")
    except DataMismatchWarning as err:
        levels = str(err).split(":", 1)[-1].split(".")[0].strip()
        raise formula_error(text, pos, f"New data have factor levels not seen in fitting in the {what}: "
                            f"{levels}. Fixed effects need known levels.") from None
    except (FormulaicError, NameError, TypeError, ValueError) as err:
        raise formula_error(text, pos, f"Could not build the {what} {text_py!r}: {err}") from None


def _finite(X: np.ndarray, names, text: str, pos: int, what: str) -> None:
    bad = ~np.isfinite(X)
    if bad.any():
        cols = [names[j] for j in np.flatnonzero(bad.any(axis=0))]
        raise formula_error(text, pos, f"The {what} has non-finite values in column(s) {cols} "
                            f"({int(bad.any(axis=1).sum())} rows), e.g. log of 0 or of a negative number.")


def drop_rank_deficient(X: np.ndarray, tol: float = _RANK_TOL) -> list[int]:
    """Columns to keep: each column is kept unless it lies in the span of the
    earlier kept ones (relative residual norm < tol), as R's pivoted QR
    (dqrdc2) keeps the earlier columns of a rank-deficient model matrix."""
    norms = np.linalg.norm(X, axis=0)
    if X.shape[1] and X.shape[0] >= X.shape[1] and np.all(norms > 0):
        R = np.linalg.qr(X, mode="r")
        if np.all(np.abs(np.diag(R)) > tol * norms):
            return list(range(X.shape[1]))  # full rank: the common case, one QR
    kept, Q = [], np.zeros((X.shape[0], 0))
    for j in range(X.shape[1]):
        x = X[:, j]
        norm = np.linalg.norm(x)
        if norm == 0:
            continue
        r = x - Q @ (Q.T @ x)
        r = r - Q @ (Q.T @ r)  # re-orthogonalise
        rn = np.linalg.norm(r)
        if rn > tol * norm:
            kept.append(j)
            Q = np.column_stack([Q, r / rn])
    return kept


def _component(p: ParsedFormula, role: str, frame, extra_offset, env):
    label = {"cond": "conditional model", "zi": "zero-inflation model", "disp": "dispersion model"}[role]
    mm = _formulaic(p.fixed.python, frame, p.text, p.fixed.start, f"fixed effects of the {label}")
    names, X = list(map(str, mm.columns)), np.asarray(mm, dtype=float).reshape(len(frame), -1)
    _finite(X, names, p.text, p.fixed.start, f"fixed-effect matrix of the {label}")
    kept = drop_rank_deficient(X)
    if len(kept) < len(names):
        dropped = [names[j] for j in range(len(names)) if j not in kept]
        warnings.warn(f"fixed effects in the {label} are rank deficient; dropping column(s) "
                      f"{', '.join(dropped)} (the later of collinear columns, as R's lm does).", stacklevel=3)
    offset = extra_offset.astype(float).copy()
    for e in p.offsets:
        offset += _numeric(_evaluate(e, frame, p.text, "offset"), p.text, e, "offset")
    if not np.all(np.isfinite(offset)):
        raise formula_error(p.text, p.offsets[0].start if p.offsets else None,
                            f"The offset of the {label} has non-finite values.")
    cspec = _ComponentSpec(p, mm.model_spec, [names[j] for j in kept])
    re = []
    for bar in p.bars:
        term, rspec = _re_term(bar, p.text, frame, env)
        re.append(term)
        cspec.re.append(rspec)
    _unique_group_names(re, cspec.re)
    return Component(X[:, kept], cspec.names, re, offset, p.text), cspec


def _unique_group_names(re: list[ReTerm], specs: list[_ReSpec]) -> None:
    seen: dict[str, int] = {}
    for term, spec in zip(re, specs):
        k = seen.get(term.group, 0)
        seen[term.group] = k + 1
        if k:
            term.group = spec.group = f"{term.group}.{k}"


def _lhs_frame(bar: BarTerm, frame: pd.DataFrame, pos_levels=None):
    """The data with each pos() call as a coordinate factor column; and the (k, ndim) coordinates."""
    if not bar.pos:
        return frame, [], []
    cols, levels, coords = {}, [], []
    for j, pc in enumerate(bar.pos):
        if pos_levels is None:
            cat, xy = num_factor(frame, pc.columns)
            coords.append(xy)
        else:
            cat = num_factor_like(frame, pc.columns, pos_levels[j])
            if np.any(cat.codes < 0):
                raise ValueError(f"New data have coordinates in pos({', '.join(pc.columns)}) not seen in fitting; "
                                 "predicting at new positions is not supported.")
        cols[pc.placeholder] = cat
        levels.append(list(cat.categories))
    return frame.assign(**cols), levels, coords


def _term_names(names: list[str], bar: BarTerm) -> list[str]:
    """Placeholder column names back to glmmTMB's: '_tmbx_pos0[T.(1,2)]' -> 'pos(1,2)'."""
    for pc in bar.pos:
        pattern = re.compile(re.escape(pc.placeholder) + r"\[(?:T\.)?(\([^\]]*\))\]")
        names = [pattern.sub(r"pos\1", nm) for nm in names]
    return names


def _re_term(bar: BarTerm, text: str, frame: pd.DataFrame, env: dict):
    try:
        tmp, pos_levels, coords = _lhs_frame(bar, frame)
    except ValueError as err:
        raise formula_error(text, bar.pos[0].start, str(err)) from None
    mm = _formulaic(bar.lhs.python, tmp, text, bar.lhs.start, f"left side of {bar.text!r}")
    terms = _term_names(list(map(str, mm.columns)), bar)
    Z = np.asarray(mm, dtype=float).reshape(len(frame), -1)
    _finite(Z, terms, text, bar.lhs.start, f"random-effect term {bar.text!r}")
    if Z.shape[1] == 0:
        raise formula_error(text, bar.lhs.start, f"The random-effect term {bar.text!r} has no columns; "
                            "write (1 | g) for a random intercept.")
    _check_structure(bar, text, mm.model_spec, terms)
    args = _structure_args(bar, text, terms, pos_levels, coords, frame, env)
    index, levels = group_factor(frame, bar.group)
    group = ":".join(bar.group)
    if len(levels) < 2 and not (bar.structure in _ONE_GROUP_OK and len(terms) > 1):
        raise formula_error(text, bar.group_start,
                            f"The grouping factor {group!r} has a single level ({levels[0]!r}) in {bar.text!r}: "
                            "a random effect needs several groups. Remove the term or use a factor with more levels "
                            "(one group is allowed only for structured terms over several columns, "
                            "e.g. ar1(time + 0 | g) or exp(pos(x, y) + 0 | g)).")
    term = ReTerm(group, terms, bar.structure, args, index, levels, Z)
    return term, _ReSpec(bar, mm.model_spec, pos_levels, terms, levels, group, args)


def _check_structure(bar: BarTerm, text: str, spec, terms: list[str]) -> None:
    s = bar.structure
    if s in _NEEDS_FACTOR:
        numeric = [f for f, (kind, _) in spec.encoder_state.items() if getattr(kind, "value", kind) == "numerical"]
        if numeric:
            example = f"{s}(C({numeric[0]}) + 0 | {':'.join(bar.group)})"
            raise formula_error(text, bar.lhs.start,
                                f"{s}() needs a factor of time points on the left of the bar, but {numeric[0]!r} "
                                f"is numeric. Write {example} to use its values as time points.")
        if "Intercept" in terms:
            warnings.warn(f"{s}: AR1 not meaningful with intercept; write {s}(time + 0 | g).", stacklevel=5)
    if s in _NEEDS_COORDS:
        if len(bar.pos) != 1 or not all(t.startswith("pos(") for t in terms):
            example = "ou(pos(t) + 0 | g)" if s == "ou" else f"{s}(pos(x, y) + 0 | g)"
            raise formula_error(text, bar.lhs.start, f"{s}() needs coordinates, and only them, on the left of the bar: "
                                f"write {example} (one pos() call, no intercept).")
        if s == "ou" and len(bar.pos[0].columns) != 1:
            raise formula_error(text, bar.pos[0].start, "ou() takes one time coordinate: write ou(pos(t) + 0 | g).")


def _structure_args(bar: BarTerm, text: str, terms, pos_levels, coords, frame, env) -> dict:
    s, given, k = bar.structure, dict(bar.args), len(terms)
    unknown = set(given) - set(_ARGS.get(s, ()))
    if unknown:
        allowed = ", ".join(_ARGS.get(s, ())) or "none"
        raise formula_error(text, bar.start, f"{s}() does not take argument(s) {sorted(unknown)} (allowed: {allowed}).")
    if s == "rr":
        d = given.get("d", 2)
        if not isinstance(d, int) or d < 1:
            raise formula_error(text, bar.start, f"rr(..., d = {d!r}): d must be a positive integer.")
        if d > k:
            raise formula_error(text, bar.start,
                                f"rr(..., d = {d}): the rank d cannot exceed the {k} columns of the term.")
        return {"d": d}
    if s in ("propto", "equalto"):
        return {"matrix": _lookup_matrix(bar, text, given.get("matrix"), k, frame, env)}
    if s in ("exp", "gau", "mat"):
        return {"coords": _columns_coords(terms, pos_levels[0], coords[0])}
    if s == "ou":
        return {"times": _columns_coords(terms, pos_levels[0], coords[0])[:, 0]}
    return {}


def _columns_coords(terms, levels, coords) -> np.ndarray:
    """Coordinates of each column 'pos(...)', in column order."""
    row = {f"pos{lv}": i for i, lv in enumerate(levels)}
    return np.asarray(coords[[row[t] for t in terms]], dtype=float)


def _lookup_matrix(bar, text, name, k, frame, env) -> np.ndarray:
    s = bar.structure
    if name is None:
        raise formula_error(text, bar.start,
                            f"{s}() needs a matrix: write {s}(lhs | g, M) with M in env= or data.attrs.")
    if name in env:
        M = env[name]
    elif name in getattr(frame, "attrs", {}):
        M = frame.attrs[name]
    else:
        raise formula_error(text, bar.start, f"Matrix {name!r} for {s}() not found: pass env={{{name!r}: M}} "
                            f"to build_design, or set data.attrs[{name!r}].")
    M = np.asarray(M, dtype=float)
    if M.shape != (k, k):
        raise formula_error(text, bar.start, f"Matrix {name!r} for {s}() has shape {M.shape}; "
                            f"the term has {k} columns, so it must be ({k}, {k}).")
    if not np.allclose(M, M.T):
        raise formula_error(text, bar.start, f"Matrix {name!r} for {s}() must be symmetric.")
    return M


# --------------------------------------------------------------------------- new data

def new_design(design: Design, newdata: pd.DataFrame, allow_new_levels: bool = True, *,
               weights=None, offset=None, na_action="omit") -> Design:
    """The same columns, contrasts and levels as ``design``, on ``newdata`` (for predict).

    Random-effect indices refer to the fitted levels; a level not seen in
    fitting gets -1 (or raises when ``allow_new_levels`` is False). Fixed-effect
    factor levels must be known. The response is computed when its columns are
    present (else ``y`` is None). ``offset``: the offset= argument for new rows
    (needed when the fit's offset= was an array); by default a column-name
    offset is read from ``newdata``.
    """
    spec = design.spec
    if not isinstance(newdata, pd.DataFrame):
        raise TypeError(f"newdata must be a pandas DataFrame, got {type(newdata).__name__}.")
    parsed = {r: c.parsed for r, c in spec.components.items()}
    response_vars = {n for e in (parsed["cond"].response or []) for n, _ in e.variables}
    cols = set(map(str, newdata.columns))
    has_response = response_vars <= cols
    predictors = [replace(p, response=None) for p in parsed.values()]
    for p in predictors:
        _check_names(p, newdata, spec.env)
    if spec.offset_given and offset is None:
        if spec.offset is None:
            raise ValueError("The model was fitted with an offset= array: pass offset= for the new rows.")
        offset = spec.offset
    w_full = _argument_vector(weights if weights is not None else (spec.weights if spec.weights in cols else None),
                              newdata, "weights")
    o_full = _argument_vector(offset, newdata, "offset")
    keep = _complete_rows({r: p for r, p in zip(parsed, predictors)}, newdata, w_full, o_full,
                          weights, offset, na_action)
    frame = newdata.loc[keep].reset_index(drop=True)
    n = len(frame)
    y = trials = None
    prior = np.ones(n) if w_full is None else w_full[keep]
    if has_response and parsed["cond"].response:
        y, trials, prior = _response(parsed["cond"], frame, spec.family_needs_trials,
                                     None if w_full is None else w_full[keep])
    extra = np.zeros(n) if o_full is None else o_full[keep]
    components = {role: _new_component(c, frame, extra if role == "cond" else np.zeros(n), allow_new_levels)
                  for role, c in spec.components.items()}
    for role, comp in components.items():
        comp.formula = design.components[role].formula
    return Design(y, trials, prior, components, n, np.flatnonzero(~keep).astype(np.int64),
                  parsed["cond"].response_text, newdata.loc[keep], spec)


def _new_component(c: _ComponentSpec, frame, extra_offset, allow_new_levels) -> Component:
    p = c.parsed
    mm = _formulaic(p.fixed.python, frame, p.text, p.fixed.start, "fixed effects", spec=c.fixed_spec)
    X = np.asarray(mm[c.names], dtype=float).reshape(len(frame), -1)
    offset = extra_offset.astype(float).copy()
    for e in p.offsets:
        offset += _numeric(_evaluate(e, frame, p.text, "offset"), p.text, e, "offset")
    re = []
    for r in c.re:
        try:
            tmp, _, _ = _lhs_frame(r.bar, frame, r.pos_levels)
        except ValueError as err:
            raise formula_error(p.text, r.bar.pos[0].start, str(err)) from None
        mmz = _formulaic(r.bar.lhs.python, tmp, p.text, r.bar.lhs.start, f"left side of {r.bar.text!r}",
                         spec=r.lhs_spec)
        index = map_groups(frame, r.bar.group, r.levels)
        if not allow_new_levels and np.any(index < 0):
            new = sorted(set(frame.loc[index < 0, list(r.bar.group)].astype(str).agg(":".join, axis=1)))
            raise ValueError(f"New data have level(s) of {r.group!r} not seen in fitting: {new[:5]}; "
                             "use allow_new_levels=True to predict them at the population level.")
        re.append(ReTerm(r.group, list(r.terms), r.bar.structure, r.args, index, list(r.levels),
                         np.asarray(mmz, dtype=float).reshape(len(frame), -1)))
    return Component(X, list(c.names), re, offset, p.text)
