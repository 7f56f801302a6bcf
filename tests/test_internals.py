"""Small shared helpers: host-to-device conversion, sorted unique keys, and the
compiler options chosen per model size."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import tmbx
from tmbx._config import FAST_COMPILE, _known, compile_options, lmm_compile_options
from tmbx._internal import eval_method, to_device, unique_sorted


def test_unique_sorted_matches_numpy_unique():
    rng = np.random.default_rng(0)
    for x in (rng.integers(0, 50, 1000), rng.integers(0, 2**40, 5000), np.array([], np.int64),
              np.array([7]), rng.normal(size=100).round(1)):
        np.testing.assert_array_equal(unique_sorted(x), np.unique(x))


def test_block_upper_pairs_enumerates_each_blocks_upper_triangle():
    from tmbx._sparse import _block_upper_pairs

    nvalid = np.random.default_rng(3).integers(0, 6, 200)
    want = [(b, i, j) for b, n in enumerate(nvalid) for i in range(n) for j in range(i, n)]
    got = list(zip(*(a.tolist() for a in _block_upper_pairs(nvalid))))
    assert got == want


def test_to_device_keeps_values_and_dtypes():
    cases = [(np.arange(5), None, jnp.int64), (np.arange(5), np.int32, jnp.int32),
             (np.ones((2, 3)), None, jnp.float64), ([1.5, 2.5], np.float64, jnp.float64),
             (np.array([True, False]), None, jnp.bool_)]
    for a, dtype, want in cases:
        out = to_device(a, dtype)
        assert isinstance(out, jax.Array) and out.dtype == want
        np.testing.assert_array_equal(np.asarray(out), np.asarray(a))
    # JAX arrays and tracers pass through jnp.asarray (inside a trace too)
    assert to_device(jnp.ones(3), np.int32).dtype == jnp.int32
    assert float(jax.jit(lambda v: jnp.sum(to_device(v) * 2))(jnp.ones(3))) == 6.0


def test_eval_method_matches_eager():
    """A structure's method through `eval_method` equals its eager value (NumPy out)."""
    from tmbx.covstructs import corr_to_theta, get

    us = get("us", dim=3)
    sd = np.array([0.5, 1.5, 2.0])
    corr = np.array([[1.0, 0.3, -0.2], [0.3, 1.0, 0.4], [-0.2, 0.4, 1.0]])
    theta = np.concatenate([np.log(sd), corr_to_theta(corr)])  # glmmTMB's put_cor
    out = eval_method(us, "cov", theta)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, sd[:, None] * corr * sd[None, :], rtol=1e-12)
    fam = tmbx.families.Gamma(link="log")
    assert float(eval_method(fam.link, "__call__", 2.0)) == pytest.approx(np.log(2.0), rel=1e-15)


class _Counted(eqx.Module):
    """A module with a plain int field (static, as a user's structure may keep
    its order) whose method counts its traces."""

    dim: int
    scale: jax.Array

    def scaled_eye(self, x):
        _TRACES.append(self.dim)
        return self.scale * x * jnp.eye(self.dim)


_TRACES = []


def test_eval_method_traces_once_per_type_method_and_shapes():
    # new array values and new Python numbers reuse the program; a new value of
    # a static field is a new program
    _TRACES.clear()
    out = eval_method(_Counted(3, jnp.asarray(2.0)), "scaled_eye", 1.5)
    np.testing.assert_array_equal(out, 3.0 * np.eye(3))
    out = eval_method(_Counted(3, jnp.asarray(4.0)), "scaled_eye", 0.5)
    np.testing.assert_array_equal(out, 2.0 * np.eye(3))
    assert _TRACES == [3]
    eval_method(_Counted(2, jnp.asarray(1.0)), "scaled_eye", 1.0)
    assert _TRACES == [3, 2]


def test_compile_options_by_model_size(monkeypatch):
    monkeypatch.delenv("TMBX_FAST_COMPILE", raising=False)
    assert compile_options({"y": np.zeros(100)}, 10) == FAST_COMPILE
    assert compile_options({"y": np.zeros(10**6)}, 10) is None
    assert compile_options({"y": np.zeros(100)}, 10**5) is None
    monkeypatch.setenv("TMBX_FAST_COMPILE", "0")
    assert compile_options({"y": np.zeros(100)}, 10) is None
    monkeypatch.setenv("TMBX_FAST_COMPILE", "1")
    assert compile_options({"y": np.zeros(10**6)}, 10**5) == FAST_COMPILE


