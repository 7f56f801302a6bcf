"""Per-term tests of fixed effects: Wald chi-square tables (car::Anova on glmmTMB fits),
F tables with Satterthwaite/Kenward-Roger df (lmerTest's anova), drop1, and linear
hypotheses (car::linearHypothesis, lmerTest's contest)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats as sst

_COMPONENTS = {"cond": "beta", "zi": "betazi", "disp": "betadisp"}


@dataclass
class FixedTerm:
    """One term of a component's fixed-effect formula: its R label ("spp:mined",
    "(Intercept)"), the positions of its kept columns, and its variables."""

    label: str
    cols: list
    factors: frozenset


def model_terms(fit, component: str = "cond") -> list[FixedTerm]:
    """The terms of a component, in formula order, from formulaic's model spec."""
    _check_component(fit, component)
    spec = fit.design.spec.components[component].fixed_spec
    names = list(fit.design.components[component].names)
    out = []
    for ts in spec.structure:
        cols = [names.index(c) for c in ts.columns if c in names]
        factors = frozenset(str(f) for f in ts.term.factors) - {"1"}
        label = "(Intercept)" if not factors else str(ts.term)
        if cols:
            out.append(FixedTerm(label, cols, factors))
    return out


def _check_component(fit, component):
    if component not in _COMPONENTS:
        raise ValueError(f"component must be 'cond', 'zi' or 'disp', got {component!r}.")
    if component not in fit.design.components or _COMPONENTS[component] not in fit.template.names:
        have = [c for c in _COMPONENTS if c in fit.fixef]
        raise ValueError(f"this fit has no {component!r} fixed effects (it has {have}).")


def wald_chisq(beta, V, L, rhs=0.0):
    """(Chisq, Df) of the Wald test of L beta = rhs (car::linearHypothesis)."""
    L = np.atleast_2d(np.asarray(L, float))
    diff = L @ beta - np.broadcast_to(np.asarray(rhs, float), (L.shape[0],))
    M = L @ V @ L.T
    df = int(np.linalg.matrix_rank(M))
    if df < L.shape[0]:
        raise ValueError("the hypothesis matrix has linearly dependent rows (or coefficients with zero variance); "
                         "remove the redundant rows.")
    return float(diff @ np.linalg.solve(M, diff)), df


def _null_complement(A, tol=1e-10):
    """Columns spanning the orthogonal complement of the column space of A."""
    U, s, _ = np.linalg.svd(A, full_matrices=True)
    rank = int(np.sum(s > tol * max(s.max() if s.size else 0, 1)))
    return U[:, rank:]


def type2_matrix(term: FixedTerm, terms: list[FixedTerm], p: int, V: np.ndarray) -> np.ndarray:
    """car's Anova.II.default hypothesis for a term: its columns, made orthogonal (in
    the metric V) to the terms that contain it (ConjComp of Monette)."""
    eye = np.eye(p)
    rel = [t for t in terms if t is not term and t.label != "(Intercept)" and term.factors <= t.factors]
    rel_cols = [c for t in rel for c in t.cols]
    H2 = eye[rel_cols + term.cols]
    if not rel_cols:
        return H2
    H1 = eye[rel_cols]
    N = _null_complement(H2 @ V @ H1.T)
    H = (H2.T @ N).T
    return H[~np.all(np.abs(H) < 1e-12, axis=1)]


