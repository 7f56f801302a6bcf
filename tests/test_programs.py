"""The persistent cache of traced programs (`tmbx._programs`): a later fit of the
same call reads the fit's program from disk instead of tracing it, gets the same
answer as a traced fit, and any change to the call or its data is a new key."""

import collections
import os

import numpy as np
import pytest

import tmbx
from tmbx import _model, _programs
from tmbx.formula import _lmm


@pytest.fixture
def program_dir(tmp_path, monkeypatch):
    path = tmp_path / "programs"
    monkeypatch.setattr(_programs, "_base", lambda: str(path))
    # and no programs compiled by earlier tests: a process that starts with this directory
    monkeypatch.setattr(_programs, "_LIVE", collections.OrderedDict())
    # nor loads that earlier tests' models started (a template looks for its stored
    # program as soon as it is built)
    monkeypatch.setattr(_programs, "_PREFETCH", {})
    return path


def _count(monkeypatch, cls, name):
    calls = []
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


def test_spec_digest_changes_with_every_input(monkeypatch):
    monkeypatch.delenv("TMBX_FAST_COMPILE", raising=False)
    df = tmbx.load_dataset("sleepstudy")
    base = dict(formula="Reaction ~ Days + (Days|Subject)", family="gaussian", data=df, start=None)
    key = _programs.spec_digest(base)
    assert key == _programs.spec_digest(dict(base, data=df.copy()))
    changed = df.copy()
    changed.loc[5, "Reaction"] += 1e-9
    reordered = df.copy()
    reordered["Subject"] = reordered["Subject"].astype("category").cat.reorder_categories(
        reordered["Subject"].astype("category").cat.categories[::-1])
    variants = [dict(base, data=changed), dict(base, data=reordered), dict(base, family="poisson"),
                dict(base, formula="Reaction ~ Days + (1|Subject)"), dict(base, start={"theta": np.zeros(3)}),
                dict(base, family=tmbx.families.Gamma(link="log"))]
    keys = {_programs.spec_digest(v) for v in variants}
    assert key not in keys and len(keys) == len(variants)
    # settings read at each call: a process that changes them gets other programs
    monkeypatch.setenv("TMBX_FAST_COMPILE", "0")
    assert _programs.spec_digest(base) not in keys | {key}
    monkeypatch.delenv("TMBX_FAST_COMPILE")
    assert _programs.spec_digest(base) == key
    # a user's own function cannot be fingerprinted: no key, programs traced as usual
    assert _programs.spec_digest(dict(base, family=lambda y: y)) is None


@pytest.mark.parametrize("case", ["laplace", "lmm"])
def test_second_fit_reads_the_program_and_matches_a_traced_fit(case, program_dir, monkeypatch):
    if case == "laplace":  # binomial GLMM: the engine's fit program
        df = tmbx.load_dataset("cbpp")
        call = dict(formula="cbind(incidence, size - incidence) ~ period + (1|herd)", data=df, family="binomial")
        traced = (_model.Model, "_fit_impl")
    else:  # Gaussian: the profiled least-squares program
        df = tmbx.load_dataset("sleepstudy")
        call = dict(formula="Reaction ~ Days + (Days|Subject)", data=df, reml=True)
        traced = (_lmm.ProfiledLMM, "_fit_rel")
    monkeypatch.setenv("TMBX_PROGRAM_CACHE", "0")
    plain = tmbx.glmm(**call)  # traced as usual, nothing stored
    assert not program_dir.exists()
    monkeypatch.delenv("TMBX_PROGRAM_CACHE")

    traces = _count(monkeypatch, *traced)
    loads = []
    load = _programs._load
    monkeypatch.setattr(_programs, "_load", lambda entry: (load(entry), loads.append(entry.lowered is not None)))
    first = tmbx.glmm(**call)
    assert traces and len(list(program_dir.glob("*.exported"))) == 1 and not loads
    n = len(traces)
    _programs._LIVE.clear()  # what a new process starts with
    second = tmbx.glmm(**call)
    assert len(traces) == n  # read from disk: the fit was not traced again
    # ... and loaded in the background while the design was built, then taken
    assert loads == [True] and not _programs._PREFETCH
    # the same call again in this process: the compiled program it already has,
    # neither traced, nor read, nor loaded
    third = tmbx.glmm(**call)
    assert len(traces) == n and loads == [True] and not _programs._PREFETCH
    for fit in (first, second, third):
        assert fit.loglik == pytest.approx(plain.loglik, abs=1e-9)
        np.testing.assert_allclose(fit.fixef["cond"], plain.fixef["cond"], rtol=1e-9)
        for comp, V in plain.vcov().items():
            np.testing.assert_allclose(fit.vcov()[comp], V, rtol=1e-7)

    # other data of the same shapes: a program of its own, and its own answer
    df2 = df.copy()
    if case == "laplace":
        df2["incidence"] = np.minimum(df2["incidence"] + 1, df2["size"])
    else:
        df2["Reaction"] = df2["Reaction"].to_numpy()[np.random.default_rng(0).permutation(len(df2))]
    other = tmbx.glmm(**dict(call, data=df2))
    assert len(list(program_dir.glob("*.exported"))) == 2
    assert abs(other.loglik - plain.loglik) > 1e-3