def test_compile_options_unknown_to_this_xla_are_dropped():
    # (an option XLA does not know fails every compile with it)
    assert _known({"xla_backend_optimization_level": 0, "xla_tmbx_no_such_option": False}) == {
        "xla_backend_optimization_level": 0}


def test_compile_options_probed_together_then_one_by_one(monkeypatch):
    # tmbx's own options are probed in one compile; where that fails (an option
    # a later XLA dropped) each is probed alone and the known ones are kept
    from tmbx import _config

    bogus = {"xla_tmbx_no_such_option": False}
    monkeypatch.setattr(_config, "_every_option", lambda: {**FAST_COMPILE, **bogus})
    _config._all_known.cache_clear()
    try:
        assert _config._known({**FAST_COMPILE, **bogus}) == FAST_COMPILE
        assert not _config._all_known()
    finally:
        monkeypatch.undo()
        _config._all_known.cache_clear()
    assert _config._all_known()  # this jaxlib knows every option tmbx uses


def test_lmm_compile_options_by_data_size(monkeypatch):
    monkeypatch.delenv("TMBX_FAST_COMPILE", raising=False)
    assert lmm_compile_options({"y": np.zeros(100)}, 10) == FAST_COMPILE
    assert lmm_compile_options({"y": np.zeros(10**6)}, 10**5) == {"xla_cpu_use_fusion_emitters": False}
    assert lmm_compile_options({"y": np.zeros(10**7)}, 10**5) is None
    monkeypatch.setenv("TMBX_FAST_COMPILE", "0")
    assert lmm_compile_options({"y": np.zeros(10**6)}, 10**5) is None


@pytest.mark.parametrize("fast", ["0", "1"])
def test_a_fit_is_the_same_at_either_optimization_level(fast, monkeypatch):
    """XLA's optimization level changes compile time and speed, never the answer."""
    monkeypatch.setenv("TMBX_FAST_COMPILE", fast)
    fit = tmbx.glmm("cbind(incidence, size - incidence) ~ period + (1|herd)",
                    data=tmbx.load_dataset("cbpp"), family="binomial")
    assert fit.loglik == pytest.approx(-92.02628, abs=1e-4)  # glmmTMB 1.1.5 (cases/cbpp_binomial)


@pytest.mark.parametrize("formula, kw", [
    ("count ~ spp + mined + (1|site)", dict(family="nbinom2", ziformula="~mined + (1|site)")),
    ("count ~ mined + (1 + mined|site) + (1|spp)", dict(family="poisson", reml=True)),
])
def test_formula_latent_hessian_is_diagonal_as_declared(formula, kw):
    """Formula models declare their latent Hessian diagonal (spherical random
    effects) and skip asdex's detection: the detected pattern must agree, and so
    must the values."""
    import asdex

    from tmbx.formula._design import build_design
    from tmbx.formula._template import build_template, resolve_family

    df = tmbx.load_dataset("salamanders")
    fam = kw.pop("family")
    design = build_design(formula, df, ziformula=kw.pop("ziformula", None))
    template = build_template(design, resolve_family(fam, "zi" in design.components), **kw)
    model = template.model
    lat = model.laplace.hessian.lat
    sp = model.space
    x0, u0 = jnp.asarray(sp.start("x")), jnp.asarray(sp.start("u")) + 0.1
    g = lambda u: model._laplace_args[0].latent_nll(sp.unflatten(x0, u), model.data)
    detected = asdex.hessian_sparsity(g, u0)
    rows, cols = np.asarray(detected.rows), np.asarray(detected.cols)
    assert np.all(rows == cols)
    full = np.asarray(jax.hessian(g)(u0))
    np.testing.assert_allclose(np.asarray(lat(x0, u0, model.data)), np.diagonal(full), atol=1e-12)
    assert np.count_nonzero(full - np.diag(np.diagonal(full))) == 0


