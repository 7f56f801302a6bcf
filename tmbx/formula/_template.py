"""From a formula `Design` to an engine template (a `LatentGaussian` model).

The template follows glmmTMB's parameter layout::

    beta (cond fixed), betazi, betadisp, theta (cond covariance), thetazi, psi,
    b (cond random effects), bzi (zi random effects)

with one difference in how random effects are represented: each term's
effects are *spherical*, ``b_t = T_t(theta) u_t`` with ``u_t ~ N(0, I)`` and
``T_t`` the covariance structure's factor (lme4's choice). The Laplace
approximation is invariant to this linear change of variables, so
log-likelihoods and estimates equal glmmTMB's; but the latent density no
longer depends on theta, so variances at zero (singular fits) and reduced-rank
structures stay well defined, and the latent Hessian is ``J' W J + I``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .. import covstructs, families
from .._internal import eval_method
from .._model import LatentGaussian, Model
from .._params import ParamSpace


@dataclasses.dataclass
class TermInfo:
    """A random-effect term in the template: its slice of ``b``/``theta``."""

    component: str  # "cond" or "zi"
    group: str
    terms: list
    struct: object
    m: int  # number of levels
    k: int
    b_slice: slice
    theta_slice: slice
    levels: list


@dataclasses.dataclass
class Template:
    model: Model
    family: object
    design: object
    terms: list
    params: dict
    names: dict  # parameter name -> list of labels
    reml: bool
    prior_nll: object = None  # (p) -> scalar penalty of the fit's priors, or None
    priors: object = None  # the parsed priors (tmbx.formula._priors), for summaries and sampling


def resolve_family(family, has_zi: bool):
    fam = families.get(family)
    if has_zi and not isinstance(fam, (families.ZeroInflated, families.Hurdle)):
        fam = families.Hurdle(fam.base) if isinstance(fam, families.Truncated) else families.ZeroInflated(fam)
    return fam


def _struct(term):
    args = dict(term.args)
    k = len(term.terms)
    return covstructs.get(term.structure, dim=k, **args)


def _terms(design, component, b_start, th_start):
    out = []
    comp = design.components.get(component)
    if comp is None:
        return out, b_start, th_start
    for term in comp.re:
        st = _struct(term)
        m, k = len(term.levels), len(term.terms)
        out.append(TermInfo(component, term.group, list(term.terms), st, m, k,
                            slice(b_start, b_start + m * k), slice(th_start, th_start + st.n_params),
                            list(term.levels)))
        b_start += m * k
        th_start += st.n_params
    return out, b_start, th_start


def _re_sum(p_b, p_theta, terms, d, key):
    """sum over terms of Z_t * (T_t u_t)[index_t], for one component."""
    total = 0.0
    for j, t in enumerate(terms):
        u = p_b[t.b_slice].reshape(t.m, t.k)
        T = t.struct.factor(p_theta[t.theta_slice])
        bvals = u @ T.T
        idx = d[key]["index"][j]
        Z = d[key]["Z"][j]
        total = total + jnp.sum(Z * bvals[idx], axis=1)
    return total


def _start_beta(fam, comp, y, trials):
    """glmmTMB starts all betas at 0; we start the intercept at link(mean y), which
    reaches the same optimum in fewer iterations."""
    beta = np.zeros(len(comp.names))
    if "Intercept" in comp.names:
        ybar = np.mean(y / trials) if trials is not None else np.mean(y)
        try:
            val = float(eval_method(fam.link, "__call__", np.clip(ybar, 1e-3, None) if ybar <= 0 else float(ybar)))
            if ybar >= 1 and fam.link.name == "logit":
                val = 0.0
            if np.isfinite(val):
                beta[comp.names.index("Intercept")] = val
        except Exception:  # noqa: BLE001 - any link domain problem: keep 0
            pass
    return beta


def build_template(design, family, *, reml=False, start=None, map=None, layout=None, solver="auto",
                   outer=None, priors=None, nagq=1) -> Template:
    has_zi = "zi" in design.components
    fam = resolve_family(family, has_zi)
    fam.check_support(design.y, design.trials)
    cond = design.components["cond"]
    zi = design.components.get("zi")
    disp = design.components["disp"]
    terms_c, nb, nth = _terms(design, "cond", 0, 0)
    terms_z, nbz, nthz = _terms(design, "zi", 0, 0)
    params = {"beta": _start_beta(fam, cond, design.y, design.trials)}
    names = {"beta": list(cond.names)}
    if has_zi:
        params["betazi"] = np.zeros(zi.X.shape[1])
        names["betazi"] = list(zi.names)
    if fam.has_disp:
        params["betadisp"] = np.zeros(disp.X.shape[1])
        names["betadisp"] = list(disp.names)
    if nth:
        params["theta"] = np.concatenate([np.asarray(t.struct.start(), float) for t in terms_c])
        names["theta"] = [f"{n}|{t.group}" for t in terms_c for n in t.struct.param_names(t.terms)]
    if nthz:
        params["thetazi"] = np.concatenate([np.asarray(t.struct.start(), float) for t in terms_z])
        names["thetazi"] = [f"{n}|{t.group}" for t in terms_z for n in t.struct.param_names(t.terms)]
    if fam.n_psi:
        params["psi"] = np.asarray(fam.psi_start, float)
        names["psi"] = [f"psi[{i}]" for i in range(fam.n_psi)]
    random = []
    if nb:
        params["b"] = np.zeros(nb)
        random.append("b")
    if nbz:
        params["bzi"] = np.zeros(nbz)
        random.append("bzi")
    if reml:
        random += ["beta"] + (["betazi"] if has_zi else [])
    if start:
        for k, v in start.items():
            if k not in params:
                raise ValueError(f"start: {k!r} is not a parameter of this model ({list(params)})")
            v = np.asarray(v, float)
            if v.size != np.size(params[k]):
                which = f" ({', '.join(names[k])})" if k in names and len(names[k]) == np.size(params[k]) else ""
                raise ValueError(f"start[{k!r}] has {v.size} value(s); this model's {k} has "
                                 f"{np.size(params[k])}{which}")
            params[k] = v.reshape(np.shape(params[k]))

    data = {
        "y": design.y.astype(float),
        "trials": None if design.trials is None else design.trials.astype(float),
        "weights": design.weights.astype(float),
        "cond": {"X": cond.X, "offset": cond.offset,
                 "index": [np.asarray(t.index, np.int32) for t in cond.re],
                 "Z": [np.asarray(t.Z, float) for t in cond.re]},
        "disp": {"X": disp.X, "offset": disp.offset},
    }
    if has_zi:
        data["zi"] = {"X": zi.X, "offset": zi.offset,
                      "index": [np.asarray(t.index, np.int32) for t in zi.re],
                      "Z": [np.asarray(t.Z, float) for t in zi.re]}
    data = {k: v for k, v in data.items() if v is not None}
    # the family's data-only terms (-log(y!), ...), computed once per fit instead of at
    # each of its hundreds of evaluations (`Family.log_norm`); None: the family has none
    norm = eval_method(fam, "log_norm", data["y"], data.get("trials")) if fam.has_norm else None
    prepare = None
    if norm is not None:
        data["norm"] = norm

        def prepare(d):
            return dict(d, norm=fam.log_norm(d["y"], d.get("trials")))

    zi_random = bool(terms_z)

    def eta_fn(p, d):
        eta = d["cond"]["X"] @ p["beta"] + d["cond"]["offset"]
        if terms_c:
            eta = eta + _re_sum(p["b"], p["theta"], terms_c, d, "cond")
        if zi_random:
            ez = d["zi"]["X"] @ p["betazi"] + d["zi"]["offset"]
            ez = ez + _re_sum(p["bzi"], p["thetazi"], terms_z, d, "zi")
            return jnp.stack([eta, ez], axis=1)
        return eta

    # an intercept-only dispersion model (glmmTMB's default ~1) gives the family one
    # value, not one per row: nbinom2's lgamma(theta) and Gamma's lgamma(1 / phi)
    # are then computed once per evaluation, not once per row; so does an
    # intercept-only zero-inflation model (its log-sigmoids)
    disp_scalar = fam.has_disp and disp.intercept_only
    zi_scalar = has_zi and not terms_z and zi.intercept_only

    def obs_nll(eta, p, d):
        if zi_random:
            eta_c, eta_z = eta[:, 0], eta[:, 1]
        else:
            eta_c = eta
            eta_z = None
            if has_zi:
                eta_z = p["betazi"][0] if zi_scalar else d["zi"]["X"] @ p["betazi"] + d["zi"]["offset"]
        dsp = None
        if fam.has_disp:
            dsp = p["betadisp"][0] if disp_scalar else d["disp"]["X"] @ p["betadisp"] + d["disp"]["offset"]
        psi = p["psi"] if fam.n_psi else None
        ll = fam.log_prob(d["y"], eta_c, disp=dsp, psi=psi, zi=eta_z, trials=d.get("trials"), norm=d.get("norm"))
        return -d["weights"] * ll

    parsed_priors, prior_nll = None, None
    if priors is not None:
        # penalties enter the Laplace objective (a posterior mode, glmmTMB's priors)
        from ._priors import build_prior_nll

        parsed_priors, prior_nll = build_prior_nll(priors, params=params, names=names,
                                                   terms=terms_c + terms_z, family=fam, random=random)

    def latent_nll(p, d):
        out = 0.0
        for key in ("b", "bzi"):
            if key in p:
                out = out + 0.5 * jnp.sum(p[key] ** 2) + 0.5 * p[key].size * math.log(2 * math.pi)
        if prior_nll is not None:
            out = out + prior_nll(p)
        return out

    space = ParamSpace(params, random, map)
    groups = None
    if nagq != 1:
        # adaptive Gauss-Hermite quadrature: one grouping factor's levels are the blocks
        from ._agq_groups import agq_groups

        groups = agq_groups(space, params, terms_c + terms_z, design, nagq)
    K = 2 if zi_random else 1
    jac, jac_values = _jacobian_structure(space, terms_c, terms_z, data, K, reml)
    if layout is None:
        layout = _layout_hint(space, terms_c + terms_z)
    # the random effects are spherical (b = T u, u ~ N(0, I)): the latent Hessian is
    # diagonal unless a prior adds terms (a prior on REML's integrated fixed effects)
    lg = LatentGaussian(eta=eta_fn, obs_nll=obs_nll, latent_nll=latent_nll, jacobian=jac,
                        jacobian_values=jac_values, latent_diagonal=prior_nll is None, prepare=prepare)
    kw = {} if outer is None else {"outer": outer}
    quadratic = fam.name == "gaussian" and fam.link.name == "identity" and not has_zi
    if groups is not None:
        kw.update(nagq=nagq, groups=groups)
    model = Model(None, params, data=data, random=random, map=map, latent_gaussian=lg,
                  layout=layout, quadratic=quadratic and groups is None, check=False, solver=solver, **kw)
    return Template(model, fam, design, terms_c + terms_z, params, names, reml, prior_nll, parsed_priors)


def _jacobian_structure(space, terms_c, terms_z, data, K, reml):
    """Pattern and column colours of d eta / du, known from the design, and a
    function ``(p, d) -> values`` of its entries in the same order.

    Term columns: observation i touches level index_i of each term, all k of its
    columns (T mixes them), with the value ``(Z T)[i, l]`` (``eta_i`` adds
    ``Z_i T u_level``); levels of one factor never share an observation, so
    every level of a term column gets that column's colour. REML's integrated
    fixed effects touch every row where their column of X is not zero: a
    colour each.
    """
    rows, cols, colors = [], [], []
    n_u = space.n_u
    color_of = np.full(n_u, -1, np.int64)
    next_color = 0
    parts = []  # per term: (comp, j, term, entries of (Z T)' kept or None); REML: (comp, None, column, rows)
    for comp, terms, kk in (("cond", terms_c, 0), ("zi", terms_z, 1)):
        key = "b" if comp == "cond" else "bzi"
        for j, t in enumerate(terms):
            idx = np.asarray(data[comp]["index"][j], np.int64)
            N = idx.shape[0]
            pos = space.index[key][t.b_slice]
            kept = []
            for l in range(t.k):
                u_idx = pos[idx * t.k + l]
                keep = u_idx >= 0
                rows.append(np.arange(N)[keep] * K + kk)
                cols.append(u_idx[keep])
                kept.append(l * N + np.nonzero(keep)[0])
                color_of[pos[l::t.k][pos[l::t.k] >= 0]] = next_color
                next_color += 1
            kept = np.concatenate(kept) if kept else np.zeros(0, np.int64)
            parts.append((comp, j, t, None if kept.size == N * t.k else kept))
    if reml:
        for comp, key, kk in (("cond", "beta", 0), ("zi", "betazi", 1)):
            if key in space.random:
                X = np.asarray(data[comp]["X"])
                for j, u_idx in enumerate(space.index[key]):
                    if u_idx < 0:
                        continue
                    nz = np.nonzero(X[:, j])[0]
                    rows.append(nz * K + kk)
                    cols.append(np.full(nz.shape, u_idx))
                    parts.append((comp, None, j, nz))
                    color_of[u_idx] = next_color
                    next_color += 1
    if not rows:
        return None, None
    if np.any(color_of < 0):
        color_of[color_of < 0] = next_color  # unused entries: one spare colour

    def values(p, d):
        out = []
        for comp, j, t, sel in parts:
            if j is None:  # REML: column t of X at its rows sel
                out.append(d[comp]["X"][sel, t])
                continue
            theta = p["theta" if comp == "cond" else "thetazi"]
            T = t.struct.factor(theta[t.theta_slice]).reshape(t.k, t.k)
            v = (d[comp]["Z"][j] @ T).T.reshape(-1)  # column by column, rows in order
            out.append(v if sel is None else v[sel])
        return jnp.concatenate(out)

    return (np.concatenate(rows), np.concatenate(cols), color_of), values


def _layout_hint(space, terms):
    """Arrow layout: the largest grouping factor's levels form the block-diagonal
    head (with every term on the same factor); everything else is the dense tail."""
    if not terms:
        return None
    big = max(terms, key=lambda t: t.m)
    head = []
    for t in terms:
        if t.component == big.component and t.m == big.m and t.levels == big.levels:
            key = "b" if t.component == "cond" else "bzi"
            head.append(space.index[key][t.b_slice])
    head = np.concatenate(head)
    head = head[head >= 0]
    tail = np.setdiff1d(np.arange(space.n_u), head)
    return ("arrow", tail)
