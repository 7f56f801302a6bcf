"""Priors for regularized (MAP) fits: glmmTMB's ``priors`` interface, plus blme's Wishart.

``tmbx.glmm(..., priors=P)`` adds ``-sum(log prior densities)`` to the Laplace
objective, so the fit is a posterior mode on the scale each prior names, with
no Jacobian (as glmmTMB and blme); ``logLik`` then includes the log priors.
``P`` is a DataFrame, a list of dicts or one dict with keys ``prior``,
``class`` and optionally ``coef``.

Classes (glmmTMB's, with its synonyms ``beta``, ``beta_zi``, ``betad``,
``theta``, ``theta_zi``, ``shape``):

- ``fixef``, ``fixef_zi``, ``fixef_disp``: fixed effects on the link scale
  (``fixef_disp``: on the dispersion model's scale, ``log(sigma^2)`` for the
  Gaussian in glmmTMB 1.1.5's convention). A blank ``coef`` means every
  coefficient except the intercept (glmmTMB); ``coef`` names one coefficient
  (``"Days"``, ``"spp[T.PR]"`` or R's ``"sppPR"``, ``"(Intercept)"``) or gives
  its 1-based index.
- ``ranef``, ``ranef_zi``: the covariance parameters theta of every term, or of
  the term named by ``coef`` (its grouping factor ``"Subject"``, or
  ``"Days|Subject"``, or a 1-based index into theta). Append ``_sd`` or
  ``_cor`` (``ranef_sd``) for only the standard deviations or only the
  correlation parameters.
- ``psi``: the family's extra shape parameters (glmmTMB's psi).
- ``cov`` (tmbx): a whole term's covariance matrix (Wishart), ``coef`` a group.

Prior families, parameters in order, and the scale they apply on:

- ``normal(mean, sd)``, ``t(mean, sd, df)`` (density ``dt((x - mean)/sd, df) / sd``),
  ``cauchy(location, scale)``: on the parameter itself: beta, or theta
  (log-sds and glmmTMB's transformed correlations), or psi.
- ``gamma(mean, shape)`` (glmmTMB's order: shape ``shape``, scale ``mean/shape``)
  on ``exp(parameter)``: for ``ranef`` the sds themselves. ``gamma(1e8, 2.5)``
  is blme's ``gamma(shape = 2.5, rate = 0)`` on the sd: log density ``1.5 log(sd)``.
  On ``ranef`` without a suffix it applies to the sds only (glmmTMB also applies
  it to exp() of the correlation parameters, which has no meaning).
- ``half_normal(scale)``, ``half_t(scale, df)``, ``half_cauchy(scale)`` (tmbx):
  on the sds, densities of ``|N(0, scale^2)|``, ``scale * |t_df|``, ``|Cauchy(0, scale)|``.
- ``lkj(eta)``: on each selected term's correlation matrix C, glmmTMB's
  unnormalized ``(eta - 1) log det C``.
- ``wishart(df)`` (tmbx, class ``cov``; ``wishart()``: df = k + 2.5, blme's
  default): blme's ``wishart(df, scale = Inf, posterior.scale = "cov",
  common.scale = TRUE)`` on ``S = Sigma / sigma^2`` (sigma the residual sd of a
  Gaussian model, 1 for families without a scale): log density
  ``(df - k - 1) / 2 * log det S``; it keeps S away from singular.

Priors on fixed effects are refused with REML (the fixed effects are
integrated out there; fit with ``reml=False``).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax.numpy as jnp
import jax.scipy.special as jsp
import numpy as np
import pandas as pd

# class -> (parameter vector, selection suffix); glmmTMB's synonyms included
_CLASSES = {
    "fixef": "beta", "beta": "beta",
    "fixef_zi": "betazi", "beta_zi": "betazi", "betazi": "betazi",
    "fixef_disp": "betadisp", "betad": "betadisp", "betadisp": "betadisp",
    "ranef": "theta", "theta": "theta",
    "ranef_zi": "thetazi", "theta_zi": "thetazi", "thetazi": "thetazi",
    "psi": "psi", "shape": "psi",
    "cov": "cov", "cov_zi": "cov_zi",
}
# family -> (number of parameters, parameter names, scale it applies on)
_FAMILIES = {
    "normal": (2, ("mean", "sd"), "param"),
    "t": (3, ("mean", "sd", "df"), "param"),
    "cauchy": (2, ("location", "scale"), "param"),
    "gamma": (2, ("mean", "shape"), "exp"),
    "half_normal": (1, ("scale",), "sd"),
    "half_t": (2, ("scale", "df"), "sd"),
    "half_cauchy": (1, ("scale",), "sd"),
    "lkj": (1, ("eta",), "cor"),
    "wishart": ((0, 1), ("df",), "cov"),
}
_SD_ONLY_FAMILIES = ("half_normal", "half_t", "half_cauchy")
_CORR_STRUCTS = ("us", "cs", "homcs", "toep", "homtoep", "ar1", "hetar1")


@dataclasses.dataclass
class PriorSpec:
    """One row of the priors, resolved to the elements it acts on."""

    prior: str  # as written, e.g. "normal(0, 3)"
    family: str
    args: tuple
    cls: str  # as written
    coef: str
    key: str  # parameter vector: beta, betazi, betadisp, theta, thetazi, psi (or "cov")
    index: np.ndarray  # elements of the vector (elementwise priors)
    labels: list  # their names
    terms: list = dataclasses.field(default_factory=list)  # TermInfos (lkj, wishart)

    def __str__(self):
        on = ", ".join(self.labels)
        return f"{self.prior} on {self.key}: {on}"

    def log_density(self, p, rel_scale2=None):
        """Log prior density (pure JAX in the parameter dict p)."""
        f, a = self.family, self.args
        if f == "lkj":
            out = 0.0
            for t in self.terms:
                C = _corr(t.struct.cov(p[self.key][t.theta_slice]))
                out = out + (a[0] - 1.0) * jnp.linalg.slogdet(C)[1]
            return out
        if f == "wishart":
            out = 0.0
            for t in self.terms:
                S = t.struct.cov(p[self.key][t.theta_slice]) / rel_scale2(p)
                df = a[0] if a else t.k + 2.5
                out = out + 0.5 * (df - t.k - 1.0) * jnp.linalg.slogdet(S)[1]
            return out
        x = p[self.key].reshape(-1)[self.index]
        if _FAMILIES[f][2] in ("exp", "sd"):
            x = jnp.exp(x)
        return jnp.sum(_elementwise(f, a, x))


def _corr(S):
    s = jnp.sqrt(jnp.diagonal(S))
    return S / jnp.outer(s, s)


def _elementwise(f, a, x):
    if f == "normal":
        return -0.5 * ((x - a[0]) / a[1]) ** 2 - math.log(a[1]) - 0.5 * math.log(2 * math.pi)
    if f == "t":
        return _log_t((x - a[0]) / a[1], a[2]) - math.log(a[1])
    if f == "cauchy":
        return -jnp.log1p(((x - a[0]) / a[1]) ** 2) - math.log(math.pi * a[1])
    if f == "gamma":
        shape, scale = a[1], a[0] / a[1]
        return (shape - 1) * jnp.log(x) - x / scale - math.lgamma(shape) - shape * math.log(scale)
    if f == "half_normal":
        return -0.5 * (x / a[0]) ** 2 - math.log(a[0]) + 0.5 * math.log(2 / math.pi)
    if f == "half_t":
        return _log_t(x / a[0], a[1]) - math.log(a[0]) + math.log(2.0)
    if f == "half_cauchy":
        return -jnp.log1p((x / a[0]) ** 2) - math.log(math.pi * a[0] / 2)
    raise AssertionError(f)


def _log_t(z, df):
    return (jsp.gammaln((df + 1) / 2) - jsp.gammaln(df / 2) - 0.5 * jnp.log(df * jnp.pi)
            - (df + 1) / 2 * jnp.log1p(z * z / df))


# ------------------------------------------------------------------ parsing
def _rows(priors):
    if isinstance(priors, pd.DataFrame):
        return priors.to_dict("records")
    if isinstance(priors, dict):
        return [priors]
    if isinstance(priors, (list, tuple)) and all(isinstance(r, dict) for r in priors):
        return list(priors)
    raise TypeError("priors must be a DataFrame, a list of dicts or a dict with keys 'prior', 'class' "
                    f"and optionally 'coef', e.g. {{'prior': 'normal(0, 3)', 'class': 'fixef'}}; "
                    f"got {type(priors).__name__}")


def parse_prior(text: str):
    """"normal(0, 3)" -> ("normal", (0.0, 3.0)), with the number of arguments checked."""
    m = re.fullmatch(r"\s*([A-Za-z_]+)\s*\((.*)\)\s*", str(text))
    if not m:
        raise ValueError(f"prior {text!r} is not of the form name(arg, ...), e.g. 'normal(0, 3)'")
    name = m.group(1).lower().replace("halfnormal", "half_normal")
    if name not in _FAMILIES:
        raise ValueError(f"unknown prior distribution {name!r} in {text!r}; available: {sorted(_FAMILIES)}")
    raw = [s.strip() for s in m.group(2).split(",") if s.strip()]
    try:
        args = tuple(float(s.replace("Inf", "inf")) for s in raw)
    except ValueError:
        raise ValueError(f"prior {text!r}: arguments must be numbers") from None
    n, pnames, _ = _FAMILIES[name]
    ok = len(args) in n if isinstance(n, tuple) else len(args) == n
    if not ok:
        raise ValueError(f"prior {name} takes {pnames} ({n} numbers), got {len(args)} in {text!r}")
    positive = [v for nm, v in zip(pnames, args) if nm in ("sd", "scale", "df", "shape", "eta", "mean")
                and not (nm == "mean" and name != "gamma")]
    if any(not v > 0 for v in positive):
        raise ValueError(f"prior {text!r}: {', '.join(pnames)} must be positive where they are scales, "
                         "shapes or degrees of freedom")
    return name, args


def _r_name(name: str) -> str:
    """Our coefficient name in R's spelling: Intercept -> (Intercept), spp[T.PR] -> sppPR."""
    if name == "Intercept":
        return "(Intercept)"
    return name.replace("[T.", "").replace("]", "")