def test_batched_like_keeps_values_and_batches_every_carry():
    from tmbx._internal import batched_like

    tree = dict(i=jnp.asarray(3), b=jnp.asarray(False), f=jnp.asarray(2.5), v=jnp.arange(3.0))
    out = batched_like(tree, jnp.asarray([np.nan, 1.0]))  # NaN in the reference changes nothing
    for k, leaf in tree.items():
        assert out[k].dtype == leaf.dtype
        np.testing.assert_array_equal(out[k], leaf)
    # under vmap every leaf comes out batched (a leading axis of the batch size)
    outs = jax.vmap(lambda r: batched_like(tree, r))(jnp.ones((4, 2)))
    assert all(leaf.shape[:1] == (4,) for leaf in jax.tree_util.tree_leaves(outs))


def _quadratic(seed):
    """A 4-parameter quadratic ``x'Hx/2 - b'x`` for `bfgs`: ``(vg, data, H, x*)``."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(4, 4))
    H = A @ A.T + 4 * np.eye(4)
    b = rng.normal(size=4)

    def vg(x, aux, data):
        Hd, bd = data
        return 0.5 * x @ Hd @ x - bd @ x, Hd @ x - bd, aux

    return vg, (jnp.asarray(H), jnp.asarray(b)), H, np.linalg.solve(H, b)


def test_bfgs_inverse_hessian_start_takes_newton_steps():
    """On a quadratic, starting from the true inverse Hessian the first step is the
    Newton step: the optimum after two evaluations; from the identity it takes more.
    Both reach the closed-form minimizer."""
    from tmbx._optim import BFGSOptions, bfgs

    vg, data, H, x_star = _quadratic(0)
    opts = BFGSOptions(polish=False, max_step=100.0)
    plain = bfgs(vg, jnp.zeros(4), jnp.zeros(1), data, opts)
    newton = bfgs(vg, jnp.zeros(4), jnp.zeros(1), data, opts, hinv0=jnp.asarray(np.linalg.inv(H)))
    for res in (plain, newton):
        assert int(res["status"]) == 0
        np.testing.assert_allclose(res["x"], x_star, rtol=1e-7, atol=1e-8)
    assert int(newton["iterations"]) == 2
    assert int(plain["iterations"]) > 3


def test_polish_is_evaluated_only_when_it_can_gain():
    """After the search converges, the finite-difference Hessian's Newton step is
    evaluated only when it predicts a gain above ``polish_skip`` (relative to
    |f|). On a quadratic started from its inverse Hessian the search lands on the
    minimizer: the polish is skipped (2 + 4 forward-difference evaluations) and
    the result is the search's point and the Hessian; with the skip off it costs
    one evaluation more and gives the same answer. After a search stopped early
    (``gtol`` 1e-3) the step gains far above the threshold and is taken."""
    from tmbx._optim import BFGSOptions, bfgs

    vg, data, H, x_star = _quadratic(1)
    hinv = jnp.asarray(np.linalg.inv(H))
    runs = {}
    for skip in (1e-14, 0.0):
        opts = BFGSOptions(max_step=100.0, fd_forward=True, polish_skip=skip)
        runs[skip] = bfgs(vg, jnp.zeros(4), jnp.zeros(1), data, opts, hinv0=hinv)
    assert int(runs[1e-14]["iterations"]) == 2 + 4 and int(runs[0.0]["iterations"]) == 2 + 4 + 1
    for res in runs.values():
        assert int(res["status"]) == 0
        np.testing.assert_allclose(res["x"], x_star, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(res["hessian"], H, rtol=1e-6)
    # a search stopped early (loose gtol) leaves a step worth taking
    loose = BFGSOptions(max_step=100.0, fd_forward=True, gtol=1e-3)
    res = bfgs(vg, jnp.zeros(4), jnp.zeros(1), data, loose)
    early = bfgs(vg, jnp.zeros(4), jnp.zeros(1), data, BFGSOptions(max_step=100.0, fd_forward=True, gtol=1e-3,
                                                                     polish=False))
    assert int(res["iterations"]) == int(early["iterations"]) + 4 + 1
    assert np.max(np.abs(np.asarray(res["g"]))) < np.max(np.abs(np.asarray(early["g"])))


def _logcosh(seed):
    """``sum w_i log cosh(x_i - c_i) + (x'Ax)/2`` (smooth, strictly convex, not
    quadratic; Newton steps overshoot where ``|x_i - c_i|`` > 1): ``(vg, data,
    hessian(x), x*)`` with ``x*`` solved by Newton's method in NumPy."""
    rng = np.random.default_rng(seed)
    c, w = rng.normal(size=3), rng.uniform(1.0, 3.0, size=3)
    B = rng.normal(size=(3, 3))
    A = 0.1 * B @ B.T

    def vg(x, aux, data):
        cc, ww, AA = data
        r = x - cc
        f = jnp.sum(ww * (jnp.logaddexp(r, -r) - jnp.log(2.0))) + 0.5 * x @ AA @ x
        return f, ww * jnp.tanh(r) + AA @ x, aux

    def hess(x):
        return np.diag(w / np.cosh(x - c) ** 2) + A

    x = c.copy()
    for _ in range(50):
        x = x - np.linalg.solve(hess(x), w * np.tanh(x - c) + A @ x)
    return vg, (jnp.asarray(c), jnp.asarray(w), jnp.asarray(A)), hess, x


