"""Benchmark: tmbx.glmm (the formula front end) side by side with its peers.

    python benchmarks/bench_glmm.py                      # every case but the 1e6/5e6 ladder (about 40 min on 2 cores)
    python benchmarks/bench_glmm.py --quick              # the small reference cases only (about 20 min)
    python benchmarks/bench_glmm.py --large              # the 1e6/5e6 ladder, tmbx only (hours)
    python benchmarks/bench_glmm.py --large --peers-large   # ... and glmm (PyPI) run beside it
    python benchmarks/bench_glmm.py --cases insteval_crossed,ladder_crossed_1e5
    python benchmarks/bench_glmm.py --tools tmbx_cold,tmbx_warm --cases salamanders_zip
    python benchmarks/bench_glmm.py --table              # the tables of the saved results, the ratio plot and cost curves
    python benchmarks/bench_glmm.py --profile --cases insteval_crossed   # + compile/run split

Cases: every reference case in ``tests/data/cases`` (glmmTMB 1.1.5 fits of real
data; ``insteval_crossed`` is the large one, 73,421 rows, 2,972 x 1,128 x 14
crossed levels), and the 1e5-row scale ladder of
``benchmarks/reference/make_scale_data.py`` (written to
``benchmarks/data/glmm_ladder_*.csv`` on first use, git-ignored):

- ``ladder_single_1e5``: Poisson ``y ~ x + (1 + x|g)``, 1,000 groups;
- ``ladder_crossed_1e5``: Gaussian (ML) ``y ~ x + (1|a) + (1|b)``, 14,285 x 948 levels;
- ``ladder_crossbin_1e5``: the same design, Bernoulli response (logit).

The larger rungs, run only with ``--large`` or when named in ``--cases``:
``ladder_single_1e6``, ``ladder_crossed_1e6``, ``ladder_crossbin_1e6``,
``ladder_crossed_5e6`` (713,591 x 6,708 levels) and ``ladder_crossbin_5e6``, same
models. On these, glmmTMB, lme4 and mixedlm are not run (up to half an hour per fit
at 1e6): the times in ``peers.json`` stand in for them, printed with a ``*``,
"published, not re-run" (glmm's too, unless ``--peers-large`` runs it; ``--peers-large
glmm,lme4`` names others; peers.json has no times for ``ladder_crossbin_5e6``). They
get one repeated fit, no warm-up, and a 3 h timeout per subprocess.

Every measurement runs in a FRESH subprocess, one at a time:

- ``tmbx_cold``: ``TMBX_NO_CACHE=1`` (JAX's persistent compilation cache off):
  ``import tmbx`` time, the first ``tmbx.glmm(...)`` call (formula, design,
  template, XLA compilation and the fit), split into design / template / fit
  phases, then the repeated fit ``fit.refit()`` in the same process (the
  compiled program: median of a few calls; for a small model, after waiting for
  its optimized tier, ``tier_wait_seconds`` in the JSON);
- ``tmbx_warm``: the same with the default cache (``~/.cache/tmbx``), after one
  priming process has filled it for this case;
- ``glmmTMB`` and ``lme4`` through ``benchmarks/r_glmm_fit.R`` (only the fit call
  is timed; small cases: one warm-up fit, then the median of a few);
- ``glmm`` and ``mixedlm`` (PyPI) where they fit the model (no zero-inflation,
  dispersion models, structured covariances or negative binomials): first fit
  and the median of repeated fits in the same process.

Every worker reports its peak memory (``peak_rss_mb``, MB of 2^20 bytes): a Python
worker its own ``ru_maxrss`` (``getrusage(RUSAGE_SELF)``, the whole process: imports,
data, fits); an R worker is measured from here, by GNU time's ``%M`` (falling back to
``getrusage(RUSAGE_CHILDREN)``).

The tmbx workers import tmbx, tmbx.families and tmbx.covstructs from this
checkout (`use_working_tree`), whatever copy is installed in editable mode.
``--profile`` adds, for ``tmbx_cold``, the fit program's trace+lower time, its
XLA compile time and its run time (a fresh ``jax.jit`` of ``Model._fit_impl``,
so no in-memory cache hides the compile), and one objective+gradient call.

Each tool's log-likelihood is compared with tmbx's (agreement: |diff| < 1e-3).
Known disagreements that are the peer's, not tmbx's: lme4's and mixedlm's Gamma
log-likelihood (cake_gamma; glmer's Gamma logLik uses its own dispersion
estimate), and lme4's glmer stopping early on the crossed Bernoulli ladder
(logLik 0.05 lower than glmmTMB, glmm, mixedlm and tmbx, which agree).
Ratios are peer time / tmbx time; ``benchmarks/results/glmm_ratios.png`` draws
them (log scale, per case and peer: against tmbx's repeated fit and against its
first fit with a warm cache), rewritten with every table. Results are merged, case by
case, into ``benchmarks/results/glmm.json``; run subsets one after another and the
file accumulates. The machine's 1-minute load average is recorded with each case:
on a shared machine, compare tools measured side by side only.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES_DIR = os.path.join(ROOT, "tests", "data", "cases")
DATA_DIR = os.path.join(ROOT, "tmbx", "data")
BENCH_DATA = os.path.join(HERE, "data")
RESULTS = os.path.join(HERE, "results", "glmm.json")
R_SCRIPT = os.path.join(HERE, "r_glmm_fit.R")
SCALE_GEN = os.path.join(HERE, "reference", "make_scale_data.py")
PEERS_JSON = os.path.join(HERE, "reference", "peers.json")
TIME_BIN = "/usr/bin/time"  # GNU time: the peak RSS (%M) of an Rscript worker
MARK = "@@RESULT@@"
TOL = 1e-3
TIMEOUT, LARGE_TIMEOUT = 600, 3 * 3600  # default seconds per subprocess: small cases, LARGE_LADDER
XLA_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
XLA_WORKAROUND = False
TOOLS = ["tmbx_cold", "tmbx_warm", "glmmTMB", "lme4", "glmm", "mixedlm"]
PEERS = ["glmmTMB", "lme4", "glmm", "mixedlm"]

# ----------------------------------------------------------------------------- cases
LADDER_MODELS = {
    "single": dict(formula="y ~ x + (1 + x|g)", family="poisson", factors=["g"]),
    "crossed": dict(formula="y ~ x + (1|a) + (1|b)", family="gaussian", factors=["a", "b"]),
    "crossbin": dict(formula="y ~ x + (1|a) + (1|b)", family="binomial", factors=["a", "b"]),
}
LADDER_SIZES = [("single", "1e5"), ("crossed", "1e5"), ("crossbin", "1e5"),
                ("single", "1e6"), ("crossed", "1e6"), ("crossbin", "1e6"), ("crossed", "5e6"), ("crossbin", "5e6")]
LADDER = {f"ladder_{kind}_{n}": dict(kind=kind, N=n, **LADDER_MODELS[kind]) for kind, n in LADDER_SIZES}
# run only with --large or when named in --cases; peers not re-run (peers.json's times instead)
LARGE_LADDER = {cid for cid, spec in LADDER.items() if spec["N"] != "1e5"}
LARGE = {"insteval_crossed", *LADDER}  # not in --quick; fewer repeats
# Peers' spellings of a model where theirs differs from glmmTMB's (same model, same
# likelihood): None = the peer cannot fit it. `derive`: columns computed first
# (pandas eval); `weights`: a column of prior weights.
PEER_SPELLING = {
    "cbpp_binomial": {
        # glmm's cbind() takes two column names; mixedlm has no cbind(): proportions + weights
        "glmm": dict(formula="cbind(incidence, nfail) ~ period + (1|herd)", derive={"nfail": "size - incidence"}),
        "mixedlm": dict(formula="prop ~ period + (1|herd)", derive={"prop": "incidence / size"}, weights="size"),
    },
    "sleepstudy_diag": {
        # glmmTMB's diag(Days|Subject) is lme4's (Days||Subject); glmm has neither
        "lme4": dict(formula="Reaction ~ Days + (Days||Subject)"),
        "mixedlm": dict(formula="Reaction ~ Days + (Days||Subject)"),
        "glmm": None,
    },
}
R_SETUP = {"topo_exp": "data$pos <- numFactor(data$x, data$y)"}
LME4_FAMILIES = {"gaussian", "binomial", "poisson", "Gamma(link='log')"}
STRUCTURES = re.compile(r"\b(diag|cs|rr|ar1|exp|ou|gau|mat|toep|us|homdiag|homcs|propto|pos)\(")


def ladder_csv(case: dict) -> str:
    path = os.path.join(BENCH_DATA, f"glmm_ladder_{case['kind']}_{case['N']}.csv")
    if not os.path.exists(path):
        os.makedirs(BENCH_DATA, exist_ok=True)
        subprocess.run([sys.executable, SCALE_GEN, case["kind"], case["N"], path], check=True)
    return path


def _published_seconds(v) -> float:
    """peers.json gives one time or a [low, high] range over runs: one number."""
    return statistics.median(v) if isinstance(v, list) else v


def load_cases() -> dict:
    cases = {}
    for p in sorted(glob.glob(os.path.join(CASES_DIR, "*.json"))):
        c = json.load(open(p))
        g = c["glmmTMB"]
        cases[c["id"]] = dict(
            id=c["id"], source="reference", dataset=c["dataset"],
            csv=os.path.join(DATA_DIR, os.path.basename(c["data_file"])),
            levels=os.path.join(DATA_DIR, os.path.basename(c["levels_file"])), factors=[],
            python_formula=c["python_formula"], r_formula=c["r_formula"], family=c["family"],
            ziformula=c["ziformula"], dispformula=c["dispformula"], REML=bool(c["REML"]),
            nobs=g["nobs"], ref_loglik=g["logLik"], ref_glmmTMB_seconds=g.get("fit_seconds"),
            ref_lme4_seconds=(c.get("lme4") or {}).get("fit_seconds"),
        )
    peers = json.load(open(PEERS_JSON)) if os.path.exists(PEERS_JSON) else {"fits": []}
    for cid, spec in LADDER.items():
        ref = next((f for f in peers["fits"] if f["case"] == spec["kind"] and f["N"] == spec["N"]), {})
        cases[cid] = dict(
            id=cid, source="ladder", kind=spec["kind"], N=spec["N"], csv=None, levels=None,
            factors=spec["factors"], python_formula=spec["formula"], r_formula=spec["formula"],
            family=spec["family"], ziformula=None, dispformula=None, REML=False, nobs=int(float(spec["N"])),
            ref_loglik=ref.get("logLik"), ref_peer_seconds=ref.get("seconds"),
        )
        if cid in LARGE_LADDER:  # the peers' published figures stand in for runs
            cases[cid]["published_seconds"] = {t: _published_seconds(v) for t, v in ref.get("seconds", {}).items()}
            cases[cid]["published_peak_mb"] = {t: gb * 1024 for t, gb in ref.get("peak_memory_GB", {}).items()}
    if "insteval" in peers:
        cases["insteval_crossed"]["ref_peer_seconds"] = peers["insteval"]["seconds"]
    return cases


def peer_model(case: dict, tool: str):
    """(formula, derive, weights) for a peer, or None where it cannot fit the model."""
    if tool == "glmmTMB":
        return dict(formula=case["r_formula"], derive={}, weights=None)
    over = PEER_SPELLING.get(case["id"], {})
    if tool in over:
        o = over[tool]
        return None if o is None else dict(formula=o["formula"], derive=o.get("derive", {}), weights=o.get("weights"))
    if case["ziformula"] or case["dispformula"] or case["family"] not in LME4_FAMILIES:
        return None
    if STRUCTURES.search(case["r_formula"]):
        return None
    return dict(formula=case["r_formula"], derive={}, weights=None)


# ----------------------------------------------------------------------------- workers
def _read_frame(case: dict):
    """pandas frame with factors as ordered categoricals (as tmbx.load_dataset does)."""
    import pandas as pd

    if case["source"] == "ladder":
        df = pd.read_csv(ladder_csv(case))
        for col in case["factors"]:
            df[col] = pd.Categorical(df[col].astype(str), categories=[str(v) for v in sorted(df[col].unique())])
        return df
    levels = json.load(open(case["levels"]))
    df = pd.read_csv(case["csv"], dtype={c: str for c in levels})
    for col, lv in levels.items():
        if col in df.columns:
            df[col] = pd.Categorical(df[col], categories=[str(v) for v in lv])
    return df


def _emit(res: dict):
    # the worker's peak RSS over its whole life (imports, data, fits). Linux keeps the
    # larger of the pre- and post-exec peaks, so this is max(driver, worker); the driver
    # imports only the standard library (about 15 MB), below any worker.
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(MARK, json.dumps(res, default=float), flush=True)


def _timed(store: dict, name: str, obj, attr: str):
    """Wrap obj.attr so that its wall time accumulates in store[name]."""
    fn = getattr(obj, attr)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            store[name] = store.get(name, 0.0) + time.perf_counter() - t

    setattr(obj, attr, wrapper)


def use_working_tree():
    """Import tmbx (and tmbx.families, tmbx.covstructs) from this checkout.

    The interpreter may have tmbx installed in editable mode from another copy
    of the repository (a CI worktree, say); its finder maps ``tmbx.families``
    and ``tmbx.covstructs`` there. This puts the checkout holding this file
    first, so the benchmark measures the code next to it.
    """
    import importlib.abc
    import importlib.util

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    alias = {"tmbx.families": "families", "tmbx.covstructs": "covstructs"}

    class _CheckoutFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = next((k for k in alias if name == k or name.startswith(k + ".")), None)
            if top is None:
                return None
            base = os.path.join(ROOT, alias[top], *name[len(top) + 1:].split(".")) if name != top \
                else os.path.join(ROOT, alias[top])
            if os.path.isdir(base):
                return importlib.util.spec_from_file_location(
                    name, os.path.join(base, "__init__.py"), submodule_search_locations=[base])
            if os.path.exists(base + ".py"):
                return importlib.util.spec_from_file_location(name, base + ".py")
            return None

    sys.meta_path.insert(0, _CheckoutFinder())


def _tmbx_paths():
    return {m: os.path.dirname(sys.modules[m].__file__) for m in ("tmbx", "tmbx.families", "tmbx.covstructs")
            if getattr(sys.modules.get(m), "__file__", None)}


def worker_tmbx(case: dict, repeats: int, profile: bool):
    import warnings

    t0 = time.perf_counter()
    import numpy as np  # noqa: F401
    import pandas as pd  # noqa: F401

    t_np = time.perf_counter() - t0
    use_working_tree()
    t = time.perf_counter()
    import tmbx

    t_import = time.perf_counter() - t
    import jax

    if case["source"] == "reference":
        df = tmbx.load_dataset(case["dataset"])
    else:
        df = _read_frame(case)

    # phases of the first call, timed by wrapping the internals it calls (nothing else changes)
    import tmbx.formula._api as api
    from tmbx import _model, _hessian

    phases = {}
    _timed(phases, "design", api, "build_design")
    _timed(phases, "template", api, "build_template")
    _timed(phases, "template.check_template", _model.Model, "_check_template")
    _timed(phases, "template.latent_hessian_setup", _hessian.LatentGaussianHessian, "__init__")
    _timed(phases, "template.colored_hessian_setup", _hessian.ColoredHessian, "__init__")
    _timed(phases, "fit", _model.Model, "fit")

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = time.perf_counter()
        fit = tmbx.glmm(case["python_formula"], data=df, family=case["family"], ziformula=case["ziformula"],
                        dispformula=case["dispformula"], reml=case["REML"])
        t_first = time.perf_counter() - t
    phases["glmmfit_wrap"] = t_first - sum(phases.get(k, 0.0) for k in ("design", "template", "fit"))
    res = dict(ok=True, tool="tmbx", version=tmbx.__version__, jax=jax.__version__,
               cache=not os.environ.get("TMBX_NO_CACHE"), import_seconds=t_import, paths=_tmbx_paths(),
               numpy_pandas_import_seconds=t_np, first_seconds=t_first, phases=dict(phases),
               loglik=float(fit.loglik), converged=bool(fit.converged), message=fit.message,
               iterations=int(fit._fit.iterations), n_u=int(fit.model.space.n_u),
               n_x=int(fit.model.par.size), layout=_layout(fit.model),
               warnings=sorted({str(x.message)[:200] for x in w}))
    # a small model's fit is compiled in tiers (tmbx/_tiered.py): the optimized
    # program may still be compiling in the background; repeated fits time it, and
    # the wait (the rest of its compile) is recorded beside them (`_fit_program`:
    # None where the fit went another way, profiled least squares)
    wait = getattr(fit.model._fit_program, "wait", None)
    if wait is not None and repeats:
        res["tier_wait_seconds"] = wait()
    times, lls = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(repeats):
            t = time.perf_counter()
            f2 = fit.refit()
            times.append(time.perf_counter() - t)
            lls.append(float(f2.loglik))
    if times:
        res.update(seconds=statistics.median(times), seconds_all=times, repeat_loglik=lls[-1])
    if profile:
        res["profile"] = _profile_fit(fit.model)
    _emit(res)


def _layout(model):
    lay = getattr(getattr(model, "laplace", None), "layout", None)
    return getattr(lay, "kind", None)


def _profile_fit(model) -> dict:
    """Trace+lower vs XLA compile vs run of the compiled fit, and one objective+gradient."""
    import jax
    import jax.numpy as jnp

    from tmbx._laplace import INDEX_KEY

    x0, u0 = model._starts(None)
    out = {}
    # the data as `Model.run_fit` passes them: with the Laplace index arrays
    data = model.data
    if model.laplace is not None and model.laplace.index_data():
        data = dict(data, **{INDEX_KEY: model.laplace.index_data()})
    # a new function object: jax's in-memory caches (keyed on the function) miss, so
    # this traces and compiles afresh (the persistent cache is off in tmbx_cold)
    fresh = jax.jit(lambda x, u, d: model._fit_impl(x, u, d))
    t = time.perf_counter()
    lowered = fresh.lower(x0, u0, data)
    out["fit_trace_lower_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    out["fit_compile_seconds"] = time.perf_counter() - t
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        r = jax.block_until_ready(compiled(x0, u0, data))
        runs.append(time.perf_counter() - t)
    out["fit_run_seconds"] = statistics.median(runs)
    out["outer_iterations"] = int(r["iterations"])
    x = jnp.asarray(r["x"])
    u = jnp.asarray(r["u"])
    t = time.perf_counter()
    vg = jax.jit(lambda x, u, d: model._vg(x, u, d)).lower(x, u, data).compile()
    out["value_grad_lower_compile_seconds"] = time.perf_counter() - t
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(vg(x, u, data))
        runs.append(time.perf_counter() - t)
    out["value_grad_run_seconds"] = statistics.median(runs)
    try:
        out["hlo_ops_fit"] = lowered.as_text().count("\n")
    except Exception:  # pragma: no cover
        pass
    return out


def worker_glmm(case: dict, repeats: int):
    import warnings

    import glmm

    pm = peer_model(case, "glmm")
    df = _prep(case, pm)
    fam = case["family"]
    kw = {}
    if fam == "Gamma(link='log')":
        kw = dict(family="gamma", link="log")
    else:
        kw = dict(family=fam)
    if fam == "gaussian":
        kw["reml"] = case["REML"]
    if pm["weights"]:
        kw["weights"] = df[pm["weights"]].to_numpy(float)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = time.perf_counter()
        f = glmm.fit(df, pm["formula"], **kw)
        first = time.perf_counter() - t
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            f = glmm.fit(df, pm["formula"], **kw)
            times.append(time.perf_counter() - t)
    _emit(dict(ok=True, tool="glmm", version=glmm_version(), formula=pm["formula"], first_seconds=first,
               seconds=statistics.median(times) if times else first, seconds_all=times,
               loglik=float(f.loglik), converged=bool(f.converged),
               warnings=sorted({str(x.message)[:200] for x in w})))


def glmm_version():
    from importlib.metadata import version

    return version("glmm")


def worker_mixedlm(case: dict, repeats: int):
    import warnings

    import mixedlm
    from mixedlm import families as F

    pm = peer_model(case, "mixedlm")
    df = _prep(case, pm)
    fam = case["family"]
    kw = {}
    if pm["weights"]:
        kw["weights"] = df[pm["weights"]].to_numpy(float)
    if fam == "gaussian":
        call = lambda: mixedlm.lmer(pm["formula"], df, REML=case["REML"], **kw)  # noqa: E731
    else:
        family = {"binomial": F.Binomial, "poisson": F.Poisson}.get(fam)
        family = family() if family else F.Gamma(link=F.LogLink())
        call = lambda: mixedlm.glmer(pm["formula"], df, family=family, **kw)  # noqa: E731
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = time.perf_counter()
        r = call()
        first = time.perf_counter() - t
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            r = call()
            times.append(time.perf_counter() - t)
    _emit(dict(ok=True, tool="mixedlm", version=mixedlm.__version__, formula=pm["formula"], first_seconds=first,
               seconds=statistics.median(times) if times else first, seconds_all=times,
               loglik=float(r.logLik().value), converged=bool(getattr(r, "converged", True)),
               warnings=sorted({str(x.message)[:200] for x in w})))


def _prep(case, pm):
    df = _read_frame(case)
    for col, expr in pm["derive"].items():
        df[col] = df.eval(expr)
    return df


# ----------------------------------------------------------------------------- driver
def _run(cmd, env=None, timeout=TIMEOUT, child_peak=False) -> dict:
    """Run one worker in a fresh process and return its result line as a dict.

    child_peak: measure the child's peak RSS from here (for Rscript, which has no
    getrusage): GNU time's %M where /usr/bin/time exists; else RUSAGE_CHILDREN, which
    is the largest peak of all children waited for so far, so it is this child's only
    when it rose during the call (else the peak is left unknown).
    """
    peak_file = None
    if child_peak and os.access(TIME_BIN, os.X_OK):
        fd, peak_file = tempfile.mkstemp(suffix=".maxrss")
        os.close(fd)
        cmd = [TIME_BIN, "-f", "%M", "-o", peak_file, *cmd]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    # a session of its own, so that a timeout (or ^C) kills the worker under GNU time too
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except BaseException as e:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        if peak_file:
            os.unlink(peak_file)
        if isinstance(e, subprocess.TimeoutExpired):
            return dict(ok=False, error=f"timed out after {timeout} s")
        raise
    wall = time.perf_counter() - t
    peak = None
    if peak_file:
        with open(peak_file) as fh:  # the last line; GNU time puts "exited with status" lines first
            lines = fh.read().split()
        os.unlink(peak_file)
        peak = int(lines[-1]) / 1024 if lines and lines[-1].isdigit() else None
    elif child_peak:
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        peak = after / 1024 if after > before else None
    res = None
    for line in stdout.splitlines():
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
            break
    if res is None:
        tail = (stderr or stdout).strip().splitlines()[-6:]
        res = dict(ok=False, error=f"exit {p.returncode}: " + " | ".join(tail)[-800:])
    res["process_seconds"] = wall
    if child_peak:
        res["peak_rss_mb"] = peak
    return res


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _worker_cmd(tool, case_id, repeats, profile=False):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", tool, "--cases", case_id, "--repeats", str(repeats)]
    return cmd + (["--profile"] if profile else [])


def run_case(case: dict, tools, timeout: int, profile: bool, peers_large=()) -> dict:
    """Run each tool on one case; on LARGE_LADDER, peers only where named in peers_large."""
    large = case["id"] in LARGE
    huge = case["id"] in LARGE_LADDER  # 1e6 rows and up: one repeated fit, no warm-up
    out = {}
    if case["source"] == "ladder":
        ladder_csv(case)
    env0 = dict(os.environ)
    env0.pop("TMBX_NO_CACHE", None)
    if XLA_WORKAROUND:  # see benchmarks/README.md: jaxlib 0.10.x LAPACK deadlock
        env0["XLA_FLAGS"] = (env0.get("XLA_FLAGS", "") + " " + XLA_FLAG).strip()
    for tool in tools:
        t = time.strftime("%H:%M:%S")
        print(f"  [{t}] {case['id']}: {tool} ...", end="", flush=True)
        if huge and tool in PEERS and tool not in peers_large:
            # nothing recorded: an earlier --peers-large run of this tool stays in the results
            pub = case.get("published_seconds", {}).get(tool)
            print(f" not run; published {_fmt(pub)} s (peers.json)" if pub else " not run")
            continue
        if tool in ("tmbx_cold", "tmbx_warm"):
            reps = 1 if huge else 3 if large else 5
            env = dict(env0)
            if tool == "tmbx_cold":
                env["TMBX_NO_CACHE"] = "1"
                res = _run(_worker_cmd("tmbx", case["id"], reps, profile), env, timeout)
            else:
                prime = _run(_worker_cmd("tmbx", case["id"], 0), env, timeout)  # fills the cache
                res = _run(_worker_cmd("tmbx", case["id"], reps), env, timeout)
                res["prime_first_seconds"] = prime.get("first_seconds")
        elif tool in ("glmmTMB", "lme4"):
            pm = peer_model(case, tool)
            if pm is None:
                out[tool] = dict(ok=False, unsupported=True)
                print(" n/a")
                continue
            spec = dict(tool=tool, csv=case["csv"] or ladder_csv(case), levels=case["levels"],
                        factors=case["factors"], setup=R_SETUP.get(case["id"]), formula=pm["formula"],
                        family=case["family"], ziformula=case["ziformula"], dispformula=case["dispformula"],
                        REML=case["REML"], warmup=0 if large else 1, repeats=1 if large else 5)
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
                json.dump(spec, fh)
            try:
                res = _run(["Rscript", R_SCRIPT, fh.name], timeout=timeout, child_peak=True)
            finally:
                os.unlink(fh.name)
            res["formula"] = pm["formula"]
        else:
            if peer_model(case, tool) is None:
                out[tool] = dict(ok=False, unsupported=True)
                print(" n/a")
                continue
            reps = 5 if not large else (2 if tool == "glmm" else 1)
            if huge:
                reps = 1  # glmm: minutes per fit at 5e6
            if large and tool == "mixedlm":
                reps = 0  # a minute per fit on the ladder: the first fit only
            res = _run(_worker_cmd(tool, case["id"], reps), timeout=timeout)
        out[tool] = res
        if res.get("ok"):
            print(f" {_fmt(res.get('seconds', res.get('first_seconds')))} s  logLik {res.get('loglik'):.4f}  "
                  f"peak {_mb(res.get('peak_rss_mb'))} MB")
        else:
            print(" FAILED: " + str(res.get("error"))[:300])
    return out


def summarize(case: dict, res: dict) -> dict:
    """Agreement, ratios and targets of one case."""
    cold, warm = res.get("tmbx_cold", {}), res.get("tmbx_warm", {})
    base = next((r for r in (cold, warm) if r.get("ok")), None)
    s = {}
    if base is None:
        return s
    ll = base["loglik"]
    rep = statistics.median([r["seconds"] for r in (cold, warm) if r.get("ok") and "seconds" in r] or [float("nan")])
    s["tmbx_loglik"] = ll
    s["tmbx_repeated_seconds"] = rep
    if case.get("ref_loglik") is not None:
        s["tmbx_vs_reference_loglik"] = ll - case["ref_loglik"]
    s["agree"], s["ratio_vs_repeated"], s["ratio_vs_first_warm"], s["ratio_vs_first_cold"] = {}, {}, {}, {}
    # LARGE_LADDER: a peer not run here is represented by its published time (peers.json,
    # where all tools that finished agree on the logLik: agreement is tmbx's with that logLik)
    s["published"] = {}
    peer_t = {}
    for tool in PEERS:
        r = res.get(tool, {})
        if r.get("ok"):
            secs, agree = r["seconds"], abs(r["loglik"] - ll) < TOL
        elif tool in case.get("published_seconds", {}):
            secs = s["published"][tool] = case["published_seconds"][tool]
            agree = case.get("ref_loglik") is not None and abs(case["ref_loglik"] - ll) < TOL
        else:
            continue
        s["agree"][tool] = agree
        s["ratio_vs_repeated"][tool] = secs / rep
        if warm.get("ok"):
            s["ratio_vs_first_warm"][tool] = secs / warm["first_seconds"]
        if cold.get("ok"):
            s["ratio_vs_first_cold"][tool] = secs / cold["first_seconds"]
        if agree:
            peer_t[tool] = secs
    if peer_t:
        best = min(peer_t, key=peer_t.get)
        s["best_peer"] = best
        s["best_peer_seconds"] = peer_t[best]
    tg = {}
    if case["id"] == "insteval_crossed":
        if cold.get("ok"):
            tg["insteval_first_fit_cold_under_4s"] = cold["first_seconds"] < 4
        if warm.get("ok"):
            tg["insteval_first_fit_warm_under_4s"] = warm["first_seconds"] < 4
    elif case["source"] == "reference":
        if case.get("ref_glmmTMB_seconds"):
            tg["repeated_faster_than_ref_glmmTMB"] = rep < case["ref_glmmTMB_seconds"]
        if res.get("glmmTMB", {}).get("ok"):
            tg["repeated_faster_than_glmmTMB_now"] = rep < res["glmmTMB"]["seconds"]
        if cold.get("ok"):
            tg["first_fit_cold_under_3s"] = cold["first_seconds"] < 3
        if warm.get("ok"):
            tg["first_fit_warm_under_3s"] = warm["first_seconds"] < 3
    if case["source"] == "ladder" and peer_t:
        for nm, r in (("first_cold", cold), ("first_warm", warm)):
            if r.get("ok"):
                tg[f"5x_best_peer_{nm}"] = s["best_peer_seconds"] / r["first_seconds"] >= 5
        tg["5x_best_peer_repeated"] = s["best_peer_seconds"] / rep >= 5
    s["targets"] = tg
    return s


def _fmt(x, nd=2):
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x < 0.1 and nd >= 2:
        return f"{x:.3f}"
    return f"{x:.{nd}f}"


def _mb(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def print_table(results: dict, cases: dict):
    ids = [c for c in cases if c in results]
    print("\n== tmbx (seconds; fresh process per column; 'repeated' = fit.refit(), median)")
    hdr = f"{'case':24s} {'nobs':>7s} {'import':>6s} {'1st cold':>8s} {'1st warm':>8s} {'repeated':>8s} " \
          f"{'design':>6s} {'templ':>6s} {'fit':>6s} {'glmmTMB ref':>11s} {'logLik - ref':>12s}"
    print(hdr)
    for cid in ids:
        r, c = results[cid], cases[cid]
        cold, warm, s = r["tools"].get("tmbx_cold", {}), r["tools"].get("tmbx_warm", {}), r.get("summary", {})
        ph = cold.get("phases", {})
        d = s.get("tmbx_vs_reference_loglik")
        print(f"{cid:24s} {c['nobs']:>7d} {_fmt(cold.get('import_seconds')):>6s} "
              f"{_fmt(cold.get('first_seconds')):>8s} {_fmt(warm.get('first_seconds')):>8s} "
              f"{_fmt(s.get('tmbx_repeated_seconds'), 3):>8s} {_fmt(ph.get('design')):>6s} "
              f"{_fmt(ph.get('template')):>6s} {_fmt(ph.get('fit')):>6s} "
              f"{_fmt(c.get('ref_glmmTMB_seconds'), 3):>11s} {('%.1e' % d) if d is not None else '-':>12s}")
    print("\n== peers: fit seconds (measured now), ratio = peer / tmbx repeated fit, "
          "[ratio vs tmbx first fit, warm cache]; logLik agreement with tmbx (|diff| < 1e-3)")
    print(f"{'case':24s} " + " ".join(f"{t:>26s}" for t in PEERS))
    published = False
    for cid in ids:
        r, s = results[cid], results[cid].get("summary", {})
        cells = []
        for t in PEERS:
            x = r["tools"].get(t, {})
            pub = s.get("published", {}).get(t)
            if x.get("unsupported"):
                cells.append("n/a")
            elif not (x.get("ok") or pub):
                cells.append("FAILED" if x else "-")
            else:
                agree = "ok" if s.get("agree", {}).get(t) else "DIFF"
                secs = _fmt(x["seconds"]) if x.get("ok") else _fmt(pub) + "*"
                published |= not x.get("ok")
                cells.append(f"{secs} x{_fmt(s['ratio_vs_repeated'].get(t), 1)} "
                             f"[x{_fmt(s['ratio_vs_first_warm'].get(t), 2)}] {agree}")
        print(f"{cid:24s} " + " ".join(f"{c:>26s}" for c in cells))
    if published:
        print("* published, not re-run (peers.json; agreement: tmbx against its logLik)")
    print("\n== peak memory (MB): each worker's peak RSS (Python: its ru_maxrss; R: Rscript's, from the parent)")
    print(f"{'case':24s} " + " ".join(f"{t:>9s}" for t in TOOLS))
    published = False
    for cid in ids:
        r, c = results[cid]["tools"], cases[cid]
        cells = []
        for t in TOOLS:
            pub = c.get("published_peak_mb", {}).get(t)
            if r.get(t, {}).get("peak_rss_mb") is not None:
                cells.append(_mb(r[t]["peak_rss_mb"]))
            elif pub is not None and not r.get(t, {}).get("ok"):
                cells.append(_mb(pub) + "*")
                published = True
            else:
                cells.append("n/a" if r.get(t, {}).get("unsupported") else "-")
        print(f"{cid:24s} " + " ".join(f"{x:>9s}" for x in cells))
    if published:
        print("* published, not re-run (peers.json)")
    print("\n== targets")
    for cid in ids:
        tg = results[cid].get("summary", {}).get("targets", {})
        if tg:
            print(f"{cid:24s} " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in tg.items()))


def plot_ratios(results: dict, cases: dict, path: str):
    """Bar chart of peer time / tmbx time, one group of bars per case, log scale.

    Per peer (one colour) two bars: against tmbx's repeated fit (solid) and against
    its first fit in a fresh process with a warm cache (hatched), drawn from the line
    at 1: up, tmbx is faster. Cases whose peer times are published (not re-run) get a "*".
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        print(f"matplotlib is not installed: no plot ({path})")
        return
    ids = [c for c in cases if results.get(c, {}).get("summary", {}).get("ratio_vs_repeated")]
    if not ids:
        return
    colours = dict(zip(PEERS, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    kinds = [("ratio_vs_repeated", None, "against tmbx's repeated fit"),
             ("ratio_vs_first_warm", "///", "against tmbx's first fit (warm cache)")]
    width = 0.8 / (len(PEERS) * len(kinds))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.6 * len(ids) + 4), 5.5))
    for i, cid in enumerate(ids):
        s = results[cid]["summary"]
        for j, tool in enumerate(PEERS):
            for k, (key, hatch, _) in enumerate(kinds):
                v = s.get(key, {}).get(tool)
                if v:  # fixed slots: a peer that cannot fit the model leaves a gap
                    x = i - 0.4 + (j * len(kinds) + k + 0.5) * width
                    # from the line at 1 to the ratio: up where tmbx is faster, down where slower
                    ax.bar(x, v - 1, width, bottom=1, color=colours[tool], hatch=hatch, edgecolor="white",
                           linewidth=0)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(ids)))
    ax.set_xticklabels([cid + ("*" if results[cid]["summary"].get("published") else "") for cid in ids],
                       rotation=45, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(ids) - 0.4)
    ax.set_ylabel("peer time / tmbx time  (> 1: tmbx faster)")
    ax.set_title("tmbx.glmm against its peers" + ("  (* peer times published, not re-run)"
                                                  if any(results[c]["summary"].get("published") for c in ids) else ""))
    handles = [Patch(color=colours[t], label=t) for t in PEERS]
    handles += [Patch(facecolor="grey", hatch=h, edgecolor="white", label=lab) for _, h, lab in kinds]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"\nplot: {path}")