def _sum_coded(fit, component):
    """The fixed-effect matrix rebuilt with sum-to-zero contrasts for every reduced-rank
    factor (numeric variables as they are), and each term's columns in it."""
    from formulaic import model_matrix

    from ..formula._design import _CONTEXT

    spec = fit.design.spec.components[component].fixed_spec
    frame = fit.design.data.reset_index(drop=True)
    cache = {}

    def encode(factor, reduced):
        key = (str(factor), reduced)
        if key not in cache:
            state = spec.encoder_state.get(str(factor))
            categorical = state is not None and getattr(state[0], "value", state[0]) == "categorical"
            mm = np.asarray(model_matrix(f"0 + {factor}", frame, context=_CONTEXT, na_action="ignore"), float)
            if categorical and reduced:
                mm = mm[:, :-1] - mm[:, -1:]  # contr.sum: the last level is minus the sum of the others
            cache[key] = mm
        return cache[key]

    blocks, cols = [], {}
    start = 0
    for ts in spec.structure:
        label = "(Intercept)" if not (frozenset(str(f) for f in ts.term.factors) - {"1"}) else str(ts.term)
        for sc in ts.scoped_terms:
            B = np.ones((len(frame), 1))
            for f in sc.factors:
                E = encode(f.factor, f.reduced)
                B = (B[:, :, None] * E[:, None, :]).reshape(len(frame), -1)
            blocks.append(B)
            cols.setdefault(label, []).extend(range(start, start + B.shape[1]))
            start += B.shape[1]
    return np.concatenate(blocks, axis=1), cols


def type3_matrix_sum(fit, term: FixedTerm, component="cond") -> np.ndarray:
    """lmerTest's type III hypothesis for a term, independent of the contrast coding:
    the term's coefficients under sum-to-zero contrasts, mapped to the fitted coding
    (beta_sum = X_sum^+ X beta)."""
    cache = fit.__dict__.setdefault("_type3_sum", {})
    if component not in cache:
        Xs, cols = _sum_coded(fit, component)
        X = fit.design.components[component].X
        cache[component] = (np.linalg.pinv(Xs) @ X, cols)
    Map, cols = cache[component]
    L = Map[cols[term.label]]
    _, s, Vt = np.linalg.svd(L, full_matrices=False)
    return Vt[s > 1e-9 * max(s.max(), 1)]


def type2_matrix_lmertest(fit, term: FixedTerm, terms: list[FixedTerm], component="cond") -> np.ndarray:
    """lmerTest's type II hypothesis: a term not contained in another (containment counts
    only terms with the same numeric variables) is tested on its own columns; otherwise
    on the rows of the Doolittle factor of X'X with the term after every other term
    but before those that contain it (``get_contrasts_type2``)."""
    state = fit.design.spec.components[component].fixed_spec.encoder_state
    numeric = {t.label: {f for f in t.factors if f in state and getattr(state[f][0], "value", "") == "numerical"}
               for t in terms}
    body = [t for t in terms if t.label != "(Intercept)"]
    containers = [o for o in body if o is not term and term.factors < o.factors
                  and numeric[o.label] == numeric[term.label]]
    X = fit.design.components[component].X
    p = X.shape[1]
    if not containers:
        return np.eye(p)[term.cols]
    last = term.cols + [c for o in containers for c in o.cols]
    perm = [c for c in range(p) if c not in last] + last
    C = np.linalg.cholesky(X[:, perm].T @ X[:, perm])
    Lt = (C / np.diag(C)).T  # Doolittle's unit lower factor of X'X = L D L', transposed
    Lt[np.abs(Lt) < 1e-6] = 0.0
    rows = [perm.index(c) for c in term.cols]
    out = np.zeros((len(rows), p))
    out[:, perm] = Lt[rows]
    return out