def test_early_hessian_switch_saves_evaluations_and_keeps_the_answer():
    """``early_hessian``: once the next quasi-Newton step would gain little, the
    search goes to the finite-difference Hessian and its Newton step, which
    converges from there. Against the search run until the gradient vanishes
    (``early_hessian=0``): fewer evaluations, the same minimizer (the Newton
    iteration's in NumPy, to the 1e-7 that a gradient zero to ``gtol`` 1e-8
    leaves) and the same Hessian (the analytic one at the minimizer, 1e-5)."""
    from tmbx._optim import BFGSOptions, bfgs

    vg, data, hess, x_star = _logcosh(2)
    runs = {}
    for early in (0.0, 1e-9):
        opts = BFGSOptions(max_step=100.0, fd_forward=True, fd_step=1e-6, early_hessian=early)
        runs[early] = bfgs(vg, jnp.zeros(3), jnp.zeros(1), data, opts)
    for res in runs.values():
        assert int(res["status"]) == 0
        np.testing.assert_allclose(res["x"], x_star, rtol=0, atol=1e-7)
        assert np.max(np.abs(np.asarray(res["g"]))) <= 1e-8 * max(1.0, abs(float(res["f"])))
        np.testing.assert_allclose(res["hessian"], hess(x_star), rtol=1e-5, atol=1e-6)
    assert int(runs[1e-9]["iterations"]) < int(runs[0.0]["iterations"])


def test_early_hessian_switch_resumes_the_search_where_newton_fails():
    """A switch far from the minimizer (``early_hessian`` 1e3: at the first
    accepted step), where the Newton step on the finite-difference Hessian
    overshoots (log cosh's curvature vanishes away from its centre): the search
    resumes from the better point and still finds the minimizer, with status OK
    and the Hessian of the minimizer (its final polish); stopped by its budget
    after resuming, it does not report convergence. Where the Newton trial
    improves without converging, the search resumes with the differenced
    Hessian as its metric."""
    from tmbx._optim import OUTER_MAXITER, BFGSOptions, bfgs

    vg, data, hess, x_star = _logcosh(3)
    trials = []

    def logged(x, aux, d):
        f, g, a = vg(x, aux, d)
        jax.debug.callback(lambda v: trials.append(float(v)), f)
        return f, g, a

    x0 = jnp.asarray(x_star) + 3.0
    opts = BFGSOptions(max_step=100.0, fd_forward=True, fd_step=1e-6, early_hessian=1e3)
    res = bfgs(logged, x0, jnp.zeros(1), data, opts)
    assert int(res["status"]) == 0
    np.testing.assert_allclose(res["x"], x_star, rtol=0, atol=1e-7)
    np.testing.assert_allclose(res["hessian"], hess(x_star), rtol=1e-5, atol=1e-6)
    # the switch came after the first accepted step (evaluation 2), then 3
    # difference points; the Newton trial (evaluation 6) was worse than the
    # switch point, and the search went on from there
    assert trials[5] > trials[1] and len(trials) > 6
    assert min(trials) == pytest.approx(float(res["f"]), abs=1e-12)
    # a Newton step predicted to gain less than ``gain_tol`` counts as converged
    # only where it is taken: resumed, a search stopped by its budget is not
    loose = BFGSOptions(max_step=100.0, fd_forward=True, fd_step=1e-6, early_hessian=1e3, gain_tol=1e3)
    for budget in (6, 8):
        cut = bfgs(vg, x0, jnp.zeros(1), data, loose, max_evals=budget)
        assert int(cut["iterations"]) == budget and int(cut["status"]) == OUTER_MAXITER
    # nearer (1 from the minimizer) the Newton trial improves but leaves a gradient:
    # the search resumes with the differenced Hessian's inverse (at the switch
    # point, evaluation 2) as its metric, so its next trial is that Newton step
    points = []

    def logged_x(x, aux, d):
        f, g, a = vg(x, aux, d)
        jax.debug.callback(lambda xx, ff, gg: points.append((np.asarray(xx), float(ff), np.asarray(gg))), x, f, g)
        return f, g, a

    res = bfgs(logged_x, jnp.asarray(x_star) + 1.0, jnp.zeros(1), data, opts)
    assert int(res["status"]) == 0
    np.testing.assert_allclose(res["x"], x_star, rtol=0, atol=1e-7)
    (x2, f2, _), (x6, f6, g6), (x7, _, _) = points[1], points[5], points[6]
    assert f6 < f2 and np.max(np.abs(g6)) > 1e-3
    np.testing.assert_allclose(x7, x6 - np.linalg.solve(hess(x2), g6), atol=1e-6)


