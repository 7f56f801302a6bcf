"""What may be wrong with a fit, and what to try (glmmTMB's ``diagnose``, lme4's checks).

``fit.diagnose()`` runs every check and returns a `DiagnoseReport`:
``rep.problems`` (a list of `Problem`), ``bool(rep)`` (False when nothing is
wrong) and ``str(rep)`` (each problem explained, with what to try).

Checks:

- gradient: lme4's relative check ``max |H^-1 g| < 0.002`` at the optimum (the
  Newton step still to go, in the parameters' own units), or ``max |g|`` when
  the Hessian is not positive definite;
- Hessian: not positive definite (or nearly singular): its eigenvectors for the
  smallest eigenvalues, named by the fit's parameter labels, say which
  parameters are not identified;
- singular fit: a zero-variance direction of some random-effect term (lme4's
  isSingular on the relative covariance factor, `_singular`), and correlations
  at +/-1;
- large coefficients: ``|beta| > 10`` on a log/logit/probit scale (glmmTMB's
  threshold); for binomial models the sign of complete separation;
- predictor scales: numeric model-matrix columns whose sds differ by more than
  ``scale_ratio`` (lme4's check), or one far from 1 (sd above ``10 * scale_ratio``
  or below ``0.1 / scale_ratio``): suggest centering and scaling.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ._singular import singular_directions

_COMPONENTS = {"beta": "cond", "betazi": "zi", "betadisp": "disp"}


@dataclasses.dataclass
class Problem:
    """One finding: a short ``kind``, the explanation, and the parameters involved."""

    kind: str  # "gradient", "hessian", "singular", "correlation", "large_coef", "scale", "convergence"
    message: str
    params: list = dataclasses.field(default_factory=list)

    def __str__(self):
        return f"[{self.kind}] {self.message}"


class DiagnoseReport:
    """Result of `diagnose`: ``problems``, falsy when there are none."""

    def __init__(self, problems: list[Problem], info: dict):
        self.problems = problems
        self.info = info  # the numbers behind the checks: max_relgrad, min_eigenvalue, ...

    def __bool__(self):
        return bool(self.problems)

    def __len__(self):
        return len(self.problems)

    def kinds(self) -> list[str]:
        return [p.kind for p in self.problems]

    def __str__(self):
        if not self.problems:
            return "diagnose: no problems found (gradient, Hessian, variances, correlations, coefficients, scales)"
        lines = [f"diagnose: {len(self.problems)} problem(s)"]
        lines += [f"{i + 1}. {p}" for i, p in enumerate(self.problems)]
        return "\n".join(lines)

    __repr__ = __str__


def parameter_labels(fit) -> list[str]:
    """Readable labels of the free fixed parameters x, e.g. ``theta:log_sd(Days)|Subject``."""
    sp = fit.model.space
    names = fit.template.names
    out = []
    for key, i in sp.first["x"]:
        lab = names.get(key)
        out.append(f"{key}:{lab[i]}" if lab is not None and i < len(lab) else f"{key}[{i}]")
    return out


def _hessian_problem(fit, H, labels, eig_tol):
    w, v = np.linalg.eigh(0.5 * (H + H.T))
    scale = max(1.0, float(np.max(np.abs(w))))
    bad = np.nonzero(w <= eig_tol * scale)[0]
    if not len(bad):
        return None, float(w[0])
    parts = []
    involved = []
    for j in bad[:3]:
        vec = v[:, j]
        big = np.argsort(-np.abs(vec))
        big = [k for k in big if abs(vec[k]) > 0.2][:4]
        involved += [labels[k] for k in big]
        combo = " ".join(f"{vec[k]:+.2f}*{labels[k]}" for k in big)
        parts.append(f"eigenvalue {w[j]:.2g} along {combo}")
    msg = ("the Hessian of the marginal nll is not positive definite (or is nearly singular): "
           + "; ".join(parts) + ". These parameters are not identified or sit on a boundary: a variance "
           "at zero, a correlation at +/-1, a zero-inflation or dispersion parameter running off to "
           "infinity, or collinear predictors. Simplify that part of the model (or fix it with map=), "
           "or regularize it with a prior.")
    return Problem("hessian", msg, list(dict.fromkeys(involved))), float(w[0])


def _gradient_problem(fit, g, H, labels, pd, grad_tol):
    if pd:
        rel = np.linalg.solve(H, g)
        worst = int(np.argmax(np.abs(rel)))
        val = float(abs(rel[worst]))
        if val <= grad_tol:
            return None, val
        msg = (f"the optimizer stopped short of the optimum: lme4's relative gradient |H^-1 g| is {val:.2g} "
               f"(> {grad_tol}) for {labels[worst]}. Try fit.allfit() to compare optimizers, better start "
               "values, or centering and scaling predictors.")
        return Problem("gradient", msg, [labels[worst]]), val
    worst = int(np.argmax(np.abs(g)))
    val = float(abs(g[worst]))
    if val <= 1e-3:
        return None, val
    msg = (f"the gradient is not zero at the estimates (|g| = {val:.2g} for {labels[worst]}) and the Hessian "
           "is not positive definite: the fit has not reached a proper optimum.")
    return Problem("gradient", msg, [labels[worst]]), val


def _singular_problems(fit, sd_tol, cor_tol):
    out = []
    dirs = singular_directions(fit, sd_tol)
    if dirs:
        from ._singular import singular_message

        out.append(Problem("singular", singular_message(fit, sd_tol), sorted({d.term for d in dirs})))
    for grp, vc in _iter_varcorr(fit.varcorr):
        C = vc.corr.to_numpy()
        k = C.shape[0]
        for i in range(k):
            for j in range(i):
                if abs(C[i, j]) > 1 - cor_tol:
                    a, b = vc.corr.index[i], vc.corr.index[j]
                    out.append(Problem(
                        "correlation",
                        f"{grp}: the correlation of {a} and {b} is {C[i, j]:+.4f}, at the boundary: the data "
                        "cannot separate the two effects. Try uncorrelated effects (diag(...)), a reduced rank "
                        "(rr(...)), dropping one of them, or an lkj/wishart prior.",
                        [f"cor_{a}.{b}|{grp}"]))
    return out


def _iter_varcorr(vc):
    for g, term in vc.items():
        if g == "zi":
            for g2, t2 in term.items():
                yield f"zi:{g2}", t2
        else:
            yield g, term


def _coefficient_problems(fit, big_coef):
    out = []
    fam = fit.family
    link = getattr(getattr(fam, "link", None), "name", "identity")
    fixef = fit.fixef
    for comp, est in fixef.items():
        if comp == "cond" and link == "identity":
            continue  # large coefficients are a matter of units on the identity scale
        big = est[np.abs(est) > big_coef]
        if big.empty:
            continue
        names = ", ".join(f"{n} = {v:.3g}" for n, v in big.items())
        msg = f"unusually large {comp} coefficients (|estimate| > {big_coef} on the {link if comp == 'cond' else 'logit' if comp == 'zi' else 'log'} scale): {names}."
        base = getattr(fam, "base", fam).name
        if comp == "cond" and base in ("binomial", "betabinomial"):
            msg += (" In a binomial model this is the sign of complete (or quasi-complete) separation: some "
                    "predictor (or level) predicts the outcome perfectly, and the estimate runs off to "
                    "infinity. Remove or merge that level, or regularize with a prior: "
                    "priors=[{'prior': 'normal(0, 3)', 'class': 'fixef'}] (or t/cauchy).")
        elif comp == "zi":
            msg += (" A zero-inflation probability near 0 or 1: the data may not need zero-inflation "
                    "(drop ziformula) or need a simpler one.")
        elif comp == "disp":
            msg += " The dispersion runs off: the family may be wrong (e.g. nbinom2 on data without overdispersion)."
        else:
            msg += " Check for separation (a level with all-zero or all-positive responses) or rescale predictors."
        out.append(Problem("large_coef", msg, [f"{comp}:{n}" for n in big.index]))
    return out


def _scale_problem(fit, scale_ratio):
    sds = {}
    for comp, c in fit.design.components.items():
        X = np.asarray(c.X, float)
        for j, name in enumerate(c.names):
            col = X[:, j]
            if len(np.unique(col)) <= 2:
                continue  # intercepts and dummies
            sds[f"{comp}:{name}"] = float(np.std(col))
    sds = {k: v for k, v in sds.items() if v > 0}
    if len(sds) < 1:
        return None
    lo, hi = min(sds, key=sds.get), max(sds, key=sds.get)
    ratio = sds[hi] / sds[lo]
    # lme4's rule compares the columns with each other; a lone column far from the
    # intercept's unit scale (10x further) hurts the optimizer as well
    extreme = [k for k, v in sds.items() if v > 10 * scale_ratio or v < 0.1 / scale_ratio]
    if ratio <= scale_ratio and not extreme:
        return None
    msg = (f"predictors on very different scales (sd of {hi} = {sds[hi]:.3g}, of {lo} = {sds[lo]:.3g}"
           + (f"; far from 1: {', '.join(extreme)}" if extreme else "")
           + "): the optimizer and the Hessian work better with centered and scaled predictors, e.g. "
           "df['x_s'] = (df.x - df.x.mean()) / df.x.std().")
    return Problem("scale", msg, sorted(set([hi, lo] + extreme)))


def diagnose(fit, *, grad_tol: float = 2e-3, eig_tol: float = 1e-8, sd_tol: float = 1e-4,
             cor_tol: float = 1e-3, big_coef: float = 10.0, scale_ratio: float = 1e3,
             check_gradient: bool = True) -> DiagnoseReport:
    """Check a fit for the usual troubles (glmmTMB's ``diagnose``); see the module doc.

    ``check_gradient=False`` skips the exact gradient (its first use compiles it),
    using the optimizer's last gradient instead.
    """
    labels = parameter_labels(fit)
    problems, info = [], {}
    res = fit._fit
    if len(labels):
        H = np.asarray(res.hessian, float)
        if not np.all(np.isfinite(H)):
            problems.append(Problem("hessian", "the Hessian has non-finite entries: the objective is not "
                                    "smooth at the estimates (check for parameters at extreme values)", labels))
            hp, pd = None, False
        else:
            hp, info["min_eigenvalue"] = _hessian_problem(fit, H, labels, eig_tol)
            pd = hp is None
        g = np.asarray(fit.model.gr(res.x) if check_gradient else res.gradient, float)
        gp, info["max_relgrad" if pd else "max_grad"] = _gradient_problem(fit, g, H, labels, pd, grad_tol)
        problems += [p for p in (gp, hp) if p is not None]
    if res.status != 0 or not np.isfinite(res.objective):
        problems.insert(0, Problem("convergence", f"the optimizer reported: {res.message}"))
    problems += _singular_problems(fit, sd_tol, cor_tol)
    problems += _coefficient_problems(fit, big_coef)
    sp = _scale_problem(fit, scale_ratio)
    if sp is not None:
        problems.append(sp)
    return DiagnoseReport(problems, info)


def likely_cause(fit) -> str:
    """The most likely reason a fit did not converge, from cheap checks only
    (no new compilation): singular directions, large coefficients, the
    Hessian's null directions, predictor scales."""
    rep = diagnose(fit, check_gradient=False)
    # runaway coefficients first: separation also drives variances to zero
    order = ("large_coef", "singular", "correlation", "hessian", "scale", "gradient")
    for kind in order:
        for p in rep.problems:
            if p.kind == kind:
                return p.message + " (fit.diagnose() lists every check)"
    return "no single cause found; run fit.diagnose() and fit.allfit() to compare optimizers"


def warn_fit(fit, caught=()) -> None:
    """The warnings of `tmbx.glmm` after a fit: a singular fit named term by term
    with what to try, a fit that did not converge with its most likely cause;
    ``caught``: warnings recorded during the fit, re-emitted (the engine's own
    non-convergence warning is replaced by the one with the cause)."""
    import warnings

    from ._singular import singular_message

    for w in caught:
        if issubclass(w.category, RuntimeWarning) and "did not converge" in str(w.message):
            continue
        warnings.warn(w.message, w.category, stacklevel=4)
    if not fit.converged:
        warnings.warn(f"Model did not converge: {fit.message}.\nMost likely cause: {likely_cause(fit)}",
                      RuntimeWarning, stacklevel=4)
        return
    msg = singular_message(fit)
    if msg:
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        return
    msg = _hessian_warning(fit)
    if msg:
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _hessian_warning(fit) -> str | None:
    """glmmTMB's "Model convergence problem" at fit time: an optimum the optimizer
    accepts (its gradient is zero) whose Hessian is not positive definite or is
    nearly singular (a zero-inflation logit running off to -inf, a nugget the
    data cannot separate), with the parameters involved and, where they are
    large coefficients, what they mean. From the optimizer's own Hessian: no
    new evaluation."""
    labels = parameter_labels(fit)
    if not len(labels):
        return None
    H = np.asarray(fit._fit.hessian, float)
    if H.shape != (len(labels), len(labels)) or not np.any(H):
        return None  # (no Hessian: the optimizer did not polish)
    if not np.all(np.isfinite(H)):
        return ("Model convergence problem: the Hessian has non-finite entries at the estimates (parameters at "
                "extreme values); see fit.diagnose().")
    hp, _ = _hessian_problem(fit, H, labels, 1e-8)
    if hp is None:
        return None
    involved = {p.split(":", 1)[0] for p in hp.params}
    comps = {"beta": "cond", "betazi": "zi", "betadisp": "disp"}
    extra = [p.message[0].upper() + p.message[1:] for p in _coefficient_problems(fit, 10.0)
             if any(comps.get(k) == p.params[0].split(":", 1)[0] for k in involved)]
    return ("Model convergence problem: " + hp.message + "".join(" " + m for m in extra)
            + " (fit.diagnose() lists every check)")