def cost_curves(results: dict, cases: dict) -> dict:
    """Fit time against N on the scale ladder: ``{kind: {tool: [(N, seconds, measured)]}}``.

    tmbx: its repeated fit (``tmbx``) and its first fit with a cold cache
    (``tmbx first (cold)``); a peer: its time measured here, else the time
    published in peers.json (``measured`` False)."""
    curves = {}
    for cid, case in cases.items():
        if case.get("source") != "ladder":
            continue
        n, tools = float(case["N"]), results.get(cid, {}).get("tools", {})
        kind = curves.setdefault(case["kind"], {})
        s = results.get(cid, {}).get("summary", {})
        if s.get("tmbx_repeated_seconds") and math.isfinite(s["tmbx_repeated_seconds"]):
            kind.setdefault("tmbx", []).append((n, s["tmbx_repeated_seconds"], True))
        cold = tools.get("tmbx_cold", {})
        if cold.get("ok") and cold.get("first_seconds"):
            kind.setdefault("tmbx first (cold)", []).append((n, cold["first_seconds"], True))
        published = {t: _published_seconds(v) for t, v in (case.get("ref_peer_seconds") or {}).items()}
        for tool in PEERS:
            r = tools.get(tool, {})
            if r.get("ok") and r.get("seconds"):
                kind.setdefault(tool, []).append((n, r["seconds"], True))
            elif tool in published:
                kind.setdefault(tool, []).append((n, published[tool], False))
    return {k: {t: sorted(v) for t, v in d.items()} for k, d in curves.items()}


