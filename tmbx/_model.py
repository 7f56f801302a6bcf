"""`Model`: a template (nll over fixed and latent parameters) made fittable.

The pipeline reads as TMB's ``MakeADFun`` + ``nlminb`` + ``sdreport``::

    model = tmbx.Model(nll, params, data=d, random=["u"])
    fit = model.fit()            # one compiled program: BFGS over the Laplace marginal
    rep = fit.sdreport()         # delta method on the exact Hessian of the marginal

Everything numeric is a pure function of ``(x, u0, data)``: ``x`` the free
fixed parameters, ``u0`` the warm start of the latent effects and ``data`` the
template's data pytree. That is what lets one compiled fit serve refits,
batches (`fit_batch`, by `vmap`) and simulations.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._config import compile_options, fit_compile_options
from ._hessian import ColoredHessian, LatentGaussianHessian
from ._internal import gc_deferred, sharded, to_device
from ._laplace import INDEX_KEY, INNER_MESSAGES, INNER_OK, InnerOptions, Laplace
from ._optim import OUTER_MESSAGES, BFGSOptions, bfgs
from ._params import ParamSpace
from ._programs import ProgramCache, prefetch, read_object, template_digest, write_object
from ._tiered import TieredJit


def _tracing() -> bool:
    """Whether a JAX transformation (jit, vmap, grad) is being traced right now."""
    from jax._src import core  # no public equivalent; checked by tests/test_lmm_profiled.py

    return not core.trace_state_clean()


@dataclasses.dataclass(frozen=True)
class LatentGaussian:
    """Declares that a template's nll is ``sum(obs_nll(eta)) + latent_nll`` with
    ``eta`` linear in the random effects.

    - ``eta(p, d)``: linear predictor(s), shape ``(N,)`` or ``(N, K)``;
    - ``obs_nll(eta, p, d)``: per-observation nll, shape ``(N,)``, depending on the
      random effects only through ``eta``;
    - ``latent_nll(p, d)``: the random effects' prior nll (a scalar);
    - ``prepare(d) -> d`` (optional): the data with what ``obs_nll`` computes
      from them alone added (the formula front end: `Family.log_norm` of the
      response). A fit recomputes it once from its data (whose response may be
      a new one) before its optimizer's loop; ``obs_nll`` must read it from
      ``d``, not recompute it.

    The engine then builds the latent Hessian as ``J' W J + H_latent``
    (``J = d eta / d u``, ``W`` per-observation curvatures), which stays cheap
    for crossed random effects where colouring the whole Hessian does not.
    """

    eta: Callable
    obs_nll: Callable
    latent_nll: Callable
    jacobian: tuple | None = None  # optional (rows, cols, colours) of d eta / du over u's indices
    #: optional ``(p, d) -> values`` of d eta / du at ``jacobian``'s entries, in its
    #: order (rows indexing the flattened ``eta``): in place of one JVP per colour
    jacobian_values: Callable | None = None
    latent_diagonal: bool = False  # latent_nll's Hessian in u is diagonal: no pattern detection
    prepare: Callable | None = None

    def nll(self, p, d):
        return jnp.sum(self.obs_nll(self.eta(p, d), p, d)) + self.latent_nll(p, d)


# log-likelihood units: the linear-cost path's fit stops once a quasi-Newton step
# would gain less (0.014 standard errors from the optimum)
ITERATIVE_GAIN = 1e-4
#: the forward-difference Hessian's step (relative to max(1, |x|)), see `BFGSOptions`
FORWARD_FD_STEP = 1e-5
#: where the search of a large model goes to its finite-difference Hessian, see `BFGSOptions`
EARLY_HESSIAN = 1e-9


def outer_options(options: BFGSOptions, *, iterative: bool, large: bool) -> BFGSOptions:
    """The outer optimizer's settings for a model's cost, for every path that fits
    one (`Model`, the profiled LMM): on the linear-cost path a search that gives up
    within `ITERATIVE_GAIN` of the optimum counts as converged (see `BFGSOptions`);
    a large model on the exact path takes its finite-difference Hessian by forward
    differences at step `FORWARD_FD_STEP`, unless the user set ``fd_step``, and
    goes to it early (``early_hessian`` `EARLY_HESSIAN`, unless the user set it):
    both trade a relative 1e-5 of the Hessian for evaluations that cost."""
    if iterative:
        return eqx.tree_at(lambda o: o.gain_tol, options, max(options.gain_tol, ITERATIVE_GAIN))
    if large and options.fd_step == BFGSOptions.fd_step:
        options = eqx.tree_at(lambda o: (o.fd_forward, o.fd_step), options, (True, FORWARD_FD_STEP))
    if large and options.early_hessian == BFGSOptions.early_hessian:
        options = eqx.tree_at(lambda o: o.early_hessian, options, EARLY_HESSIAN)
    return options


# a fit on the linear-cost path warns when its log-likelihood's Monte Carlo error exceeds this
ITERATIVE_SE_WARN = 0.01


def _as_data(data):
    if data is None:
        return {}
    return jax.tree_util.tree_map(to_device, data)


class Model:
    """A template model: ``nll(p, d)`` with ``p`` a dict of named parameters.

    Parameters
    ----------
    nll : callable ``(p, d) -> scalar``, the joint negative log-likelihood.
    params : dict name -> start value (scalar or array).
    data : any pytree of arrays (the template's ``DATA_*``).
    random : names of parameters integrated out by the Laplace approximation
        (TMB's ``random``); put fixed effects here too for REML.
    map : TMB's ``map``: name -> per-element factor levels; ``None``/NaN holds
        an element at its start value, equal levels share one value.
    report : ``(p, d) -> dict`` of derived quantities (TMB's ``ADREPORT``);
        ``sdreport`` gives their delta-method standard errors.
    simulate : ``(p, d, key) -> new data`` (TMB's ``SIMULATE`` block).
    latent_gaussian : a `LatentGaussian` declaration (then ``nll`` may be None).
    layout : force the latent Hessian's layout ("dense", "arrow", "banded").
    solver : how the Laplace approximation factorizes that Hessian: "exact"
        (sparse Cholesky), "iterative" (the linear-cost path for crossed designs:
        conjugate gradients and stochastic log-determinants, `tmbx.IterativeOptions`
        for its settings, or an instance of it), or "auto" (the iterative path
        only where its predicted cost is lower: very large crossed tails).
    quadratic : declare that the nll is quadratic in the random effects (Gaussian
        responses with identity link): the Laplace approximation is then exact and
        computed with one Newton step, without an inner loop.

    A template is fingerprinted by what it computes (its jaxpr at the start
    values, the constants it closes over, its data and these arguments:
    `tmbx._programs.template_digest`). Under that key the latent Hessian's
    pattern and colouring and the fit's traced program are kept beside JAX's
    compilation cache, so the same model built in a later process skips the
    pattern detection and the fit's trace (TMB's ar1xar1 at 100 x 100: build and
    first fit 3.2 s to 1.4 s). ``TMBX_PROGRAM_CACHE=0`` turns this off;
    templates with a derivative rule or host callback of their own are traced
    every time.
    """

    def __init__(self, nll=None, params=None, data=None, random=None, map=None, *,
                 report=None, simulate=None, latent_gaussian: LatentGaussian | None = None,
                 layout: str | None = None, inner: InnerOptions = InnerOptions(),
                 outer: BFGSOptions = BFGSOptions(), nagq: int = 1, groups=None,
                 quadratic: bool = False, check: bool = True, solver="auto"):
        if nll is None and latent_gaussian is None:
            raise TypeError("Model needs a template: nll(p, d) or latent_gaussian=LatentGaussian(...)")
        if nll is None:
            nll = latent_gaussian.nll
        if isinstance(random, str):
            random = [random]
        self.nll = nll
        self.space = ParamSpace(params, random, map)
        self.data = _as_data(data)
        self.report_fn = report
        self.simulate_fn = simulate
        self.options = outer
        space = self.space
        self.f = lambda x, u, d: nll(space.unflatten(x, u), d)
        x0 = to_device(space.start("x"))
        u0 = to_device(space.start("u"))
        #: a fingerprint of everything that shapes this model's programs: the fit's
        #: traced program (and here the Hessian's colouring) are then kept on disk,
        #: and a later process skips tracing them (`tmbx._programs.ProgramCache`).
        #: A template's own from its jaxpr (`template_digest`); `tmbx.glmm` sets
        #: its own from the call (`spec_digest`)
        self._program_key = None
        if latent_gaussian is None and nagq == 1 and groups is None:
            spec = dict(names=list(space.names), random=list(space.random), map=map, layout=layout, inner=inner,
                        outer=outer, quadratic=quadratic, solver=solver,
                        starts={k: np.asarray(v) for k, v in space.starts.items()})
            self._program_key = template_digest(self.f, (x0, u0, self.data), spec)
            prefetch(self._program_key)  # the stored fit program loads while the rest is set up
        if check:
            self._check_template(x0, u0)
        # the sparse Hessian's pattern, colouring and layout are built on first use:
        # a caller that fits another way (tmbx.glmm's profiled least squares for
        # linear mixed models) never pays for them
        self.solver = solver
        self._laplace_args = (latent_gaussian, layout, inner, quadratic)
        self._laplace = None
        if check:
            self.laplace  # a user's template: pattern problems surface here, at once
        self.agq = None
        if nagq != 1 or groups is not None:
            # adaptive Gauss-Hermite quadrature over conditionally independent blocks
            from ._agq import AGQ

            self.agq = AGQ(self, nagq, groups, latent_gaussian=latent_gaussian)
        self._u_last = u0
        self._compile()

    # ------------------------------------------------------------------ setup
    @property
    def laplace(self) -> Laplace | None:
        """The Laplace machinery (inner Newton, sparse Hessian, implicit gradient);
        None for a template without random effects."""
        if self._laplace is None and self.space.n_u:
            if _tracing():
                # first use inside a jit trace (e.g. the profile of a linear mixed model
                # fitted by least squares): the sparsity detection must trace the template
                # on its own, so it runs on a fresh thread, whose trace state is clean
                box = {}

                def build():
                    try:
                        box["laplace"] = self._build_laplace()
                    except BaseException as e:  # noqa: BLE001 - re-raised below
                        box["error"] = e

                worker = threading.Thread(target=build)
                worker.start()
                worker.join()
                if "error" in box:
                    raise box["error"]
                self._laplace = box["laplace"]
            else:
                self._laplace = self._build_laplace()
        return self._laplace

    def _build_laplace(self):
        lg, layout, inner, quadratic = self._laplace_args
        space = self.space
        x0 = to_device(space.start("x"))
        u0 = to_device(space.start("u"))
        if lg is not None:
            hess = LatentGaussianHessian(
                lambda x, u, d: lg.eta(space.unflatten(x, u), d),
                lambda e, x, u, d: lg.obs_nll(e, space.unflatten(x, u), d),
                lambda x, u, d: lg.latent_nll(space.unflatten(x, u), d),
                x0, u0, self.data, layout_kind=layout, jacobian=lg.jacobian, solver=self.solver,
                latent_diagonal=lg.latent_diagonal,
                jacobian_values=None if lg.jacobian_values is None else (
                    lambda x, u, d: lg.jacobian_values(space.unflatten(x, u), d)),
            )
        else:
            # the pattern and its colouring, kept under the template's key (`ColoredHessian`)
            key = self._program_key
            stored = read_object(key, "coloring")
            hess = ColoredHessian(self.f, x0, u0, self.data, layout_kind=layout, solver=self.solver,
                                  stored=stored)
            if stored is None and key is not None:
                write_object(key, "coloring", hess.record())
        return Laplace(self.f, hess, space.n_u, inner, quadratic=quadratic)

    def _check_template(self, x0, u0):
        try:
            out = jax.eval_shape(self.f, x0, u0, self.data)
        except Exception as e:  # shape errors in the user's template
            raise ValueError(f"The template failed on the start values: {type(e).__name__}: {e}") from e
        if out.shape != ():
            raise ValueError(
                f"The template must return a scalar negative log-likelihood; it returned shape "
                f"{out.shape}. Sum the per-observation terms (jnp.sum(...))."
            )
        val = float(jax.jit(self.f)(x0, u0, self.data))
        if not np.isfinite(val):
            raise ValueError(
                f"The template's nll is {val} at the start values. Choose start values inside the "
                "parameters' support (e.g. log-scale sds at 0, not sds at 0) and check the template "
                "for log(0) or exp overflow."
            )

    def _objective(self, x, u0, d):
        # an inner jit, for the value alone (`fn`, sampling, checks): programs that
        # also need the gradient go through `_objective_vg`, which is traced once
        # with its derivative
        if getattr(self, "_objective_jit", None) is None:
            self._objective_jit = jax.jit(self._objective_impl)
        return self._objective_jit(x, u0, d)

    def _objective_vg(self, x, u0, d):
        """``((value, (u*, status)), gradient in x)`` of the objective, through an
        inner jit of the value *and* gradient: programs that need both (fits,
        profiles, bootstraps) share one traced jaxpr from JAX's caches. (Jitting
        the objective alone and differentiating outside made JAX trace the Laplace
        marginal twice, its plain body and then its derivative rule: 0.3-0.4 s of
        a first fit of owls_zinb1, thrown away.)"""
        if getattr(self, "_objective_vg_jit", None) is None:
            self._objective_vg_jit = jax.jit(jax.value_and_grad(self._objective_impl, has_aux=True))
        return self._objective_vg_jit(x, u0, d)

    def _objective_impl(self, x, u0, d):
        if self.agq is not None:
            return self.agq.objective(x, u0, d)
        if self.laplace is None:
            return self.f(x, u0, d), (u0, jnp.asarray(INNER_OK))
        return self.laplace.objective(x, u0, d)

    def _compile(self):
        def vg(x, u0, d):
            (val, (u, status)), g = self._objective_vg(x, u0, d)
            bad = status != INNER_OK
            val = jnp.where(bad, jnp.inf, val)
            return val, g, u

        self._vg = vg
        jit = self.jit
        self._value = jit(lambda x, u0, d: self._objective(x, u0, d))
        self._value_grad = jit(vg)
        grad = lambda x, u0, d: vg(x, u0, d)[1]
        self._hess = jit(jax.jacfwd(grad))
        self._fit_program = self._fit_batch_program = None

    @property
    def _fit_core(self):
        """The compiled fit ``(x0, u0, data) -> result dict``. Built on first use:
        its compiler options depend on the latent Hessian's layout
        (`fit_options`), which is built on first use too."""
        if self._fit_program is None:
            # a small model's fit compiles quickly first and optimized later (`tmbx._tiered`)
            fast, opts = self._compiler_options, self.fit_options()
            fit = ProgramCache(self._fit_impl, lambda: self._program_key, opts, name="fit",
                               tiered=fast or None)
            self._fit_program = TieredJit(fit, fast) if fast else fit
        return self._fit_program

    @property
    def _fit_batch(self):
        if self._fit_batch_program is None:
            # batches run long enough that XLA's full optimization pays for itself
            self._fit_batch_program = jax.jit(jax.vmap(self._fit_impl, in_axes=(None, None, 0)),
                                              compiler_options=self.fit_options())
        return self._fit_batch_program

    def fit_options(self):
        """``compiler_options`` of the programs that run this model's Laplace fit
        (its own, batched ones, bootstraps, profiles) beyond `jit`'s: see
        `tmbx._config.fit_compile_options` (None: XLA's defaults)."""
        if not hasattr(self, "_fit_opts"):
            # (no Laplace layout: no random effects, or quadrature: XLA's defaults)
            lap = self.laplace if self.agq is None else None
            self._fit_opts = None if lap is None else fit_compile_options(lap.layout.dense_order)
        return self._fit_opts

    def jit(self, fn, program: str | None = None, compiler_options="model"):
        """`jax.jit` with this model's compiler options (`tmbx._config.compile_options`:
        small models compile faster at XLA's optimization level 0) or the given
        ones; with a ``program`` name, its traced program is kept on disk under the
        model's `_program_key` (`tmbx._programs.ProgramCache`)."""
        if not hasattr(self, "_compiler_options"):
            self._compiler_options = compile_options(self.data, self.space.n_u)
        opts = self._compiler_options if compiler_options == "model" else compiler_options
        if program is not None:
            return ProgramCache(fn, lambda: self._program_key, opts, name=program)
        return jax.jit(fn, compiler_options=opts)

    #: the mode predictor (`_vg_predict`) pays one solve with a column per fixed
    #: parameter each evaluation; beyond this many it costs more than it saves
    PREDICT_MAX_X = 8

    def _predicts(self, n_x):
        # not for small models (`compile_options`): their first fit is mostly
        # tracing, which the predictor's derivative lengthens by 0.5-1 s (owls_zinb1,
        # salamanders_zinb2), while their runs take a tenth of a second anyway
        lap = self.laplace
        return (lap is not None and self.agq is None and not lap.quadratic
                and self._large and 0 < n_x <= self.PREDICT_MAX_X)

    def _objective_jac_vg(self, x, u0, d):
        """`_objective_vg` of `Laplace.objective_with_jac` (the mode's Jacobian as
        a by-product), jitted with its gradient for the same reason."""
        if getattr(self, "_objective_jac_jit", None) is None:
            self._objective_jac_jit = jax.jit(jax.value_and_grad(self.laplace.objective_with_jac, has_aux=True))
        return self._objective_jac_jit(x, u0, d)

    def _vg_predict(self, x, aux, d):
        """`_vg` with a warm start predicted to first order: ``aux = (u*, x_u, J)``
        from the last accepted point, the inner solve starts at ``u* + J (x - x_u)``
        (or at ``u*`` if that is no better), and returns this point's triple.
        Near the optimum (line searches, the finite-difference Hessian) the
        predicted mode is within ``O(|dx|^2)`` and one Newton step confirms it."""
        u_prev, x_prev, J = aux
        f = self.laplace.f
        u_lin = u_prev + J @ (x - x_prev)
        f_lin, f_prev = f(x, u_lin, d), f(x, u_prev, d)
        u0 = jnp.where(jnp.isfinite(f_lin) & (f_lin <= f_prev), u_lin, u_prev)
        (val, (u, status, J_new)), g = self._objective_jac_vg(x, u0, d)
        val = jnp.where(status != INNER_OK, jnp.inf, val)
        return val, g, (u, x, J_new)

    def _gauss_newton_start(self) -> bool:
        """Whether a fit that predicts the mode starts BFGS from `_gauss_newton`'s
        diagonal (``BFGSOptions.gauss_newton_start``; by default for a template
        declared latent-Gaussian)."""
        choice = self.options.gauss_newton_start
        return self._laplace_args[0] is not None if choice is None else bool(choice)

    def _gauss_newton(self, x, aux, d):
        """The marginal's Hessian in ``x`` without the log-determinant's share:
        ``f_xx + f_xu du*/dx`` at the mode (the Hessian of the joint nll with ``u``
        profiled out), from the evaluation's ``aux = (u*, x, J)``. Close on the
        fixed effects, only a scale on the variance parameters; it starts BFGS
        with the right scales instead of the identity (`bfgs` ``curvature``), for
        ``2 n_x`` passes over the data."""
        u, _, J = aux
        gx = lambda xx, uu: jax.grad(self.laplace.f, argnums=0)(xx, uu, d)
        _, cols = jax.linearize(lambda xx, t: gx(xx, u + J @ t), x, jnp.zeros_like(x))
        eye = jnp.eye(x.shape[0], dtype=x.dtype)
        return jax.vmap(lambda e: cols(e, e))(eye)

    @property
    def _large(self) -> bool:
        """Compiled as a large model (XLA's full optimization, `compile_options`):
        every evaluation is a pass over much data or sparse factorizations."""
        return not self._compiler_options

    def _outer_options(self):
        """The optimizer's settings for this model's cost (`outer_options`)."""
        lap = self.laplace
        return outer_options(self.options, iterative=lap is not None and lap.layout.iterative is not None,
                             large=self._large)

    def _prepare_data(self, d):
        """``d`` with `LatentGaussian.prepare`'s data-only terms computed from its
        response (the template's ``prepare``; ``d`` unchanged without one)."""
        lg = self._laplace_args[0]
        if lg is None or lg.prepare is None or not isinstance(d, dict):
            return d
        return lg.prepare(d)

    def _fit_impl(self, x0, u0, d):
        d = self._prepare_data(d)
        if self._predicts(x0.shape[0]):
            aux0 = (u0, x0, jnp.zeros((u0.shape[0], x0.shape[0]), u0.dtype))
            res = bfgs(self._vg_predict, x0, aux0, d, self._outer_options(),
                       curvature=self._gauss_newton if self._gauss_newton_start() else None)
            u = res["aux"][0]
        else:
            res = bfgs(self._vg, x0, u0, d, self._outer_options())
            u = res["aux"]
        return dict(x=res["x"], u=u, f=res["f"], g=res["g"], status=res["status"],
                    iterations=res["iterations"], hessian=res["hessian"])

    # ------------------------------------------------------------- TMB-like
    @property
    def par(self) -> np.ndarray:
        """Start values of the free fixed parameters (TMB's ``obj$par``)."""
        return self.space.start("x")

    def fn(self, x=None) -> float:
        """Laplace marginal nll at the fixed-parameter vector ``x`` (TMB's ``obj$fn``)."""
        x = self.par if x is None else x
        val, (u, status) = self._value(to_device(x, np.float64), self._u_last, self.data)
        if int(status) != INNER_OK:
            warnings.warn(INNER_MESSAGES[int(status)], RuntimeWarning, stacklevel=2)
        else:
            self._u_last = u
        return float(val)

    def gr(self, x=None) -> np.ndarray:
        """Exact gradient of `fn` (TMB's ``obj$gr``)."""
        x = self.par if x is None else x
        val, g, u = self._value_grad(to_device(x, np.float64), self._u_last, self.data)
        if np.isfinite(float(val)):
            self._u_last = u
        return np.asarray(g)

    def he(self, x=None) -> np.ndarray:
        """Exact Hessian of `fn` (by differentiating the implicit gradient)."""
        x = self.par if x is None else x
        return np.asarray(self._hess(to_device(x, np.float64), self._u_last, self.data))

    # ---------------------------------------------------------------- fitting
    @gc_deferred
    def fit(self, start: dict | None = None) -> "Fit":
        """Maximize the Laplace marginal likelihood; returns a `Fit`."""
        x0, u0 = self._starts(start)
        res = self.run_fit(x0, u0, self.data)
        fit = Fit(self, self.data, res)
        fit._warn()
        return fit

    def run_fit(self, x0, u0, data) -> dict:
        """The compiled fit from ``(x0, u0)`` on ``data`` (the model's or a new
        response's), results as NumPy. The Laplace machinery's large index arrays
        go in as arguments (`tmbx._laplace.Laplace.index_data`), not as constants
        of the program; not where the data are sharded over devices."""
        lap = self.laplace if self.agq is None else None  # (quadrature reads the template's data)
        if lap is not None and isinstance(data, dict) and not any(map(sharded, jax.tree_util.tree_leaves(data))):
            idx = lap.index_data()
            if idx:
                data = dict(data, **{INDEX_KEY: idx})
        return jax.tree_util.tree_map(np.asarray, self._fit_core(x0, u0, data))

    def _starts(self, start):
        if start is None:
            return to_device(self.space.start("x")), to_device(self.space.start("u"))
        unknown = [k for k in start if k not in self.space.names]
        if unknown:
            raise ValueError(f"start names {unknown} are not parameters ({self.space.names})")
        p = {k: self.space.starts[k].reshape(self.space.shapes[k]) for k in self.space.names}
        p.update({k: np.asarray(v, np.float64) for k, v in start.items()})
        return to_device(self.space.flatten(p, "x")), to_device(self.space.flatten(p, "u"))

    def fit_batch(self, data, start: dict | None = None) -> "BatchFit":
        """Fit the model to a batch of data sets stacked on a leading axis (one `vmap`)."""
        data = _as_data(data)
        x0, u0 = self._starts(start)
        res = jax.tree_util.tree_map(np.asarray, self._fit_batch(x0, u0, data))
        return BatchFit(self, data, res)

    # ------------------------------------------------------------- simulate
    def simulate(self, nsim: int | None = None, seed: int = 0, par: dict | None = None):
        """Simulate data sets from the template's ``simulate(p, d, key)``.

        ``par``: parameters to simulate at (default: the start values, or a
        fit's estimates via ``fit.simulate``). Returns the data pytree, with a
        leading axis of length ``nsim`` when ``nsim`` is given.
        """
        if self.simulate_fn is None:
            raise ValueError(
                "This model has no simulate function; pass simulate=lambda p, d, key: new_data "
                "to tmbx.Model (TMB's SIMULATE block)."
            )
        p = {k: self.space.starts[k].reshape(self.space.shapes[k]) for k in self.space.names}
        if par is not None:
            p.update({k: np.asarray(v, np.float64) for k, v in par.items()})
        p = jax.tree_util.tree_map(jnp.asarray, p)
        key = jax.random.PRNGKey(seed)
        if nsim is None:
            return self.simulate_fn(p, self.data, key)
        if nsim < 1:
            raise ValueError(f"nsim must be at least 1, got {nsim}")
        keys = jax.random.split(key, nsim)
        return jax.jit(jax.vmap(lambda k: self.simulate_fn(p, self.data, k)))(keys)


class Fit:
    """Result of `Model.fit`: estimates, log-likelihood, convergence, `sdreport`."""

    def __init__(self, model: Model, data, res: dict):
        self.model = model
        self.data = data
        self.x = np.asarray(res["x"])
        self.u = np.asarray(res["u"])
        self.objective = float(res["f"])
        self.gradient = np.asarray(res["g"])
        self.status = int(res["status"])
        self.iterations = int(res["iterations"])
        H = np.asarray(res.get("hessian", np.zeros((0, 0))))
        # the optimizer's finite-difference Hessian of the exact gradient (TMB's optimHess)
        self._hessian = H if (H.size and np.any(H != 0)) else None

    @property
    def loglik(self) -> float:
        """Maximized Laplace log-likelihood (``-objective``)."""
        return -self.objective

    @property
    def par(self) -> dict:
        """Fixed parameters at the optimum: name -> numpy array (held elements at start)."""
        sp = self.model.space
        p = sp.unflatten(np.asarray(self.x, float), np.asarray(self.u, float))
        return {k: np.asarray(p[k]) for k in sp.fixed}

    @property
    def par_random(self) -> dict:
        """Conditional modes of the random effects at the optimum."""
        sp = self.model.space
        p = sp.unflatten(np.asarray(self.x, float), np.asarray(self.u, float))
        return {k: np.asarray(p[k]) for k in sp.random}

    @property
    def converged(self) -> bool:
        return self.status == 0 and self.pd_hessian and np.isfinite(self.objective)

    @property
    def hessian(self) -> np.ndarray:
        """Hessian of the marginal nll at the optimum (differences of the exact gradient)."""
        if self._hessian is None:
            self._hessian = self.exact_hessian()
        return self._hessian

    def exact_hessian(self) -> np.ndarray:
        """Hessian of the marginal nll by automatic differentiation (slower to compile)."""
        m = self.model
        return np.asarray(m._hess(to_device(self.x), to_device(self.u), self.data))

    @property
    def pd_hessian(self) -> bool:
        if self.x.size == 0:
            return True
        H = self.hessian
        if not np.all(np.isfinite(H)):
            return False
        return bool(np.linalg.eigvalsh(0.5 * (H + H.T)).min() > 0)

    @property
    def message(self) -> str:
        if not np.isfinite(self.objective):
            return OUTER_MESSAGES[3]
        if self.status != 0:
            return OUTER_MESSAGES[self.status]
        if not self.pd_hessian:
            return (
                "the optimizer converged but the Hessian of the marginal nll is not positive "
                "definite: some parameter is not identified or sits on a boundary (a variance "
                "near zero, a correlation near +/-1); simplify the model or fix that parameter"
            )
        if self._iterative_layout() is not None:
            return ("converged: a quasi-Newton step would gain less than the linear-cost path's "
                    "estimation noise (solver='iterative'; see loglik_mc_se)")
        return OUTER_MESSAGES[0]

    def _iterative_layout(self):
        """The layout of the linear-cost path this fit ran on, or None."""
        lmm = getattr(self, "_lmm", None)
        lap = self.model._laplace  # not built here when the fit never used it (AGQ)
        layout = lmm.layout if lmm is not None else (lap.layout if lap is not None else None)
        return layout if layout is not None and layout.iterative is not None else None

    @property
    def loglik_mc_se(self) -> float:
        """The Monte Carlo standard error of `loglik` on the linear-cost path
        (``solver="iterative"``: a stochastic estimate of ``log det H``), 0 for
        the exact path."""
        layout = self._iterative_layout()
        if layout is None:
            return 0.0
        lmm = getattr(self, "_lmm", None)
        # compiled once per model (refits and bootstraps ask again)
        owner = lmm if lmm is not None else self.model
        fn = getattr(owner, "_mc_se_jit", None)
        if lmm is not None:
            if fn is None:
                def se_lmm(z, D):
                    nth = z.shape[0] - 1
                    return lmm._layout(D).factor(lmm._H(lmm._T(z[:nth]), z[nth], D)).logdet_mc_se()

                fn = owner._mc_se_jit = jax.jit(se_lmm)
            se = fn(lmm._z_of_x(self.x), lmm.data)
        else:
            if fn is None:
                lap = self.model._laplace
                fn = owner._mc_se_jit = jax.jit(lambda x, u, d: layout.factor(lap.flat(x, u, d)).logdet_mc_se())
            se = fn(to_device(self.x), to_device(self.u), self.data)
        return 0.5 * float(se)

    def _warn(self):
        if not self.converged:
            warnings.warn(f"Model did not converge: {self.message}", RuntimeWarning, stacklevel=3)
        se = self.loglik_mc_se
        if se > ITERATIVE_SE_WARN:
            warnings.warn(
                f"The linear-cost path's log-likelihood carries a Monte Carlo standard error of {se:.3g} "
                f"(probe estimates of log det H, on random effects this strongly coupled); its error "
                f"falls as 1/sqrt(probes): raise tmbx.IterativeOptions(probes=...), or use solver='exact' "
                f"where the exact factorization fits in time and memory.", RuntimeWarning, stacklevel=3)

    def sdreport(self, joint_precision: bool = False, bias_correct: bool = False) -> "SDReport":
        """TMB's ``sdreport``; ``bias_correct``: epsilon-method bias correction of the random
        effects and reported quantities (``par_random_bc``, ``report_value_bc``)."""
        from ._sdreport import SDReport

        return SDReport(self, joint_precision=joint_precision, bias_correct=bias_correct)

    def check_consistency(self, nsim: int = 100, seed: int = 0, estimate: bool = True):
        """TMB's ``checkConsistency``: is the mean score zero on data simulated at the estimates?"""
        from ._consistency import check_consistency

        return check_consistency(self, nsim=nsim, seed=seed, estimate=estimate)

    def one_step_predict(self, observation_name: str = "y", method: str = "fullGaussian", **kwargs):
        """TMB's ``oneStepPredict``: one-step-ahead (OSA) residuals of the observations."""
        from ._consistency import one_step_predict

        return one_step_predict(self, observation_name=observation_name, method=method, **kwargs)

    def sample(self, num_samples: int = 1000, num_chains: int = 4, seed: int = 0, laplace: bool = False,
               **kwargs):
        """NUTS on the template's posterior (latent effects too, or with ``laplace=True``
        on the fixed parameters of the Laplace marginal, tmbstan's option)."""
        from ._sampling import sample_template

        return sample_template(self, num_samples=num_samples, num_chains=num_chains, seed=seed,
                               laplace=laplace, **kwargs)

    def simulate(self, nsim: int | None = None, seed: int = 0):
        """Simulate from the template at the estimates (fixed and random)."""
        p = dict(self.par)
        p.update(self.par_random)
        return self.model.simulate(nsim=nsim, seed=seed, par=p)

    def __repr__(self):
        return (f"Fit(loglik={self.loglik:.6f}, converged={self.converged}, "
                f"iterations={self.iterations})")


class BatchFit:
    """Results of `Model.fit_batch`: per-member arrays; ``fits[i]`` is member i's `Fit`."""

    def __init__(self, model: Model, data, res: dict):
        self.model = model
        self.data = data
        self.res = res
        self.x = np.asarray(res["x"])
        self.loglik = -np.asarray(res["f"])
        self.status = np.asarray(res["status"])

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i) -> Fit:
        d = jax.tree_util.tree_map(lambda a: a[i], self.data)
        return Fit(self.model, d, {k: v[i] for k, v in self.res.items()})

    @property
    def converged(self) -> np.ndarray:
        return (self.status == 0) & np.isfinite(self.loglik)

    def table(self, **kwargs):
        """One row per member: converged, message, loglik, estimates, ses, p-values."""
        from .batch._table import template_table

        return template_table(self, **kwargs)

    @property
    def par(self) -> dict:
        sp = self.model.space
        out = {k: [] for k in sp.fixed}
        for i in range(len(self)):
            p = sp.unflatten(jnp.asarray(self.x[i]), jnp.zeros(sp.n_u))
            for k in sp.fixed:
                out[k].append(np.asarray(p[k]))
        return {k: np.stack(v) for k, v in out.items()}