def _coef_str(row) -> str:
    c = row.get("coef", "")
    if c is None or (isinstance(c, float) and math.isnan(c)):
        return ""
    if isinstance(c, (int, np.integer)):
        return str(int(c))
    return str(c).strip()


def _term_label(t) -> str:
    cols = "+".join("1" if n == "Intercept" else n for n in t.terms)
    return f"{cols}|{t.group}"


def _term_labels(t):
    """R's spellings of a term: "1+Days|Subject" and, the intercept implicit, "Days|Subject"."""
    full = _term_label(t)
    return (full, full[2:]) if full.startswith("1+") else (full,)


def _select_terms(terms, coef, what):
    if not coef:
        return terms
    key = coef.replace(" ", "").strip("()")
    hits = [t for t in terms if key in (t.group, *_term_labels(t))]
    if not hits:
        raise ValueError(f"{what}: no random-effect term {coef!r}; the terms are "
                         f"{[_term_label(t) for t in terms]} (give a grouping factor or a term)")
    return hits


def _sd_positions(t):
    from ._fit import _log_sd_positions

    return [pos for _, pos in _log_sd_positions(t)]


def _resolve(row, params, names, terms, random):
    text, cls = row.get("prior"), str(row.get("class", "")).strip()
    if text is None or not cls:
        raise ValueError(f"each prior needs 'prior' and 'class'; got {row}")
    fam, args = parse_prior(text)
    coef = _coef_str(row)
    m = re.fullmatch(r"(.*?)(?:_(sd|cor))?", cls)
    base, suffix = m.group(1), m.group(2)
    if base not in _CLASSES:
        raise ValueError(f"unknown prior class {cls!r}; use one of fixef, fixef_zi, fixef_disp, ranef, "
                         "ranef_zi, psi, cov (with _sd or _cor on ranef classes)")
    key = _CLASSES[base]
    what = f"prior {text!r} on class {cls!r}"
    comp = "zi" if key in ("thetazi", "cov_zi") else "cond"
    if key in ("cov", "cov_zi"):
        if fam != "wishart":
            raise ValueError(f"{what}: class 'cov' takes a wishart(df) prior")
        sel = _select_terms([t for t in terms if t.component == comp], coef, what)
        if not sel:
            raise ValueError(f"{what}: this model has no {comp} random-effect terms")
        for t in sel:
            if t.struct.name == "rr":
                raise ValueError(f"{what}: a reduced-rank (rr) covariance is singular by construction; "
                                 "a Wishart prior on it is not defined")
            if args and args[0] <= t.k - 1:
                raise ValueError(f"{what}: df must exceed k - 1 = {t.k - 1} for the {t.k}x{t.k} covariance of "
                                 f"{_term_label(t)}")
        tkey = "theta" if comp == "cond" else "thetazi"
        return PriorSpec(text, fam, args, cls, coef, tkey, np.zeros(0, int), [_term_label(t) for t in sel], sel)
    if fam == "wishart":
        raise ValueError(f"{what}: wishart is a prior on a whole covariance matrix: use class 'cov'")
    if key not in params:
        raise ValueError(f"{what}: this model has no {key} parameters (it has {list(params)})")
    if key.startswith("beta"):
        if suffix:
            raise ValueError(f"{what}: _sd/_cor apply to random-effect classes only")
        if key in random:
            raise ValueError(f"{what}: with REML the fixed effects are integrated out, and a prior on them "
                             "would change what REML means; fit with reml=False to use priors on fixed effects")
        if fam in _SD_ONLY_FAMILIES + ("lkj",):
            raise ValueError(f"{what}: {fam} is a prior for standard deviations or correlations, not for "
                             "fixed effects (use normal, t or cauchy)")
        labels = names[key]
        if not coef:
            idx = [i for i, n in enumerate(labels) if n != "Intercept"]
        elif coef.isdigit():
            idx = [_check_index(int(coef), len(labels), what)]
        else:
            match = [i for i, n in enumerate(labels) if coef in (n, _r_name(n))]
            if not match:
                raise ValueError(f"{what}: no coefficient {coef!r}; the coefficients are {labels}")
            idx = match
        if not idx:
            raise ValueError(f"{what}: the only coefficient is the intercept, which a blank coef leaves out "
                             "(glmmTMB); name it: coef='(Intercept)'")
        return PriorSpec(text, fam, args, cls, coef, key, np.asarray(idx), [labels[i] for i in idx])
    if key == "psi":
        labels = names["psi"]
        idx = list(range(len(labels))) if not coef else [_check_index(int(coef), len(labels), what)] \
            if coef.isdigit() else None
        if idx is None:
            raise ValueError(f"{what}: coef for psi is a 1-based index")
        if fam in _SD_ONLY_FAMILIES + ("lkj",):
            raise ValueError(f"{what}: {fam} is not a prior for psi (use normal, t, cauchy or gamma)")
        return PriorSpec(text, fam, args, cls, coef, key, np.asarray(idx), [labels[i] for i in idx])
    # theta / thetazi
    tterms = [t for t in terms if t.component == comp]
    if coef.isdigit():
        i = _check_index(int(coef), len(names[key]), what)
        owner = [t for t in tterms if t.theta_slice.start <= i < t.theta_slice.stop]
        is_sd = any(i - t.theta_slice.start in _sd_positions(t) for t in owner)
        if fam in _SD_ONLY_FAMILIES and not is_sd:
            raise ValueError(f"{what}: theta[{coef}] ({names[key][i]}) is not a log-sd")
        return PriorSpec(text, fam, args, cls, coef, key, np.asarray([i]), [names[key][i]], owner)
    sel = _select_terms(tterms, coef, what)
    if fam == "lkj" or suffix == "cor":
        sel = [t for t in sel if t.struct.name in _CORR_STRUCTS and t.k > 1]
        if not sel:
            raise ValueError(f"{what}: no selected random-effect term has correlation parameters")
    if fam == "lkj":
        return PriorSpec(text, fam, args, cls, coef, key, np.zeros(0, int), [_term_label(t) for t in sel], sel)
    idx = []
    for t in sel:
        sd_pos = _sd_positions(t)
        if suffix == "sd" or fam in _SD_ONLY_FAMILIES or fam == "gamma":
            pos = sd_pos
        elif suffix == "cor":
            pos = [j for j in range(t.struct.n_params) if j not in sd_pos]
        else:
            pos = list(range(t.struct.n_params))
        idx += [t.theta_slice.start + j for j in pos]
    if not idx:
        raise ValueError(f"{what}: selects no parameters (the structures of {[_term_label(t) for t in sel]} "
                         "have no such parameters)")
    return PriorSpec(text, fam, args, cls, coef, key, np.asarray(idx), [names[key][i] for i in idx], sel)


