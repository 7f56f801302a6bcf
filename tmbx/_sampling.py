"""Full-posterior sampling with NUTS: tmbstan for tmbx templates and formula fits.

``fit.sample(num_samples, num_chains, seed, laplace)`` runs the No-U-Turn
sampler (numpyro's NUTS kernel, Stan's algorithm and warmup) on

- ``laplace=False``: every free parameter, fixed and latent, with potential
  ``-log p(theta, u | y) = f(x, u) + prior(p)`` (the template's joint nll);
- ``laplace=True``: the fixed parameters only, with the latent effects
  integrated out by the Laplace approximation (tmbstan's ``laplace=TRUE``):
  potential ``L(x) + prior(p)``, the inner Newton solve started each time at
  the fit's mode.

All chains are one ``vmap``-ed program (and, for simulation-based calibration,
so are replicate data sets): the kernel is compiled once, ahead of time, then
run in chunks under a progress bar. numpyro (and arviz, for ``to_arviz``) is
an optional dependency: ``pip install "tmbx[sample]"``.

Priors
------
Templates (``tmbx.Model``): the nll is the joint density of data and latent
effects; ``priors=`` takes a callable ``p -> negative log prior`` over the
parameter dict. Without it the fixed parameters get flat priors (a warning
says so), and a parameter the nll does not depend on is an error.

Formula fits (``tmbx.glmm``): the fit's own priors (``glmm(priors=...)``,
already part of the template's nll, as glmmTMB's MAP penalties without
Jacobians; sampling adds the log-Jacobians so that a prior on the sds or on
the correlation matrix is that density there) where given; for the other parameter
classes, weakly informative proper defaults (brms' choices), named in
``post.summary()["prior"]``:

- sds (``theta`` log-sd coordinates) and a Gaussian model's residual sd
  (``betadisp`` ~1 = log sigma^2): half-t(3, 0, s) on the sd scale, with the
  log-Jacobian of the log parametrization; ``s = max(2.5, mad(y))`` for
  identity links (the response's scale), else 2.5;
- correlations of ``us`` terms: LKJ(2) on the correlation matrix, with the
  exact log-Jacobian of glmmTMB's parametrization (by automatic differentiation);
- other covariance parameters, ``betazi``, other ``betadisp``, ``psi``:
  normal(0, 5) on their unconstrained scale;
- conditional fixed effects ``beta``: flat for Gaussian, Poisson and binomial
  models, where it gives a proper posterior provided X has full column rank
  and, for counts and binomial data, no direction of beta separates the data
  (quasi-complete separation; a level with all-zero counts). Both are checked
  (a linear program) and an improper posterior is an error that suggests a
  proper prior. Other families: normal(0, 5) on beta.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ._internal import LazyModule

sst = LazyModule("scipy.stats")

_INSTALL = 'sampling needs numpyro (and arviz for to_arviz): pip install "tmbx[sample]"'
QUANTILES = (0.025, 0.25, 0.5, 0.75, 0.975)


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{_INSTALL} ({module} is not installed)") from e


# ====================================================================== NUTS driver
def nuts(potential_gen: Callable, z0, data, *, seed: int = 0, num_warmup: int = 1000,
         num_samples: int = 1000, batched_data: bool = False, progress_bar: bool = True,
         chunks: int = 40, **options) -> dict:
    """Run NUTS chains as one vectorized program.

    ``potential_gen(data)`` returns ``z -> potential`` (the negative log
    posterior of the flat vector z). ``z0``: initial points, shape
    ``(chains, dim)``, or ``(replicates, chains, dim)`` with ``batched_data``
    (``data`` then stacked on a leading replicate axis: simulation-based
    calibration runs every replicate's chains at once). ``options`` go to
    numpyro's NUTS (``target_accept_prob``, ``max_tree_depth``, ``dense_mass``).

    Returns ``z`` (..., chains, num_samples, dim), the per-draw statistics
    ``diverging``, ``num_steps``, ``accept_prob``, ``potential_energy``,
    ``energy``, the adapted ``step_size`` and ``timing`` (compile / sampling s).
    """
    hmc = _require("numpyro.infer.hmc")
    init_kernel, sample_kernel = hmc.hmc(potential_fn_gen=potential_gen, algo="NUTS")
    z0 = jnp.asarray(z0, jnp.float64)
    total = num_warmup + num_samples
    length = -(-total // max(1, min(chunks, total)))
    n_chunks = -(-total // length)

    def init_one(key, z, d):
        return init_kernel(z, num_warmup, model_args=(d,), rng_key=key, **options)

    def chunk_one(state, d):
        def step(s, _):
            s = sample_kernel(s, model_args=(d,))
            return s, (s.z, s.diverging, s.num_steps, s.accept_prob, s.potential_energy, s.energy)

        return jax.lax.scan(step, state, None, length=length)

    init_v = jax.vmap(init_one, in_axes=(0, 0, None))
    chunk_v = jax.vmap(chunk_one, in_axes=(0, None))
    if batched_data:
        init_v = jax.vmap(init_v, in_axes=(0, 0, 0))
        chunk_v = jax.vmap(chunk_v, in_axes=(0, 0))
    keys = jax.random.split(jax.random.PRNGKey(seed), math.prod(z0.shape[:-1])).reshape(*z0.shape[:-1], -1)

    t0 = time.perf_counter()
    init_c = jax.jit(init_v).lower(keys, z0, data).compile()
    state = init_c(keys, z0, data)
    bad = np.argwhere(~np.isfinite(np.asarray(state.potential_energy))).tolist()
    if bad:
        raise ValueError(
            f"the log posterior is not finite at the starting points of chains {bad}; with laplace=True "
            "the inner solve for the random effects may fail away from the mode. Try init_jitter=0.0, "
            "or check the fit's convergence and the priors' support."
        )
    chunk_c = jax.jit(chunk_v).lower(state, data).compile()
    t_compile = time.perf_counter() - t0

    t0 = time.perf_counter()
    outs = []
    tqdm = _require("tqdm").tqdm
    with tqdm(total=n_chunks * length, desc="NUTS", disable=not progress_bar, leave=False) as bar:
        for c in range(n_chunks):
            state, out = chunk_c(state, data)
            outs.append(jax.tree_util.tree_map(np.asarray, out))
            bar.set_description("NUTS warmup" if (c + 1) * length <= num_warmup else "NUTS sampling")
            bar.update(length)
    t_sample = time.perf_counter() - t0
    axis = z0.ndim - 1  # the draws axis, after (replicates,) chains
    cat = [np.concatenate(parts, axis=axis) for parts in zip(*outs)]
    keep = (slice(None),) * axis + (slice(num_warmup, total),)
    names = ("z", "diverging", "num_steps", "accept_prob", "potential_energy", "energy")
    res = {k: v[keep] for k, v in zip(names, cat)}
    res["step_size"] = np.asarray(state.adapt_state.step_size)
    res["timing"] = {"compile": t_compile, "sampling": t_sample}
    return res


def _finite(v):
    return jnp.where(jnp.isfinite(v), v, jnp.inf)


def _potential_gen(model, laplace: bool, prior: Callable | None, u0):
    """``data -> (z -> negative log posterior)`` for a `Model`; z = (x, u) or x."""
    sp = model.space
    nx = sp.n_x
    u0 = jnp.asarray(u0)

    def gen(d):
        def joint(z):
            x, u = z[:nx], z[nx:]
            v = model.f(x, u, d)
            return _finite(v if prior is None else v + prior(sp.unflatten(x, u)))

        def marginal(x):
            v, (_, status) = model._objective(x, u0, d)
            if prior is not None:
                v = v + prior(sp.unflatten(x, u0))
            return _finite(jnp.where(status == 0, v, jnp.inf))

        return marginal if laplace else joint

    return gen


def _check_args(num_samples, num_chains, kw):
    for name, v in (("num_samples", num_samples), ("num_chains", num_chains)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    nw = kw.get("num_warmup", num_samples)  # Stan's default: as many warmup iterations as draws
    if not isinstance(nw, (int, np.integer)) or nw < 0:
        raise ValueError(f"num_warmup must be a non-negative integer, got {nw!r}")
    return int(nw)


def _run(model, data, z_mode, u_mode, laplace, prior, num_samples, num_chains, seed, kw, lower=None):
    """Jittered starts at the mode, then `nuts`; returns the raw draws dict."""
    num_warmup = _check_args(num_samples, num_chains, kw)
    kw = dict(kw)
    kw.pop("num_warmup", None)
    jitter = float(kw.pop("init_jitter", 0.1))
    progress = bool(kw.pop("progress_bar", True))
    z_mode = np.asarray(z_mode, float)
    if lower is not None:  # singular fits: start log-sds away from -inf
        z_mode = np.maximum(z_mode, lower)
    rng = np.random.default_rng(seed)
    z0 = z_mode + jitter * rng.standard_normal((num_chains, z_mode.size))
    gen = _potential_gen(model, laplace, prior, u_mode)
    return nuts(gen, z0, data, seed=seed, num_warmup=num_warmup, num_samples=num_samples,
                progress_bar=progress, **kw)


# ====================================================================== templates
def sample_template(fit, num_samples=1000, num_chains=4, seed=0, laplace=False, priors=None, **kw):
    """NUTS for a template fit (tmbstan's ``tmbstan(obj, laplace=)``).

    ``priors``: callable ``p -> negative log prior density`` over the parameter
    dict ``p`` (fixed and random names), added to the template's nll; default
    flat. With ``laplace=True`` they may involve the fixed parameters only (the
    random effects' density belongs in the nll). Held (``map``) elements stay at
    their values. ``kw``: ``num_warmup`` (default ``num_samples``, Stan's),
    ``init_jitter`` (sd of the chains' jitter around the mode, 0.1), ``progress_bar``,
    and numpyro NUTS options (``target_accept_prob``, ``max_tree_depth``,
    ``dense_mass``).
    """
    model = fit.model
    sp = model.space
    if priors is not None and not callable(priors):
        raise TypeError(f"priors must be a callable p -> negative log prior, got {type(priors).__name__}")
    z_mode = fit.x if laplace else np.concatenate([fit.x, fit.u])
    if priors is not None and laplace and sp.n_u:
        gu = jax.grad(lambda u: priors(sp.unflatten(jnp.asarray(fit.x), u)))(jnp.asarray(fit.u))
        if np.any(np.asarray(gu) != 0):
            raise ValueError("with laplace=True the priors may involve the fixed parameters only: the "
                             f"random effects ({sp.random}) are integrated out, so their density belongs "
                             "in the template's nll")
    if priors is None:
        warnings.warn("sampling with flat priors on the fixed parameters: the template's nll must make "
                      "the posterior proper (pass priors=lambda p: ... for proper priors)",
                      UserWarning, stacklevel=3)
        _check_identified(model, fit.data, z_mode, fit.u, laplace)
    res = _run(model, fit.data, z_mode, fit.u, laplace, priors, num_samples, num_chains, seed, kw)
    labels = sp.labels["x"] + ([] if laplace else sp.labels["u"])

    def named(z):
        nx = sp.n_x
        return sp.unflatten(z[:nx], z[nx:] if not laplace else jnp.asarray(fit.u))

    samples = _apply(named, res["z"])
    if laplace:
        samples = {k: v for k, v in samples.items() if k in sp.fixed}
    flat = {lab: res["z"][..., i] for i, lab in enumerate(labels)}
    prior_name = "flat" if priors is None else "priors="
    table = {lab: prior_name for lab in sp.labels["x"]} | {lab: "latent (nll)" for lab in sp.labels["u"]}
    return Posterior(samples, flat, res, table, laplace)


def _check_identified(model, data, z_mode, u_mode, laplace):
    """With flat priors, a free parameter the potential does not depend on has an
    improper posterior: detect it from the gradient at two points."""
    gen = _potential_gen(model, laplace, None, u_mode)
    g = jax.jit(jax.grad(gen(data)))
    rng = np.random.default_rng(1)
    g1 = np.asarray(g(jnp.asarray(z_mode)))
    g2 = np.asarray(g(jnp.asarray(z_mode + 0.1 * rng.standard_normal(z_mode.size))))
    dead = np.nonzero((g1 == 0) & (g2 == 0))[0]
    if dead.size:
        labels = (model.space.labels["x"] + model.space.labels["u"])
        names = [labels[i] for i in dead]
        raise ValueError(
            f"the nll does not depend on {names}: with a flat prior their posterior is improper. "
            "Hold them with map= (None), or pass priors=lambda p: ... giving them a proper prior."
        )


def _apply(fn, z):
    """Map a function of one draw over (..., dim) draws; returns numpy arrays."""
    lead = z.shape[:-1]
    out = jax.jit(jax.vmap(fn))(jnp.asarray(z.reshape(-1, z.shape[-1])))
    return {k: np.asarray(v).reshape(lead + np.shape(v)[1:]) for k, v in out.items()}


# ====================================================================== formula fits
def sample_glmm(fit, num_samples=1000, num_chains=4, seed=0, laplace=False, **kw):
    """NUTS for a `GlmmFit` (tmbstan on a glmmTMB fit); see the module docstring
    for the priors. ``kw`` as for `sample_template`."""
    if "priors" in kw:
        raise TypeError("priors for a formula fit are the fit's: refit with tmbx.glmm(..., priors=...)")
    model = fit.model
    sp = model.space
    prior, table, lower = default_priors(fit)
    z_mode = fit._fit.x if laplace else np.concatenate([fit._fit.x, fit._fit.u])
    lower = lower[: sp.n_x] if laplace else lower
    res = _run(model, fit._fit.data, z_mode, fit._fit.u, laplace, prior, num_samples, num_chains, seed, kw, lower)
    named = _glmm_quantities(fit, laplace)
    samples = _apply(named, res["z"])
    flat = {k: v for k, v in samples.items() if not k.startswith("ranef:")}
    own = "fit's prior" if fit.template.prior_nll is not None else ""
    table = {k: "held (map)" if np.ptp(v) == 0 else table.get(k, own) for k, v in flat.items()}
    return Posterior(samples, flat, res, table, laplace)


def _glmm_quantities(fit, laplace):
    """z -> named quantities, as confint names them (the profile's and bootstrap's
    `named_parameters`: fixed effects, sd_TERM|GROUP, cor_TERM2.TERM1|GROUP, sigma,
    structure parameters), psi, and the random effects b per group (joint sampling)."""
    from .inference._profile import named_parameters

    sp = fit.model.space
    tmpl = fit.template
    u_mode = jnp.asarray(fit._fit.u)
    _, value_fn = named_parameters(fit)
    # with laplace=True, fixed effects integrated out (REML) are not sampled
    integrated = {("" if key == "beta" else "zi~") + nm for key in ("beta", "betazi")
                  if laplace and key in sp.random for nm in tmpl.names.get(key, [])}

    def named(z):
        nx = sp.n_x
        p = sp.unflatten(z[:nx], u_mode if laplace else z[nx:])
        out = {k: v for k, v in value_fn(p).items() if k not in integrated}
        for i in range(len(tmpl.names.get("psi", []))):
            out[f"psi[{i}]"] = p["psi"][i]
        if not laplace:
            for t in tmpl.terms:
                key, bkey, prefix = ("theta", "b", "") if t.component == "cond" else ("thetazi", "bzi", "zi~")
                T = t.struct.factor(p[key][t.theta_slice])
                out[f"ranef:{prefix}{t.group}"] = p[bkey][t.b_slice].reshape(t.m, t.k) @ T.T
        return out

    return named


def _corr(cov):
    s = jnp.sqrt(jnp.diag(cov))
    return cov / jnp.outer(s, s)


# ---------------------------------------------------------------------- default priors
def _log_half_t(s, nu, scale):
    """log density of the half-t(nu, 0, scale) at s > 0."""
    return (math.log(2.0) + jax.scipy.special.gammaln((nu + 1) / 2) - jax.scipy.special.gammaln(nu / 2)
            - 0.5 * math.log(nu * math.pi) - math.log(scale) - (nu + 1) / 2 * jnp.log1p((s / scale) ** 2 / nu))


def _lkj_corr_log_density(corr_of_x, k, eta=2.0):
    """x -> log LKJ(eta) density of corr(x) (up to its constant) plus the
    log-Jacobian of x -> strict lower triangle of corr."""
    rows, cols = np.tril_indices(k, -1)

    def lower(x):
        return corr_of_x(x)[rows, cols]

    def logp(x):
        _, logdet_c = jnp.linalg.slogdet(corr_of_x(x))
        _, logdet_j = jnp.linalg.slogdet(jax.jacfwd(lower)(x))
        return (eta - 1.0) * logdet_c + logdet_j

    return logp


_NORMAL_SD = 5.0


def _normal_nll(v):
    return jnp.sum(0.5 * (v / _NORMAL_SD) ** 2 + math.log(_NORMAL_SD) + 0.5 * math.log(2 * math.pi))


def _fit_priors(fit):
    """The fit's own priors (tmbx.formula._priors specs): ``{(key, element): text}``
    of the parameters they cover, and the log-Jacobian terms that make each a
    density on the scale it names (glmmTMB adds them to the nll without one, a
    posterior mode's convention): ``theta`` for priors on ``exp(theta)``, the
    correlation map's for LKJ on ``us`` terms. Wishart priors are used as written."""
    from .formula._fit import _log_sd_positions

    covered, parts = {}, []
    if fit.template.prior_nll is None:
        return covered, parts
    from .formula._priors import _FAMILIES

    for spec in fit.template.priors or []:
        if spec.family in ("lkj", "wishart"):
            for t in spec.terms:
                sd = {pos for _, pos in _log_sd_positions(t)}
                pos = [j for j in range(t.struct.n_params) if spec.family == "wishart" or j not in sd]
                covered.update({(spec.key, t.theta_slice.start + j): spec.prior for j in pos})
                if spec.family == "lkj" and t.struct.name == "us":
                    parts.append(partial(_lkj_term, key=spec.key, sl=slice(t.theta_slice.start + t.k,
                                                                           t.theta_slice.stop),
                                         logp=_lkj_corr_log_density(_us_corr(t), t.k, eta=1.0)))
            continue
        idx = np.asarray(spec.index, int).reshape(-1)
        covered.update({(spec.key, int(i)): spec.prior for i in idx})
        if _FAMILIES[spec.family][2] in ("exp", "sd"):
            parts.append(partial(_jacobian_exp_term, key=spec.key, idx=idx))
    return covered, parts


def _jacobian_exp_term(p, key, idx):
    return -jnp.sum(p[key].reshape(-1)[idx])


def _us_corr(t):
    k = t.k
    return lambda x: _corr(t.struct.cov(jnp.concatenate([jnp.zeros(k), x])))


def default_priors(fit):
    """The priors of a formula fit for sampling: ``(prior_nll(p) or None,
    {quantity: description}, lower bounds for the starting point)``: the fit's
    own priors where given (Jacobians added), defaults elsewhere (module
    docstring); raises for an improper posterior it can detect."""
    from .formula._fit import _log_sd_positions

    sp = fit.model.space
    tmpl, fam = fit.template, fit.family
    covered, parts = _fit_priors(fit)
    y = np.asarray(fit.design.y, float)
    identity = getattr(getattr(fam, "link", None), "name", "") == "identity"
    scale = max(2.5, float(sst.median_abs_deviation(y, scale="normal"))) if identity else 2.5
    ht, nrm = f"half-t(3, 0, {scale:.3g})", f"normal(0, {_NORMAL_SD:g})"
    table = {}
    lower = np.full(sp.n_x + sp.n_u, -np.inf)

    def free(key, i):
        """Is element i of key a free parameter without a prior from the fit?"""
        return (key, i) not in covered and key in sp.index and sp.index[key][i] >= 0

    def name(label, key, i, default):
        table[label] = f"{covered[(key, i)]} (fit's)" if (key, i) in covered else default

    for t in tmpl.terms:
        key, prefix = ("theta", "") if t.component == "cond" else ("thetazi", "zi~")
        s0 = t.theta_slice.start
        sd_pos = {pos: j for j, pos in _log_sd_positions(t)}
        sds = [s0 + pos for pos in sd_pos if free(key, s0 + pos)]
        for pos, j in sd_pos.items():
            name(f"{prefix}sd_{t.terms[j]}|{t.group}", key, s0 + pos, ht)
            i = sp.index[key][s0 + pos]
            if i >= 0:  # singular fits: start the log-sds away from -inf
                lower[i if key in sp.fixed else sp.n_x + i] = math.log(0.05 * scale)
        if sds:
            parts.append(partial(_half_t_term, key=key, idx=np.asarray(sds), scale=scale))
        other = [s0 + pos for pos in range(t.struct.n_params) if pos not in sd_pos]
        if t.struct.name == "us" and t.k > 1:
            for (i, j), g in zip(zip(*np.tril_indices(t.k, -1)), other):
                name(f"{prefix}cor_{t.terms[i]}.{t.terms[j]}|{t.group}", key, g, "LKJ(2)")
            if all(free(key, g) for g in other):
                parts.append(partial(_lkj_term, key=key, sl=slice(s0 + t.k, t.theta_slice.stop),
                                     logp=_lkj_corr_log_density(_us_corr(t), t.k)))
            continue
        for g in other:
            name(f"{prefix}theta_{tmpl.names[key][g]}", key, g, nrm)
        if any(free(key, g) for g in other):
            parts.append(partial(_normal_term, key=key, idx=np.asarray([g for g in other if free(key, g)])))
    for key, prefix in (("betadisp", "disp~"), ("betazi", "zi~"), ("psi", ""), ("beta", "")):
        if key not in sp.names:
            continue
        idx = [i for i in range(len(tmpl.names[key])) if free(key, i)]
        if key == "betadisp" and fam.name == "gaussian" and fit.sigma is not None:
            name("sigma", key, 0, ht)
            if idx:
                parts.append(partial(_sigma_term, fam=fam, scale=scale))
            continue
        flat = key == "beta" and fam.name in ("gaussian", "poisson", "binomial")
        for i, nm in enumerate(tmpl.names[key]):
            name(prefix + nm, key, i, "flat" if flat else nrm)
        if flat:
            check_proper(fit, [i for i in range(len(tmpl.names[key])) if (key, i) not in covered])
        elif idx:
            parts.append(partial(_normal_term, key=key, idx=np.asarray(idx)))

    def prior_nll(p):
        return sum((part(p) for part in parts), jnp.asarray(0.0))

    return (prior_nll if parts else None), table, lower


def _half_t_term(p, key, idx, scale):
    th = p[key][idx]
    return -jnp.sum(_log_half_t(jnp.exp(th), 3.0, scale) + th)  # + log|d sd / d theta|


def _lkj_term(p, key, sl, logp):
    return -logp(p[key][sl])


def _normal_term(p, key, idx):
    return _normal_nll(p[key] if idx is None else p[key][idx])


def _sigma_term(p, fam, scale):
    sig = lambda v: fam.sigma(v)
    bd = p["betadisp"][0]
    return -(_log_half_t(sig(bd), 3.0, scale) + jnp.log(jnp.abs(jax.grad(sig)(bd))))


def check_proper(fit, flat=None):
    """Flat priors on the conditional fixed effects give a proper posterior when X
    has full column rank and no direction d of beta moves every observation's
    likelihood up or leaves it unchanged (separation; counts: all-zero levels).
    Raises a ValueError naming the coefficients otherwise. ``flat``: the columns
    with flat priors (default all; coefficients with proper priors can be left out)."""
    flat = list(range(len(fit.template.names["beta"]))) if flat is None else list(flat)
    w = np.asarray(fit.design.weights, float)
    X = np.asarray(fit.design.components["cond"].X, float)[w > 0][:, flat]
    names = [fit.template.names["beta"][i] for i in flat]
    hint = ("Give the fixed effects a proper prior: refit with tmbx.glmm(..., priors=...) "
            "(e.g. a normal prior on class 'fixef'), or drop those coefficients.")
    if X.shape[1] and np.linalg.matrix_rank(X) < X.shape[1]:
        raise ValueError(f"the fixed-effect design matrix is rank deficient ({np.linalg.matrix_rank(X)} "
                         f"< {X.shape[1]} columns {names}): with flat priors the posterior is improper. {hint}")
    fam = fit.family.name
    if fam not in ("poisson", "binomial") or not X.shape[1]:
        return
    y = np.asarray(fit.design.y, float)[w > 0]
    trials = fit.design.trials
    n = np.ones_like(y) if trials is None else np.asarray(trials, float)[w > 0]
    # sign of the eta direction that raises the likelihood of each boundary row
    sign = np.where(y <= 0, -1.0, np.where((fam == "binomial") & (y >= n), 1.0, 0.0))
    Xs = X / np.maximum(np.abs(X).max(axis=0), 1e-300)
    A_ub = -(sign[sign != 0, None] * Xs[sign != 0])
    A_eq = Xs[sign == 0]
    from scipy.optimize import linprog

    lp = linprog(c=A_ub.sum(axis=0), A_ub=A_ub if A_ub.size else None,
                 b_ub=np.zeros(A_ub.shape[0]) if A_ub.size else None,
                 A_eq=A_eq if A_eq.size else None, b_eq=np.zeros(A_eq.shape[0]) if A_eq.size else None,
                 bounds=[(-1, 1)] * X.shape[1], method="highs")
    if lp.status == 0 and -lp.fun > 1e-7 * max(1, X.shape[0]):
        involved = [nm for nm, d in zip(names, lp.x) if abs(d) > 1e-6]
        what = "separate the successes from the failures" if fam == "binomial" else \
            "fit a subset of all-zero counts exactly"
        raise ValueError(f"the fixed effects {involved} {what} (the likelihood keeps rising along a "
                         f"direction of beta): with flat priors the posterior is improper. {hint}")


# ====================================================================== result
@dataclasses.dataclass
class Posterior:
    """Draws of `fit.sample` (tmbstan's stanfit).

    Fields: ``samples`` (name -> array (chains, draws, ...)), ``flat`` (the
    scalar quantities the summary reports), ``stats`` (per-draw NUTS
    statistics: diverging, num_steps, accept_prob, potential_energy, energy;
    the step sizes and the compile/sampling timing), ``priors`` (name -> prior
    description), ``laplace``.
    """

    samples: dict
    flat: dict
    stats: dict
    priors: dict
    laplace: bool

    def __post_init__(self):
        self.stats = {k: v for k, v in self.stats.items() if k != "z"}
        self._summary = None
        self._warn()

    @property
    def num_chains(self) -> int:
        return int(self.stats["diverging"].shape[0])

    @property
    def num_divergent(self) -> int:
        return int(np.sum(self.stats["diverging"]))

    @property
    def timing(self) -> dict:
        return self.stats["timing"]

    def _warn(self):
        n = self.num_divergent
        if n:
            warnings.warn(f"{n} divergent transitions after warmup: the posterior has regions the sampler "
                          "cannot follow (funnels near zero variance); raise target_accept_prob (e.g. 0.95) "
                          "or reparametrize / use stronger priors", RuntimeWarning, stacklevel=4)
        s = self.summary()
        bad = s.index[s["r_hat"] > 1.01].tolist()
        if bad:
            warnings.warn(f"R-hat > 1.01 for {bad}: the chains have not mixed; run more draws "
                          "(num_warmup, num_samples)", RuntimeWarning, stacklevel=4)
        low = s.index[np.minimum(s["ess_bulk"], s["ess_tail"]) < 100 * self.num_chains].tolist()
        if low:
            warnings.warn(f"effective sample size below {100 * self.num_chains} for {low}: means and "
                          "quantiles are imprecise; run more draws", RuntimeWarning, stacklevel=4)

    def summary(self) -> pd.DataFrame:
        """Posterior mean, sd, quantiles (2.5, 25, 50, 75, 97.5%), rank-normalized
        split R-hat and bulk/tail ESS (Vehtari et al. 2021; rstan's monitor), prior."""
        if self._summary is None:
            rows = {}
            for name, a in self.flat.items():
                a = np.asarray(a, float)
                q = np.quantile(a, QUANTILES)
                rows[name] = [a.mean(), a.std(ddof=1), *q, rhat(a), ess_bulk(a), ess_tail(a),
                              self.priors.get(name, "")]
            cols = ["mean", "sd"] + [f"{100 * q:g}%" for q in QUANTILES] + ["r_hat", "ess_bulk", "ess_tail",
                                                                             "prior"]
            self._summary = pd.DataFrame.from_dict(rows, orient="index", columns=cols)
        return self._summary

    def to_arviz(self):
        """arviz's result object (InferenceData in arviz 0.x, DataTree in 1.x)."""
        az = _require("arviz")
        posterior = {k: np.asarray(v) for k, v in self.samples.items()}
        stats = {"diverging": self.stats["diverging"], "n_steps": self.stats["num_steps"],
                 "acceptance_rate": self.stats["accept_prob"], "energy": self.stats["energy"],
                 "lp": -self.stats["potential_energy"]}
        if int(az.__version__.split(".")[0]) >= 1:
            return az.from_dict({"posterior": posterior, "sample_stats": stats})
        return az.from_dict(posterior=posterior, sample_stats=stats)

    def __repr__(self):
        c, s = self.stats["diverging"].shape
        return (f"Posterior({c} chains x {s} draws, {'Laplace marginal' if self.laplace else 'joint'}, "
                f"{self.num_divergent} divergent)")


# ---------------------------------------------------------------------- diagnostics
def _split(a):
    half = a.shape[1] // 2
    return np.concatenate([a[:, :half], a[:, a.shape[1] - half:]], axis=0)


def _z_scale(a):
    r = sst.rankdata(a, method="average").reshape(a.shape)
    return sst.norm.ppf((r - 0.375) / (a.size + 0.25))


def _rhat_basic(a):
    n = a.shape[1]
    w = np.mean(np.var(a, axis=1, ddof=1))
    b = n * np.var(np.mean(a, axis=1), ddof=1)
    return float(np.sqrt(((n - 1) / n * w + b / n) / w)) if w > 0 else float("nan")


def _autocov(a):
    """Biased autocovariance of each chain (rows), by FFT."""
    n = a.shape[1]
    x = a - a.mean(axis=1, keepdims=True)
    f = np.fft.rfft(x, n=2 * n, axis=1)
    return np.fft.irfft(f * np.conj(f), axis=1)[:, :n] / n


def _ess(a):
    """Stan's effective sample size (Geyer's initial monotone sequence over the
    multi-chain autocorrelation; Vehtari et al. 2021, eq. 10-11)."""
    if np.ptp(a) == 0:
        return float("nan")
    m, n = a.shape
    acov = _autocov(a)
    mean_var = acov[:, 0].mean() * n / (n - 1)
    var_plus = mean_var * (n - 1) / n + (np.var(a.mean(axis=1), ddof=1) if m > 1 else 0.0)
    rho = 1.0 - (mean_var - acov.mean(axis=0)) / var_plus
    rho[0] = 1.0
    rho_t = np.zeros(n)
    rho_t[:2] = rho[:2]
    t, even, odd = 1, 1.0, rho[1]
    while t < n - 3 and even + odd > 0:  # initial positive sequence
        even, odd = rho[t + 1], rho[t + 2]
        if even + odd >= 0:
            rho_t[t + 1], rho_t[t + 2] = even, odd
        t += 2
    max_t = t - 2
    if even > 0:
        rho_t[max_t + 1] = even
    t = 1
    while t <= max_t - 2:  # initial monotone sequence
        if rho_t[t + 1] + rho_t[t + 2] > rho_t[t - 1] + rho_t[t]:
            rho_t[t + 1] = rho_t[t + 2] = (rho_t[t - 1] + rho_t[t]) / 2
        t += 2
    tau = -1.0 + 2.0 * rho_t[: max_t + 1].sum() + rho_t[max_t + 1: max_t + 2].sum()
    return float(m * n / max(tau, 1 / math.log10(m * n)))


def rhat(a) -> float:
    """Rank-normalized split R-hat (max of bulk and folded), for draws (chains, draws)."""
    a = np.asarray(a, float)
    if np.ptp(a) == 0 or a.shape[1] < 4:
        return float("nan")
    bulk = _rhat_basic(_z_scale(_split(a)))
    tail = _rhat_basic(_z_scale(_split(np.abs(a - np.median(a)))))
    return max(bulk, tail)


def ess_bulk(a) -> float:
    a = np.asarray(a, float)
    return _ess(_z_scale(_split(a))) if a.shape[1] >= 4 else float("nan")


def ess_tail(a) -> float:
    a = np.asarray(a, float)
    if a.shape[1] < 4 or np.ptp(a) == 0:
        return float("nan")
    lo, hi = np.quantile(a, [0.05, 0.95])
    return min(_ess(_split((a <= lo).astype(float))), _ess(_split((a <= hi).astype(float))))