def test_small_block_diagonal_patterns_get_batched_blocks():
    from tmbx._sparse import ArrowLayout, DenseLayout, choose_layout

    # 18 blocks of 2 (sleepstudy's (Days|Subject)): block-diagonal, no tail
    r = np.concatenate([[2 * g, 2 * g, 2 * g + 1, 2 * g + 1] for g in range(18)])
    c = np.concatenate([[2 * g, 2 * g + 1, 2 * g, 2 * g + 1] for g in range(18)])
    lay = choose_layout(36, r, c)
    assert isinstance(lay, ArrowLayout) and lay.t == 0 and lay.k == 2
    # a connected pattern stays dense
    full = np.indices((6, 6)).reshape(2, -1)
    assert isinstance(choose_layout(6, full[0], full[1]), DenseLayout)
    # the same factorization either way
    rng = np.random.default_rng(1)
    vals = np.zeros((36, 36))
    for g in range(18):
        a = rng.normal(size=(2, 2))
        vals[2 * g:2 * g + 2, 2 * g:2 * g + 2] = a @ a.T + np.eye(2)
    flat = jnp.zeros(lay.size + 1).at[np.where(lay.slots(r, c) < 0, lay.size, lay.slots(r, c))].add(
        vals[r, c])[:-1] + lay.padding()
    F = lay.factor(flat)
    np.testing.assert_allclose(float(F._logdet()), np.linalg.slogdet(vals)[1], rtol=1e-12)
    b = rng.normal(size=36)
    np.testing.assert_allclose(F.solve(jnp.asarray(b)), np.linalg.solve(vals, b), rtol=1e-10)


def test_sleepstudy_lmm_runs_on_blocks():
    fit = tmbx.glmm("Reaction ~ Days + (Days|Subject)", data=tmbx.load_dataset("sleepstudy"), reml=False)
    assert fit._fit._lmm.layout.kind == "arrow"
    assert fit.model.laplace.layout.kind == "arrow"


def test_bfgs_stops_a_line_search_at_the_objective_noise():
    """A gradient that no step can realize (the value flat to rounding, as a
    Laplace objective near a boundary is): the first failing trial ends the
    direction, a steepest-descent restart fails too, and BFGS reports the line
    search, instead of sixty halvings at the noise floor."""
    from tmbx._optim import OUTER_LINESEARCH, BFGSOptions, bfgs

    def vg(x, aux, data):
        return jnp.asarray(1.0) + 0.0 * x[0], jnp.full_like(x, 1e-3), aux

    res = bfgs(vg, jnp.zeros(2), jnp.zeros(1), None, BFGSOptions(polish=False))
    assert int(res["status"]) == OUTER_LINESEARCH
    assert int(res["iterations"]) <= 3  # start, one trial, one restart