def anova_terms(fit, type=3, component="cond", ddf=None) -> pd.DataFrame:
    """Per-term tests of one component's fixed effects.

    Without ``ddf``: Wald chi-square (car::Anova on a glmmTMB fit): Chisq, Df,
    Pr(>Chisq); type 3 tests each term's columns (with "(Intercept)", so it
    depends on the contrasts, as car warns), type 2 respects marginality.
    With ``ddf`` ("satterthwaite", "kenward-roger", "containment"; LMMs only):
    lmerTest's F table, Sum Sq, Mean Sq, NumDF, DenDF, F value, Pr(>F); its type 3
    hypotheses do not depend on the coding (sum-to-zero contrasts mapped to the
    fitted ones), its type 2 ones its containment rule (``get_contrasts_type2``).
    """
    type = {"2": 2, "II": 2, "3": 3, "III": 3}.get(str(type).upper())
    if type is None:
        raise ValueError("type must be 2 or 3 ('II' or 'III'); type 1 (sequential) tests are not provided.")
    terms = model_terms(fit, component)
    p = len(fit.template.names[_COMPONENTS[component]])
    tested = [t for t in terms if type == 3 or t.label != "(Intercept)"]
    if ddf is not None:
        from ._ddf import f_test

        if component != "cond":
            raise ValueError("ddf applies to the conditional model of an LMM.")
        rows = {}
        sigma2 = fit.sigma ** 2
        for t in tested:
            if t.label == "(Intercept)":
                continue  # lmerTest leaves the intercept out of its anova
            L = type3_matrix_sum(fit, t) if type == 3 else type2_matrix_lmertest(fit, t, terms)
            F, ndf, dendf, Fu = f_test(fit, L, 0.0, ddf=ddf)
            rows[t.label] = {"Sum Sq": Fu * sigma2 * ndf, "Mean Sq": Fu * sigma2, "NumDF": ndf, "DenDF": dendf,
                             "F value": F, "Pr(>F)": float(sst.f.sf(F, ndf, dendf))}
        return pd.DataFrame.from_dict(rows, orient="index")
    beta = fit.fixef[component].to_numpy()
    V = fit.vcov()[component].to_numpy()
    rows = {}
    for t in tested:
        L = np.eye(p)[t.cols] if type == 3 else type2_matrix(t, terms, p, V)
        chisq, df = wald_chisq(beta, V, L)
        rows[t.label] = {"Chisq": chisq, "Df": df, "Pr(>Chisq)": float(sst.chi2.sf(chisq, df))}
    return pd.DataFrame.from_dict(rows, orient="index")


# --------------------------------------------------------------------------- drop1

def droppable(terms: list[FixedTerm]) -> list[FixedTerm]:
    """Terms not contained in another term (R's drop.scope): marginality."""
    body = [t for t in terms if t.label != "(Intercept)"]
    return [t for t in body if not any(o is not t and t.factors < o.factors for o in body)]


def drop1(fit, test="Chisq") -> pd.DataFrame:
    """R's drop1 on a glmmTMB fit: drop each droppable conditional-model term, refit,
    and compare: Df, AIC, LRT, Pr(>Chi), with a "<none>" row.

    Each reduced model is the full one with the term's coefficients held at 0
    (``map``), warm-started at the full estimates: the same likelihood as
    refitting the smaller formula. REML fits are compared on ML refits (the
    REML criterion of models with different fixed effects is not comparable).
    """
    import tmbx

    if test not in ("Chisq", "LRT", "none", None):
        raise ValueError(f"test must be 'Chisq' (likelihood ratio) or 'none', got {test!r}.")
    call = dict(fit.call)
    if call.get("map") and "beta" in call["map"]:
        raise ValueError("drop1: the fit already maps some conditional fixed effects; refit without map= for beta.")
    if fit.reml:
        warnings.warn("drop1: refitting the REML fit by ML to compare models with different fixed effects "
                      "(as lme4 does for likelihood-ratio tests).", stacklevel=3)
        base = tmbx.glmm(**{**call, "reml": False})
    else:
        base = fit
    terms = model_terms(base, "cond")
    cand = droppable(terms)
    if not cand:
        raise ValueError("drop1: the conditional model has no term that can be dropped.")
    start = {k: v for k, v in base._par().items() if k not in ("b", "bzi")}
    p = len(start["beta"])
    rows = {"<none>": {"Df": np.nan, "AIC": base.aic, "LRT": np.nan, "Pr(>Chi)": np.nan}}
    from tqdm.auto import tqdm

    for t in tqdm(cand, desc="drop1 refits", disable=len(cand) < 3, leave=False):
        st = {**start, "beta": start["beta"].copy()}
        st["beta"][t.cols] = 0.0
        keep = [None if j in t.cols else j for j in range(p)]
        m = dict(call.get("map") or {})
        m["beta"] = keep
        reduced = tmbx.glmm(**{**call, "reml": False, "start": st, "map": m})
        if not reduced.converged:
            warnings.warn(f"drop1: the refit without {t.label!r} did not converge ({reduced.message}).",
                          stacklevel=3)
        lrt = 2 * (base.loglik - reduced.loglik)
        df = len(t.cols)
        rows[t.label] = {"Df": df, "AIC": reduced.aic, "LRT": lrt, "Pr(>Chi)": float(sst.chi2.sf(max(lrt, 0), df))}
    out = pd.DataFrame.from_dict(rows, orient="index")
    if test in ("none", None):
        out = out[["Df", "AIC"]]
    return out


