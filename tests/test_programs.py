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
    for i in range(5):
        p = tmp_path / f"{i}.exported"
        p.write_bytes(b"x" * 100)
        os.utime(p, (1000 + i, 1000 + i))
    _programs._evict(str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("*.exported")) == ["3.exported", "4.exported"]