def test_bfgs_expansion_never_steps_past_max_step():
    """Along an unbounded descent direction the expanding line search stops at
    ``max_step`` per coordinate from the current point (it used to multiply the
    step by 4 five times: a log-variance sent from -2 to -53 in one iteration)."""
    from tmbx._optim import BFGSOptions, bfgs

    trials = []

    def vg(x, aux, data):
        jax.debug.callback(lambda v: trials.append(np.asarray(v)), x)
        return -x[0] + 0.5 * x[1] ** 2, jnp.stack([-1.0 + 0.0 * x[0], x[1]]), aux

    opts = BFGSOptions(polish=False, max_step=4.0)
    bfgs(vg, jnp.asarray([0.0, 1.0]), jnp.zeros(1), None, opts, max_evals=25)
    steps = np.abs(np.diff(np.asarray(trials), axis=0)).max(axis=1)
    assert len(trials) == 25 and steps.max() <= 4.0 + 1e-9
    assert trials[-1][0] > 40  # it still moves, max_step at a time


def test_tiered_compilation(tmp_path, monkeypatch):
    """`tmbx._tiered.TieredJit`: the first call runs a level-0 program; a second slow
    one starts the optimized compile (a single fit never does), which later calls
    run once it is ready (same numbers), and a marker lets a new program load the
    optimized one at once."""
    from tmbx import _tiered

    monkeypatch.setenv("TMBX_TIERED", "1")  # the suite turns it off (conftest.py)
    monkeypatch.setattr(_tiered, "_marker_dir", lambda: str(tmp_path))
    monkeypatch.setattr(_tiered, "SLOW", -1.0)  # every run counts as slow
    fn = lambda x, d: jnp.sum(jnp.sin(x) * d["w"]) + jnp.cumsum(x)[-1]
    args = (jnp.linspace(0, 1, 50), {"w": jnp.arange(50.0)})
    expect = float(jax.jit(fn)(*args))
    t = _tiered.TieredJit(fn, {"xla_backend_optimization_level": 0})
    assert float(t(*args)) == pytest.approx(expect, rel=1e-13)
    prog = next(iter(t._programs.values()))
    assert prog.thread is None and not prog.optimized  # one run: not yet
    assert float(t(*args)) == pytest.approx(expect, rel=1e-13)
    assert prog.thread is not None  # run again: optimizing in the background
    t.wait()
    assert prog.optimized and (tmp_path / prog.key).exists()
    assert float(t(*args)) == pytest.approx(expect, rel=1e-13)
    t2 = _tiered.TieredJit(fn, {"xla_backend_optimization_level": 0})
    assert float(t2(*args)) == pytest.approx(expect, rel=1e-13)
    assert next(iter(t2._programs.values())).optimized  # loaded optimized for its first call
    # another shape is another program
    assert float(t2(jnp.zeros(3), {"w": jnp.ones(3)})) == 0.0 and len(t2._programs) == 2
    # `wait` optimizes a program that ran slow once (benchmarks timing refits)
    t3 = _tiered.TieredJit(lambda x, d: jnp.sum(jnp.cos(x) * d["w"]), {"xla_backend_optimization_level": 0})
    t3(*args)
    t3.wait()
    assert next(iter(t3._programs.values())).optimized


def _poisson_groups(n, groups=150, seed=4):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, groups, n)
    x = rng.normal(size=n)
    y = rng.poisson(np.exp(0.3 + 0.4 * x + 0.5 * rng.normal(size=groups)[g]))
    return pd.DataFrame(dict(y=y.astype(float), x=x, g=pd.Categorical(g)))