# --------------------------------------------------------------------------- linear hypotheses

def _r_name(name: str) -> str:
    """formulaic's column name as R writes it: 'spp[T.PR]' -> 'sppPR', 'Intercept' -> '(Intercept)'."""
    return "(Intercept)" if name == "Intercept" else re.sub(r"\[(?:T\.)?([^\]]*)\]", r"\1", name)


def _split_terms(expr: str) -> list[str]:
    """Split a linear combination at top-level + and - (not inside [] or ())."""
    out, depth, cur = [], 0, ""
    for ch in expr:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        exponent = re.fullmatch(r"[+-]?\s*[0-9.]+[eE]", cur.strip())  # 1e-3 stays one number
        if ch in "+-" and depth == 0 and cur.strip() and not exponent and not cur.strip().endswith(("*", "/")):
            out.append(cur)
            cur = ch
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def parse_hypothesis(text: str, names: list[str]):
    """'spp[T.PR] - spp[T.DM] = 0' -> (row over names, rhs). Names as in fit.fixef
    or as R writes them ('sppPR'); a term may carry a factor ('2*x', '0.5 x')."""
    lookup = {n: i for i, n in enumerate(names)}
    lookup.update({_r_name(n): i for i, n in enumerate(names)})
    lhs, _, rhs = text.partition("=")
    try:
        rhs_val = float(rhs) if rhs.strip() else 0.0
    except ValueError:
        raise ValueError(f"hypothesis {text!r}: the right side must be a number.") from None
    row = np.zeros(len(names))
    for tok in _split_terms(lhs):
        tok = tok.strip()
        sign = -1.0 if tok.startswith("-") else 1.0
        tok = tok.lstrip("+-").strip()
        m = re.match(r"^([0-9.]+(?:[eE][-+]?[0-9]+)?)\s*\*?\s*(.+)$", tok)
        coef, name = (float(m.group(1)), m.group(2).strip()) if m and m.group(2).strip() in lookup else (1.0, tok)
        if name not in lookup:
            raise ValueError(f"hypothesis {text!r}: {name!r} is not a coefficient; available: {names}.")
        row[lookup[name]] += sign * coef
    return row, rhs_val


def hypothesis_matrix(L, names: list[str], rhs=0.0):
    """L as an array (r, p) or (p,), a dict coefficient -> weight, a hypothesis string
    or a list of them -> (L, rhs, row labels)."""
    if isinstance(L, str):
        L = [L]
    if isinstance(L, dict):
        row = np.zeros(len(names))
        for k, v in L.items():
            row += float(v) * hypothesis_matrix([k], names)[0][0]
        return row[None], np.broadcast_to(np.asarray(rhs, float), (1,)).copy(), \
            [" + ".join(f"{v:g}*{k}" for k, v in L.items())]
    if isinstance(L, (list, tuple)) and L and all(isinstance(x, str) for x in L):
        rows = [parse_hypothesis(x, names) for x in L]
        return np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), list(L)
    L = np.atleast_2d(np.asarray(L, float))
    if L.shape[1] != len(names):
        raise ValueError(f"L has {L.shape[1]} columns but the component has {len(names)} coefficients {names}.")
    rhs = np.broadcast_to(np.asarray(rhs, float), (L.shape[0],)).copy()
    labels = [" + ".join(f"{w:g}*{n}" for w, n in zip(r, names) if w != 0) + f" = {c:g}" for r, c in zip(L, rhs)]
    return L, rhs, labels


