"""Singular fits: lme4's ``isSingular`` and ``rePCA`` on every random-effect term.

lme4 works with the *relative* covariance factor Lambda of each term
(``cov = sigma^2 Lambda Lambda'``, sigma the residual sd of a Gaussian model,
1 for families without a scale). A fit is singular when some term's Lambda
has a singular value below ``tol``: a direction of the random effects with
(numerically) no variance. That covers a zero sd, a correlation at +/-1 and
any other rank deficiency, and it does not depend on the Hessian, so a fit
that glmmTMB reports with an sd of 1e-4 and a "positive definite" Hessian
(Dyestuff2) is still called singular.

Structures whose covariance is rank-deficient or nearly so by design are
judged on what can collapse: ``rr`` on its ``d`` leading singular values, and
the spatial kernels (``exp``, ``gau``, ``mat``), whose correlation matrices
over many close locations are numerically singular without anything being
wrong, on their sd only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from .._internal import eval_method

# structures judged on their sd only: a kernel over close locations (or close
# times: ``ou`` is ``exp`` in one dimension) is numerically rank-deficient by
# design
_SD_ONLY = ("exp", "gau", "mat", "ou", "propto", "equalto")
#: directions (and a combination's entries) listed in the singular-fit warning
MAX_SHOWN = 6


@dataclasses.dataclass
class SingularDirection:
    """A random-effect direction with (nearly) no variance."""

    term: str  # "Batch" or "zi:site"
    group: str
    structure: str
    value: float  # singular value of the relative factor
    direction: pd.Series  # unit vector over the term's columns

    def describe(self) -> str:
        d = self.direction
        big = d[np.abs(d) > 0.1].sort_values(key=np.abs, ascending=False)
        if len(big) == 1:
            what = f"the variance of {big.index[0]!r} is (nearly) zero"
        else:
            combo = " ".join(f"{v:+.2f}*{n}" for n, v in big.iloc[:MAX_SHOWN].items())
            if len(big) > MAX_SHOWN:
                combo += f" (and {len(big) - MAX_SHOWN} more)"
            what = f"the combination {combo} has (nearly) zero variance"
            if len(big) == 2 and len(d) == 2:
                what += " (a correlation at +/-1)"
        return f"{self.term}: {what} (relative singular value {self.value:.2g})"


def relative_scale(fit) -> float:
    """lme4's sigma for relative covariance factors: the residual sd of a Gaussian
    model with a constant dispersion, else 1."""
    if fit.family.name == "gaussian" and fit.sigma is not None:
        return float(fit.sigma)
    return 1.0


def relative_covariances(fit) -> dict:
    """term key -> (TermInfo, relative covariance cov / sigma^2 as a numpy array)."""
    p = fit._par()
    s2 = relative_scale(fit) ** 2
    out = {}
    for t in fit.template.terms:
        theta = p["theta" if t.component == "cond" else "thetazi"][t.theta_slice]
        cov = np.asarray(eval_method(t.struct, "cov", theta), float) / s2
        key = t.group if t.component == "cond" else f"zi:{t.group}"
        if key in out:  # several terms on one grouping factor: (1|g) + (0+x|g)
            key = f"{key}.{len([k for k in out if k.split('.')[0] == key])}"
        out[key] = (t, 0.5 * (cov + cov.T))
    return out


def _singular_values(cov):
    """Singular values of a factor of cov (sqrt of its eigenvalues), largest first,
    with the eigenvectors as columns."""
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1]
    return np.sqrt(np.clip(w[order], 0.0, None)), v[:, order]


def singular_directions(fit, tol: float = 1e-4) -> list[SingularDirection]:
    """Every direction of every term whose relative singular value is below ``tol``."""
    out = []
    for key, (t, cov) in relative_covariances(fit).items():
        name = t.struct.name
        if name in _SD_ONLY:
            sd = np.sqrt(np.clip(np.diag(cov), 0, None))
            for j in np.nonzero(sd < tol)[0]:
                e = np.zeros(t.k)
                e[j] = 1.0
                out.append(SingularDirection(key, t.group, name, float(sd[j]), pd.Series(e, index=t.terms)))
            continue
        sv, vec = _singular_values(cov)
        n_check = getattr(t.struct, "d", t.k) if name == "rr" else t.k
        for j in range(n_check):
            if sv[j] < tol:
                out.append(SingularDirection(key, t.group, name, float(sv[j]), pd.Series(vec[:, j], index=t.terms)))
    return out


def is_singular(fit, tol: float = 1e-4) -> bool:
    """lme4's ``isSingular``: some term's relative covariance factor has a singular
    value below ``tol`` (a zero-variance direction, not only a zero sd)."""
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    return bool(singular_directions(fit, tol))


def rePCA(fit) -> dict:
    """lme4's ``rePCA``: for each term, the singular values of its relative
    covariance factor (``sdev``) and the proportion of variance along each.

    Returns dict term -> DataFrame with columns sdev, proportion, cumulative
    (rows PC1, PC2, ...), and ``.attrs["rotation"]``: the directions, one
    column per component, over the term's columns.
    """
    out = {}
    for key, (t, cov) in relative_covariances(fit).items():
        sv, vec = _singular_values(cov)
        total = float(np.sum(sv**2))
        prop = sv**2 / total if total > 0 else np.full_like(sv, np.nan)
        pcs = [f"PC{i + 1}" for i in range(len(sv))]
        df = pd.DataFrame({"sdev": sv, "proportion": prop, "cumulative": np.cumsum(prop)}, index=pcs)
        df.attrs["rotation"] = pd.DataFrame(vec, index=t.terms, columns=pcs)
        out[key] = df
    return out


def singular_message(fit, tol: float = 1e-4) -> str | None:
    """The warning for a singular fit: which term, which direction, what to try."""
    dirs = singular_directions(fit, tol)
    if not dirs:
        return None
    lines = ["boundary (singular) fit: some random-effect variance is estimated at zero"]
    terms = list(dict.fromkeys(d.term for d in dirs))
    for term in terms:
        mine = [d for d in dirs if d.term == term]
        if mine[0].structure in _SD_ONLY and len(mine) == len(mine[0].direction) > 1:
            # one sd for all of the term's columns (a kernel over positions): one line
            lines.append(f"  - {term}: the variance of its {mine[0].structure} term is (nearly) zero "
                         f"(relative sd {mine[0].value:.2g})")
            continue
        lines += [f"  - {d.describe()}" for d in mine[:MAX_SHOWN]]
        if len(mine) > MAX_SHOWN:
            lines.append(f"  - {term}: and {len(mine) - MAX_SHOWN} more directions (fit.rePCA() lists them)")
    terms = sorted(terms)
    # (a structure of a few parameters over many columns, such as a kernel over
    # positions or times, has nothing to simplify, and its group may well be one
    # series or one map)
    flagged = [t for t in fit.template.terms if t.group in {d.group for d in dirs}]
    plain = [t for t in flagged if t.struct.name not in _SD_ONLY + ("ar1",)]
    small = [t for t in plain if t.m < 6]
    multi = any(t.k > 1 for t in plain)
    tips = ["drop the term or simplify it: uncorrelated effects (diag(...|g)), compound symmetry "
            "(cs(...|g)) or a reduced rank (rr(...|g, d))" if multi else
            "drop the term (the data show no variation between its levels beyond the residual)"]
    if small:
        tips.append(f"{', '.join(sorted({t.group for t in small}))} has fewer than 6 levels: "
                    "model it as a fixed effect instead")
    tips.append('or regularize with a prior: priors=[{"prior": "wishart()", "class": "cov"}] (blme\'s default) '
                'or {"prior": "gamma(1e8, 2.5)", "class": "ranef_sd"} (blme\'s gamma on the sds)')
    lines.append(f"  What to try for {', '.join(terms)}: " + "; ".join(tips) + ".")
    return "\n".join(lines)