def _check_index(i, n, what):
    if not 1 <= i <= n:
        raise ValueError(f"{what}: index {i} is out of range (1 to {n}, glmmTMB's 1-based indices)")
    return i - 1


def _relative_scale2(family, names):
    """sigma^2 of blme's common scale: the Gaussian residual variance (dispformula ~1), else 1."""
    if family.name != "gaussian":
        return lambda p: 1.0
    if names.get("betadisp") != ["Intercept"]:
        raise ValueError("a Wishart prior on the covariance relative to sigma^2 needs a single residual sd: "
                         "use dispformula='~1'")
    return lambda p: family.sigma(p["betadisp"][0]) ** 2


class Priors(list):
    """The resolved priors of a fit (a list of `PriorSpec`); ``str`` lists them."""

    def __str__(self):
        return "; ".join(str(s) for s in self)


def build_prior_nll(priors, *, params, names, terms, family, random):
    """Resolve glmmTMB-style priors against a template's parameters.

    Returns ``(Priors, prior_nll)``: ``prior_nll(p)`` is ``-sum`` of the log prior
    densities, a pure JAX function of the parameter dict ``p``.
    """
    specs = Priors(_resolve(r, params, names, terms, random) for r in _rows(priors))
    if not specs:
        return specs, None
    rel2 = _relative_scale2(family, names) if any(s.family == "wishart" for s in specs) else None

    def prior_nll(p):
        return -sum(s.log_density(p, rel2) for s in specs)

    return specs, prior_nll