def test_damaged_program_is_traced_again(program_dir, monkeypatch):
    df = tmbx.load_dataset("cbpp")
    call = dict(formula="cbind(incidence, size - incidence) ~ period + (1|herd)", data=df, family="binomial")
    ref = tmbx.glmm(**call)
    (path,) = program_dir.glob("*.exported")
    path.write_bytes(b"not a program")
    _programs._LIVE.clear()  # a new process
    traces = _count(monkeypatch, _model.Model, "_fit_impl")
    again = tmbx.glmm(**call)
    assert traces and again.loglik == pytest.approx(ref.loglik, abs=1e-9)
    assert path.stat().st_size > 100  # written anew


def test_same_call_in_one_process_reuses_its_programs(monkeypatch):
    """Without any cache on disk, a second identical call runs the first call's
    compiled programs (a notebook cell run again), and any change to the call is
    traced afresh."""
    monkeypatch.setenv("TMBX_PROGRAM_CACHE", "0")
    df = tmbx.load_dataset("cbpp")
    call = dict(formula="cbind(incidence, size - incidence) ~ period + (1|herd)", data=df, family="binomial")
    traces = _count(monkeypatch, _model.Model, "_fit_impl")
    first = tmbx.glmm(**call)
    n = len(traces)
    again = tmbx.glmm(**call)
    assert n and len(traces) == n and again.loglik == first.loglik
    other = tmbx.glmm(**dict(call, formula="cbind(incidence, size - incidence) ~ 1 + (1|herd)"))
    assert len(traces) > n and other.loglik < first.loglik


def test_no_load_is_left_pending_for_a_program_already_compiled(program_dir):
    """A stored program that this process has compiled already is not loaded again
    in the background, even when only its tiered executable is still remembered
    (the plain entry evicted first), and nothing is left pending."""
    df = tmbx.load_dataset("cbpp")
    call = dict(formula="cbind(incidence, size - incidence) ~ period + (1|herd)", data=df, family="binomial")
    first = tmbx.glmm(**call)
    assert len(list(program_dir.glob("*.exported"))) == 1
    plain = [k for k in _programs._LIVE if isinstance(k, str)]
    assert plain and any(("shared", k) in _programs._LIVE for k in plain)  # a small model: tiered
    for k in plain:
        del _programs._LIVE[k]
    again = tmbx.glmm(**call)
    assert again.loglik == first.loglik and not _programs._PREFETCH


