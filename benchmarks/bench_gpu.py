"""The accelerator figures: batch refits and batch fits on one GPU.

    python benchmarks/bench_gpu.py --out DIR                         # every section
    python benchmarks/bench_gpu.py --out DIR --sections boot --nsim 2000 --genes 200   # a small run (CPU too)
    python benchmarks/bench_gpu.py --out DIR --sections env,tests,ar1xar1   # the engine core on the device

Sections, each written to ``DIR/<section>.json`` as soon as it ends (a run
stopped at its time limit keeps what it finished):

- ``env``: the JAX version and devices;
- ``boot``: ``nsim`` parametric-bootstrap refits of a Poisson GLMM with 1,000
  groups of 10 (`bench_inference.bench_scale`), for each ``--boot-batch``;
- ``genes``: ``tmbx.glmm_batch`` on ``--genes`` genes x 5,000 cells (NB2, random
  donor intercept; `bench_genes.genes_frame`, drawn in memory), a first call
  (compilation included) and a second one;
- ``glmm``: `bench_glmm.py` with tmbx alone (cold and warm persistent cache,
  a fresh process each) on ``--glmm-cases``;
- ``ar1xar1``: `bench_ar1xar1.py` with tmbx alone (``--skip-tmb``: the device
  machine has no R; TMB's CPU figures are in benchmarks/README) on
  ``--ar1-sizes``: first fit without a cache, with an empty and a warm one,
  repeated fits, ``sdreport``;
- ``tests``: ``pytest -q`` on ``--tests`` (the engine core's and the glmmTMB
  reference cases' by default), stopped after ``--tests-timeout`` seconds; its
  summary line and failures;
- ``trace``: where the time of one fit goes, on ``--trace-case``: the jitted
  pieces of one Laplace evaluation at the optimum (`_profile.profile_model`),
  then a `jax.profiler` trace of one objective+gradient and of one refit,
  summed by kernel name per device stream (the ``--top`` largest).

The CPU figures to compare with come from the same functions on the CPU
(``bench_genes.py --genes 20000 --no-peers --inproc``; ``bench_inference.py
--only-scale``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _write(out, name, res):
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=float)
    print(name, json.dumps(res, default=float)[:1500], flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default="env,boot,genes,glmm")
    ap.add_argument("--nsim", type=int, default=10_000)
    ap.add_argument("--boot-batch", default="10000", help="comma-separated bootstrap batch sizes")
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--cells", type=int, default=5_000)
    ap.add_argument("--glmm-cases", default="ladder_single_1e5,ladder_crossed_1e5,ladder_crossbin_1e5,insteval_crossed")
    ap.add_argument("--trace-case", default="ladder_crossbin_1e5")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--ar1-sizes", default="50,100")
    ap.add_argument("--tests", default="tests/test_engine.py tests/test_internals.py tests/test_reference_cases.py")
    ap.add_argument("--tests-timeout", type=int, default=400)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    sections = args.sections.split(",")
    import jax

    import tmbx  # noqa: F401  (float64 on)

    if "env" in sections:
        _write(args.out, "env", dict(jax=jax.__version__, backend=jax.default_backend(),
                                     devices=[str(d) for d in jax.devices()],
                                     kind=getattr(jax.devices()[0], "device_kind", "")))
    if "boot" in sections:
        from bench_inference import bench_scale

        res = {}
        for b in (int(v) for v in args.boot_batch.split(",")):
            res[f"batch_{b}"] = bench_scale(nsim=args.nsim, batch=b)
            _write(args.out, "boot", res)
    if "genes" in sections:
        from bench_genes import genes_frame, time_glmm_batch

        t = time.perf_counter()
        df = genes_frame(args.genes, args.cells)
        gen = time.perf_counter() - t
        res = time_glmm_batch(df, device=None)
        res["loglik_finite"] = int(sum(v == v and abs(v) < float("inf") for v in res.pop("loglik").values()))
        _write(args.out, "genes", dict(cells=args.cells, generate_seconds=gen, **res))
    if "ar1xar1" in sections:
        out = os.path.join(args.out, "ar1xar1_full.json")
        r = subprocess.run([sys.executable, os.path.join(HERE, "bench_ar1xar1.py"), "--skip-tmb", "--sizes",
                            *args.ar1_sizes.split(","), "--out", out], capture_output=True, text=True)
        print(r.stdout[-4000:], r.stderr[-2000:], flush=True)
    if "tests" in sections:
        _write(args.out, "tests", run_tests(args.tests.split(), args.tests_timeout))
    if "trace" in sections:
        _write(args.out, "trace", trace_case(args.trace_case, args.top))
    if "glmm" in sections:
        out = os.path.join(args.out, "glmm.json")
        r = subprocess.run([sys.executable, os.path.join(HERE, "bench_glmm.py"), "--cases", args.glmm_cases,
                            "--tools", "tmbx_cold,tmbx_warm", "--out", out], capture_output=True, text=True)
        print(r.stdout[-4000:], r.stderr[-2000:], flush=True)


def run_tests(paths, timeout: int) -> dict:
    """``pytest -q`` on ``paths`` from the checkout's root, on this machine's
    default JAX backend; the summary line, the failures and the seconds."""
    import jax

    root = os.path.dirname(HERE)
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths],
                           cwd=root, capture_output=True, text=True, timeout=timeout)
        out, code = r.stdout, r.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        code = "timeout"
    lines = out.strip().splitlines()
    return dict(backend=jax.default_backend(), paths=paths, returncode=code,
                seconds=time.perf_counter() - t, summary=lines[-1] if lines else "",
                failures=[ln for ln in lines if ln.startswith(("FAILED", "ERROR"))])


def _kernel_totals(trace_dir: str, top: int) -> dict:
    """Sum a perfetto trace's complete events by name, per process (device stream or host)."""
    import glob
    import gzip
    from collections import defaultdict

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    paths += sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        return {"error": f"no trace file under {trace_dir}"}
    events = json.load(gzip.open(paths[-1]))
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    pname = {e["pid"]: e.get("args", {}).get("name", str(e["pid"]))
             for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    tot = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            t = tot[pname.get(e.get("pid"), str(e.get("pid")))][e.get("name", "?")]
            t[0] += float(e["dur"]) * 1e-6
            t[1] += 1
    out = {}
    for proc, names in tot.items():
        rows = sorted(names.items(), key=lambda kv: -kv[1][0])
        out[proc] = dict(total_seconds=sum(v[0] for v in names.values()), events=sum(v[1] for v in names.values()),
                         top=[(k, round(v[0], 6), v[1]) for k, v in rows[:top]])
    return out


def trace_case(case_id: str, top: int) -> dict:
    import jax

    import tmbx
    from _profile import profile_model
    from bench_glmm import _read_frame, load_cases

    case = load_cases()[case_id]
    df = tmbx.load_dataset(case["dataset"]) if case["source"] == "reference" else _read_frame(case)
    kw = dict(family=case["family"], ziformula=case["ziformula"], dispformula=case["dispformula"], reml=case["REML"])
    t = time.perf_counter()
    fit = tmbx.glmm(case["python_formula"], df, **kw)
    res = dict(case=case_id, first_seconds=time.perf_counter() - t, loglik=float(fit.loglik),
               layout=getattr(getattr(fit.model.laplace, "layout", None), "kind", None))
    t = time.perf_counter()
    fit.refit()
    res["refit_seconds"] = time.perf_counter() - t
    res["pieces"] = profile_model(fit.model, fit._fit.x, fit._fit.u)
    m = fit.model
    x, u = jax.numpy.asarray(fit._fit.x), jax.numpy.asarray(fit._fit.u)
    vg = jax.jit(m._vg)
    jax.block_until_ready(vg(x, u, m.data))
    for name, call in (("value_grad", lambda: jax.block_until_ready(vg(x, u, m.data))),
                       ("refit", lambda: fit.refit())):
        d = tempfile.mkdtemp(prefix=f"tmbx-trace-{name}-")  # deep folders: keep them out of --out
        t = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            call()
        res[f"{name}_traced_seconds"] = time.perf_counter() - t
        res[f"{name}_kernels"] = _kernel_totals(d, top)
    return res


if __name__ == "__main__":
    main()