def test_fit_programs_without_a_large_dense_block_compile_without_ynnpack_fusions():
    """`tmbx._config.fit_compile_options`: with one grouping factor (a
    block-diagonal latent Hessian) the model's fit program is compiled with
    XLA:CPU's YNNPACK fusions off, which XLA's defaults would make; a dense
    block from `YNN_DENSE_ORDER` on (a crossed design's tail) keeps the
    defaults."""
    from tmbx._config import YNN_DENSE_ORDER, fit_compile_options
    from tmbx._laplace import INDEX_KEY

    if jax.default_backend() != "cpu":
        pytest.skip("an XLA:CPU option")
    off = {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert fit_compile_options(YNN_DENSE_ORDER) is None
    assert fit_compile_options(YNN_DENSE_ORDER - 1) == off
    # (XLA makes such fusions on arrays of some 10^4 rows and more)
    fit = tmbx.glmm("y ~ x + (1|g)", _poisson_groups(20000), family="poisson")
    m = fit.model
    assert m.laplace.layout.kind == "arrow" and m.laplace.layout.dense_order == 0
    assert m.fit_options() == off
    x0, u0 = m._starts(None)
    args = (x0, u0, dict(m.data, **{INDEX_KEY: m.laplace.index_data()}))
    low = jax.jit(m._fit_impl).lower(*args)
    if "__ynn_fusion" not in low.compile().as_text():
        pytest.skip("this XLA makes no YNNPACK fusions of this program")
    # the program the model runs (the suite's small model: its first tier)
    core = m._fit_core
    prog = next(iter(core._programs.values())) if hasattr(core, "_programs") else None
    compiled = prog.compiled if prog is not None else core.lower(*args).compile()
    assert "__ynn_fusion" not in compiled.as_text()


def test_fit_program_takes_the_index_arrays_as_arguments():
    """The Laplace machinery's large index arrays (per-observation Hessian slots,
    the arrow layout's coupling pairs) go into the fit program as arguments, not
    as constants: the same fit, from a program a fraction of the size."""
    from tmbx._laplace import INDEX_KEY

    rng = np.random.default_rng(1)
    n = 12000
    a, b = rng.integers(0, 3000, n), rng.integers(0, 30, n)
    eta = 0.8 * rng.normal(size=3000)[a] + 0.5 * rng.normal(size=30)[b]
    df = pd.DataFrame(dict(a=pd.Categorical(a), b=pd.Categorical(b), x=rng.normal(size=n)))
    df["y"] = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
    fit = tmbx.glmm("y ~ x + (1|a) + (1|b)", df, family="binomial")
    m = fit.model
    lap = m.laplace
    idx = lap.index_data()
    assert lap.layout.kind == "arrow"
    assert {"hessian.obs_slots", "layout.pair_b", "layout.ent_t"} <= set(idx)
    x0, u0 = m._starts(None)
    with_idx = dict(m.data, **{INDEX_KEY: idx})
    consts = jax.tree_util.tree_map(np.asarray, m._fit_core(x0, u0, m.data))
    assert float(consts["f"]) == pytest.approx(-fit.loglik, abs=1e-8)
    np.testing.assert_allclose(consts["x"], fit._fit.x, rtol=1e-7, atol=1e-9)
    small = len(jax.jit(m._fit_impl).lower(x0, u0, with_idx).as_text())
    large = len(jax.jit(m._fit_impl).lower(x0, u0, m.data).as_text())
    assert small < large / 3


def test_colored_hessian_gathers_the_dense_hessian_and_takes_its_indices_as_arguments():
    """A template's latent Hessian by coloured products, each pattern entry
    gathered from the compressed matrix (indices read once off asdex's
    decompression), equals exact Hessian columns (Hessian-vector products with
    unit vectors), also when rebuilt from a stored record; every nonzero of those
    columns is in the pattern; in a program the gather's index arrays are
    arguments, not constants."""
    import math

    from tmbx._hessian import ColoredHessian
    from tmbx._laplace import INDEX_KEY

    rng = np.random.default_rng(3)
    n1, n2 = 110, 100  # 11,000 latent effects: above the index arrays' size threshold

    def nll(p, d):  # a 5-point-stencil field with Poisson counts: a banded pattern
        u = p["u"].reshape(n1, n2)
        dx, dy = u[1:] - u[:-1], u[:, 1:] - u[:, :-1]
        prior = 0.5 * math.exp(1.0) * (jnp.sum(dx**2) + jnp.sum(dy**2)) + 0.05 * jnp.sum(u**2)
        return prior - jnp.sum(d["y"] * p["u"] - jnp.exp(p["u"])) + p["s"] ** 2

    data = dict(y=rng.poisson(1.0, n1 * n2).astype(float))
    m = tmbx.Model(nll, dict(u=np.zeros(n1 * n2), s=0.3), data=data, random=["u"])
    lap = m.laplace
    h = lap.hessian
    assert isinstance(h, ColoredHessian) and {"hessian.pick_color", "hessian.pick_elem"} <= set(lap.index_data())
    x = jnp.asarray([0.3])
    u = jnp.asarray(0.3 * rng.normal(size=n1 * n2))
    cols = np.arange(0, n1 * n2, 37)  # exact Hessian columns by Hessian-vector products
    grad = jax.grad(lambda uu: m.f(x, uu, data))
    N = n1 * n2
    E = jnp.zeros((len(cols), N)).at[np.arange(len(cols)), cols].set(1.0)  # the unit vectors e_c
    dense = np.asarray(jax.vmap(lambda e: jax.jvp(grad, (u,), (e,))[1])(E)).T  # (n, len(cols))
    nzr, nzc = np.nonzero(dense)
    assert np.all(np.isin(nzr * N + cols[nzc], h.rows * N + h.cols))  # the pattern holds every nonzero
    keep = np.isin(h.cols, cols)
    r, c = h.rows[keep], h.cols[keep]
    want = dense[r, np.searchsorted(cols, c)]
    slots = h.layout.slots(r, c)
    slots = np.where(slots >= 0, slots, h.layout.slots(c, r))  # the layout stores each pair once
    assert np.all(slots >= 0)
    again = ColoredHessian(m.f, x, u, data, stored=h.record())
    for hess in (h, again):
        got = np.asarray(hess(x, u, data))[slots]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    with_idx = dict(data, **{INDEX_KEY: lap.index_data()})
    small = len(jax.jit(lap.flat).lower(x, u, with_idx).as_text())
    large = len(jax.jit(lap.flat).lower(x, u, data).as_text())
    assert small < large / 3


def test_order_by_row_matches_a_two_key_sort():
    """J's entries ordered by (row, column): the stable one-key sort when the
    columns come in order within rows (the formula layer's listing), the two-key
    sort otherwise."""
    from tmbx._hessian import _order_by_row

    rng = np.random.default_rng(0)
    rows = np.concatenate([np.arange(50), np.arange(50)])  # term by term, rows in order
    cols = np.concatenate([rng.integers(0, 10, 50), 10 + rng.integers(0, 5, 50)])
    np.testing.assert_array_equal(_order_by_row(rows, cols), np.lexsort((cols, rows)))
    swapped = np.concatenate([cols[50:], cols[:50]])  # a row's columns out of order
    np.testing.assert_array_equal(_order_by_row(rows, swapped), np.lexsort((swapped, rows)))


def test_stable_argsort_matches_numpys_stable_sort():
    from tmbx._sparse import _stable_argsort

    rng = np.random.default_rng(0)
    for n, hi in [(0, 1), (1, 1), (5000, 7), (20000, 10**6)]:  # many ties, then few
        a = rng.integers(0, hi, n).astype(np.int32)
        np.testing.assert_array_equal(_stable_argsort(a), np.argsort(a, kind="stable"))
    # keys too large for a * n + position in int64 (a tail's pairs beyond 2^31):
    # 2^63 // n + 1 times n wraps around to a negative key
    n = 5000
    a = rng.choice(np.array([2**62 // n, 2**63 // n + 1]), n)
    np.testing.assert_array_equal(_stable_argsort(a), np.argsort(a, kind="stable"))


@pytest.mark.parametrize("shape", [(5,), (63,), (64,), (3, 101), (200,), (2, 130)])
def test_triangular_inverse_by_blocks_matches_numpy(shape):
    """`_tri_inv` splits factors from order 64 into 2 x 2 blocks (recursively):
    the inverse of batched and single lower-triangular factors equals NumPy's,
    from one LAPACK call."""
    from tmbx._sparse import _tri_inv

    *batch, n = shape
    rng = np.random.default_rng(n)
    A = rng.normal(size=(*batch, n, n))
    L = np.linalg.cholesky(A @ np.swapaxes(A, -1, -2) + n * np.eye(n))
    got = np.asarray(jax.jit(_tri_inv)(jnp.asarray(L)))
    np.testing.assert_allclose(got, np.linalg.inv(L), rtol=1e-10, atol=1e-12)
    assert np.all(np.triu(got, 1) == 0.0)
    # one batched triangular solve whatever the split: two independent batched
    # LAPACK calls in a program can deadlock jaxlib's CPU thread pool
    if jax.default_backend() == "cpu":
        text = jax.jit(_tri_inv).lower(jnp.asarray(L)).compile().as_text()
        assert text.count('custom_call_target="lapack_dtrsm_ffi"') == 1
