"""Blocks for adaptive Gauss-Hermite quadrature from a formula's random terms.

AGQ integrates each level of one grouping factor separately (lme4's ``nAGQ``
for one scalar effect, GLMMadaptive and the ``glmm`` package for vector
effects): all random terms, in the conditional and the zero-inflation model,
must share that factor. The block of level ``j`` holds every term's effects at
``j``, so e.g. ``(1|g) + (0 + x|g)`` gives blocks of two.
"""

from __future__ import annotations

import numpy as np

from .._agq import check_nagq

_INSTEAD = ("use the Laplace approximation (nagq=1), which handles any number of factors, or sample "
            "the posterior (fit.sample())")


def agq_groups(space, params, terms, design, nagq) -> dict:
    """``{"b": labels, "bzi": labels}``: the grouping factor's level of each random effect."""
    nagq = check_nagq(nagq)
    if not terms:
        raise ValueError(f"nagq={nagq} integrates over random effects, but the formula has none; "
                         "add a term such as (1|group) or leave nagq at 1")
    factors = list(dict.fromkeys(t.group for t in terms))
    if len(factors) > 1:
        raise ValueError(
            f"adaptive Gauss-Hermite quadrature (nagq={nagq}) needs the random effects of one "
            f"grouping factor, but this model has terms on {factors} (crossed or nested factors); "
            + _INSTEAD)
    integrated = [n for n in space.random if n not in ("b", "bzi")]
    if integrated:
        raise ValueError(f"nagq={nagq} with REML: AGQ integrates only the random effects; fit by ML "
                         "(reml=False) or use the Laplace approximation (nagq=1) for REML")
    code = {}  # level -> block, in order of first appearance
    groups = {}
    for key, comp in (("b", "cond"), ("bzi", "zi")):
        if key not in params:
            continue
        lab = np.full(np.shape(params[key]), -1, np.int64)
        for t in terms:
            if t.component != comp:
                continue
            levels = np.array([code.setdefault(lev, len(code)) for lev in t.levels], np.int64)
            lab[t.b_slice] = np.repeat(levels, t.k)  # b_t is (m, k) row-major: level-major
        groups[key] = lab
    return groups