def p_adjust(p, method: str):
    """R's p.adjust for "holm", "bonferroni", "none"."""
    p = np.asarray(p, float)
    n = p.size
    if method in (None, "none"):
        return p
    if method == "bonferroni":
        return np.minimum(1.0, p * n)
    if method == "holm":
        order = np.argsort(p)
        adj = np.maximum.accumulate((n - np.arange(n)) * p[order])
        out = np.empty(n)
        out[order] = np.minimum(1.0, adj)
        return out
    raise ValueError(f"adjust must be 'holm', 'bonferroni' or 'none', got {method!r}.")


def contrast(fit, L, rhs=0, component="cond", ddf=None, joint=None, adjust=None) -> pd.DataFrame:
    """Linear hypotheses ``L beta = rhs`` on one component's fixed effects.

    Joint test (car::linearHypothesis: Chisq, Df, Pr(>Chisq); with ``ddf`` on an
    LMM lmerTest's ``contest``: F value, NumDF, DenDF, Pr(>F)); with ``adjust``
    ("holm", "bonferroni", "none") or ``joint=False``, one test per row:
    Estimate, Std. Error, z (or t with ``ddf``) and p adjusted for multiplicity.
    """
    _check_component(fit, component)
    names = list(fit.fixef[component].index)
    L, rhs, labels = hypothesis_matrix(L, names, rhs)
    beta = fit.fixef[component].to_numpy()
    V = fit.vcov()[component].to_numpy()
    if joint is None:
        joint = adjust is None
    if ddf is not None and component != "cond":
        raise ValueError("ddf applies to the conditional model of an LMM.")
    if joint:
        if ddf is not None:
            from ._ddf import f_test

            F, ndf, dendf, Fu = f_test(fit, L, rhs, ddf=ddf)
            s2 = fit.sigma ** 2
            return pd.DataFrame({"Sum Sq": [Fu * s2 * ndf], "Mean Sq": [Fu * s2], "NumDF": [ndf], "DenDF": [dendf],
                                 "F value": [F], "Pr(>F)": [float(sst.f.sf(F, ndf, dendf))]})
        chisq, df = wald_chisq(beta, V, L, rhs)
        return pd.DataFrame({"Chisq": [chisq], "Df": [df], "Pr(>Chisq)": [float(sst.chi2.sf(chisq, df))]})
    est = L @ beta - rhs
    if ddf is not None:
        from ._ddf import Containment, ddf_engine

        eng = ddf_engine(fit, ddf)
        if isinstance(eng, Containment):
            var = np.einsum("ij,jk,ik->i", L, V, L)
            df = np.array([eng.df[np.abs(r) > 0].min() for r in L])
        else:
            est = L @ eng.beta - rhs
            var, df = map(np.array, zip(*(eng.df1(r) for r in L)))
        se = np.sqrt(var)
        stat = est / se
        p = 2 * sst.t.sf(np.abs(stat), df)
        out = {"Estimate": est, "Std. Error": se, "df": df, "t value": stat}
        pcol = "Pr(>|t|)"
    else:
        se = np.sqrt(np.einsum("ij,jk,ik->i", L, V, L))
        stat = est / se
        p = 2 * sst.norm.sf(np.abs(stat))
        out = {"Estimate": est, "Std. Error": se, "z value": stat}
        pcol = "Pr(>|z|)"
    out[pcol] = p_adjust(p, adjust or "none")
    return pd.DataFrame(out, index=labels)