def loglog_slope(points) -> float:
    """Least-squares slope of log(seconds) on log(N) (NaN with fewer than two sizes)."""
    import numpy as np  # not at module level: the workers time their own imports

    if len({p[0] for p in points}) < 2:
        return float("nan")
    x = np.log([p[0] for p in points])
    y = np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def plot_curves(results: dict, cases: dict, path: str):
    """Log-log plot of fit time against N per ladder kind, one line per tool with
    its fitted slope in the legend (open markers: published, not re-run); the
    slopes are printed too."""
    curves = cost_curves(results, cases)
    curves = {k: d for k, d in curves.items() if any(len(v) >= 2 for v in d.values())}
    if not curves:
        return
    print("\n== cost curves: slope of log(fit seconds) on log(N) over the ladder (1e5 to 5e6 rows)")
    for kind, d in curves.items():
        print(f"{kind:10s} " + "  ".join(f"{t} {loglog_slope(v):.2f} ({len(v)} sizes)" for t, v in d.items()
                                        if len(v) >= 2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot ({path})")
        return
    style = {"tmbx": ("black", "-"), "tmbx first (cold)": ("grey", "--"),
             **{t: (c, "-") for t, c in zip(PEERS, ["tab:blue", "tab:orange", "tab:green", "tab:red"])}}
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4.5), squeeze=False)
    for ax, (kind, d) in zip(axes[0], curves.items()):
        for tool, pts in d.items():
            if len(pts) < 2:
                continue
            colour, ls = style[tool]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, color=colour,
                    label=f"{tool} (slope {loglog_slope(pts):.2f})")
            for n, sec, measured in pts:
                ax.plot(n, sec, "o", color=colour, fillstyle="full" if measured else "none")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows N")
        ax.set_ylabel("fit seconds")
        ax.set_title(f"ladder: {kind}")
        ax.grid(which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("fit time against N (open markers: published times, not re-run)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def report(results: dict, cases: dict, out: str):
    """The tables, the ratio plot next to the JSON (glmm.json -> glmm_ratios.png) and,
    where the ladder has two sizes or more, the cost curves (glmm_curves.png)."""
    print_table(results, cases)
    plot_ratios(results, cases, os.path.splitext(out)[0] + "_ratios.png")
    plot_curves(results, cases, os.path.splitext(out)[0] + "_curves.png")


def _git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "tmbx", "families", "covstructs"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return head + (" + uncommitted changes in tmbx/families/covstructs" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small reference cases only")
    ap.add_argument("--large", action="store_true",
                    help="the 1e6- and 5e6-row ladder only (" + ", ".join(sorted(LARGE_LADDER)) + "; hours)")
    ap.add_argument("--peers-large", nargs="?", const="glmm", default="",
                    help="peers to run on the 1e6/5e6 ladder (alone: glmm); by default none, their published "
                         "times (peers.json) stand in")
    ap.add_argument("--cases", default=None, help="comma-separated case ids")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated: " + ",".join(TOOLS))
    ap.add_argument("--timeout", type=int, default=None,
                    help=f"seconds per subprocess (default {TIMEOUT}; {LARGE_TIMEOUT} on the 1e6/5e6 ladder)")
    ap.add_argument("--profile", action="store_true", help="tmbx_cold also splits trace/compile/run")
    ap.add_argument("--xla-workaround", action="store_true",
                    help=f"run tmbx workers with XLA_FLAGS={XLA_FLAG} (jaxlib 0.10.x LAPACK deadlock; off by "
                         "default, so that the default configuration is measured; a hung worker is stopped at --timeout)")
    ap.add_argument("--table", action="store_true", help="print the table of the saved results and exit")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cases = load_cases()
    global XLA_WORKAROUND
    XLA_WORKAROUND = args.xla_workaround

    if args.worker:
        case = cases[args.cases]
        {"tmbx": lambda: worker_tmbx(case, args.repeats, args.profile),
         "glmm": lambda: worker_glmm(case, args.repeats),
         "mixedlm": lambda: worker_mixedlm(case, args.repeats)}[args.worker]()
        return

    # a SIGTERM (`timeout`, a batch system) ends the driver through the same path as
    # ^C, which kills the running worker's process group: else the worker, in a
    # session of its own, runs on (on a GPU it kept the device's memory, and the
    # next case failed with CUDA out-of-memory)
    signal.signal(signal.SIGTERM, _interrupt)
    results = json.load(open(args.out)) if os.path.exists(args.out) else {}
    results.pop("_meta", None)
    if args.table:
        report(results, cases, args.out)
        return
    if args.cases:
        ids = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in ids if c not in cases]
        if unknown:
            sys.exit(f"unknown cases {unknown}; known: {', '.join(cases)}")
    elif args.large:
        ids = [c for c in cases if c in LARGE_LADDER]
    else:
        ids = [c for c in cases if c not in LARGE_LADDER and not (args.quick and c in LARGE)]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    peers_large = [t.strip() for t in args.peers_large.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS] + [t for t in peers_large if t not in PEERS]
    if unknown:
        sys.exit(f"unknown tools {unknown}; known: {', '.join(TOOLS)}")
    for cid in ids:
        case = cases[cid]
        load = os.getloadavg()[0]
        t = time.perf_counter()
        timeout = args.timeout or (LARGE_TIMEOUT if cid in LARGE_LADDER else TIMEOUT)
        res = run_case(case, tools, timeout, args.profile, peers_large)
        prev = results.get(cid, {}).get("tools", {})
        prev.update(res)  # a run of some tools keeps the others' earlier results
        results[cid] = dict(case={k: v for k, v in case.items() if k not in ("csv", "levels")},
                            tools=prev, loadavg_1min_at_start=load, xla_workaround=XLA_WORKAROUND, measured=time.strftime("%Y-%m-%d %H:%M"),
                            bench_seconds=time.perf_counter() - t)
        results[cid]["summary"] = summarize(case, prev)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        meta = dict(machine=f"{os.cpu_count()} cores", python=sys.version.split()[0], checkout=_git_state(),
                    xla_workaround=XLA_WORKAROUND,
                    note="fresh process per tool and measurement; peers timed side by side; ratios peer/tmbx")
        with open(args.out, "w") as fh:
            json.dump({"_meta": meta, **results}, fh, indent=1, default=float)
    report(results, cases, args.out)


if __name__ == "__main__":
    main()