def test_old_programs_are_evicted(tmp_path, monkeypatch):
    monkeypatch.setattr(_programs, "MAX_BYTES", 250)
    for i in range(5):  # programs and a template's stored colouring alike, by last use
        p = tmp_path / (f"{i}.exported" if i % 2 else f"{i}-coloring.npz")
        p.write_bytes(b"x" * 100)
        os.utime(p, (1000 + i, 1000 + i))
    _programs._evict(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3.exported", "4-coloring.npz"]


# ------------------------------------------------------------- user templates
def _glmm_template(scale=0.5, seed=0, map=None, start_sd=0.0):
    """A Poisson GLMM written as a template: 30 groups of 8 counts."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(30), 8)
    x = rng.normal(size=g.size)
    y = rng.poisson(np.exp(0.3 + 0.5 * x + 0.6 * rng.normal(size=30)[g])).astype(float)
    data = dict(y=y, X=np.column_stack([np.ones_like(x), x]), g=g)

    def nll(p, d):
        u = p["u"]
        eta = d["X"] @ p["beta"] + jnp.exp(p["logsd"]) * u[d["g"]]
        return -jnp.sum(d["y"] * eta - jnp.exp(eta)) + scale * jnp.sum(u**2)

    params = dict(beta=np.zeros(2), logsd=start_sd, u=np.zeros(30))
    return tmbx.Model(nll, params, data=data, random=["u"], map=map)


def test_template_key_follows_what_the_template_computes():
    """A template's key is its jaxpr, constants and data: the same template built
    again (a new function object) has the same key; a changed constant, datum,
    map or start value, another; a template whose derivative rule or callback is
    its own, none."""
    import jax
    import jax.numpy as jnp

    key = _glmm_template()._program_key
    assert key is not None and key == _glmm_template()._program_key
    variants = [_glmm_template(scale=0.5000001), _glmm_template(seed=1), _glmm_template(start_sd=0.1),
                _glmm_template(map={"beta": [0, None]})]
    keys = {m._program_key for m in variants}
    assert key not in keys and len(keys) == len(variants)

    @jax.custom_jvp
    def square(v):
        return v**2

    square.defjvp(lambda p, t: (p[0] ** 2, 2 * p[0] * t[0]))
    own_rule = lambda p, d: jnp.sum(square(p["u"] - d["y"])) + p["s"] ** 2
    library_rule = lambda p, d: jnp.sum(jax.nn.softplus(p["u"] - d["y"])) + jnp.sum(p["u"] ** 2) + p["s"] ** 2
    callback = lambda p, d: jnp.sum((p["u"] - d["y"]) ** 2) + jax.pure_callback(
        lambda s: s**2, jax.ShapeDtypeStruct((), jnp.float64), p["s"])
    data, params = dict(y=np.arange(4.0)), dict(u=np.zeros(4), s=1.0)
    assert tmbx.Model(library_rule, params, data=data, random=["u"])._program_key is not None
    for nll in (own_rule, callback):
        assert tmbx.Model(nll, params, data=data, random=["u"])._program_key is None


def test_second_template_model_reads_its_colouring_and_fit_program(program_dir, monkeypatch):
    """A template built again in a new process skips asdex's pattern detection and
    the fit's trace, and gets the traced fit's answer; a damaged colouring file is
    detected again."""
    from tmbx import _hessian

    detections = []

    class CountingAsdex:
        def __getattr__(self, name):
            return getattr(_hessian.LazyModule("asdex"), name)

        def hessian_coloring(self, *args, **kwargs):
            detections.append(1)
            return _hessian.LazyModule("asdex").hessian_coloring(*args, **kwargs)

    monkeypatch.setattr(_hessian, "asdex", CountingAsdex())
    monkeypatch.setenv("TMBX_PROGRAM_CACHE", "0")
    plain = _glmm_template().fit()
    monkeypatch.delenv("TMBX_PROGRAM_CACHE")
    _programs._LIVE.clear()
    traces = _count(monkeypatch, _model.Model, "_fit_impl")
    first = _glmm_template().fit()
    assert len(detections) == 2 and traces
    assert len(list(program_dir.glob("*-coloring.npz"))) == 1 and len(list(program_dir.glob("*.exported"))) == 1
    n = len(traces)
    _programs._LIVE.clear()  # a new process
    second_model = _glmm_template()
    second = second_model.fit()
    assert len(detections) == 2 and len(traces) == n
    for fit in (first, second):
        assert fit.loglik == pytest.approx(plain.loglik, abs=1e-10)
        np.testing.assert_allclose(fit.x, plain.x, rtol=1e-9)
        np.testing.assert_allclose(fit.sdreport().se["beta"], plain.sdreport().se["beta"], rtol=1e-8)

    (path,) = program_dir.glob("*-coloring.npz")
    path.write_bytes(b"damaged")
    _programs._LIVE.clear()
    again = _glmm_template().fit()
    assert len(detections) == 3 and again.loglik == pytest.approx(plain.loglik, abs=1e-10)
