"""Benchmark: TMB's ar1xar1 example, TMB (C++/R) against tmbx, on n x n lattices.

    python benchmarks/bench_ar1xar1.py                 # n = 50 and 100
    python benchmarks/bench_ar1xar1.py --sizes 100 --repeats 5

Every measurement runs in a fresh process (one at a time):

- TMB: ``ar1xar1.cpp`` is compiled once with ``TMB::compile`` in a temporary
  directory (reported separately); then, per lattice, one ``Rscript
  tmb_ar1xar1.R fit`` process times ``MakeADFun``, ``nlminb`` and ``sdreport``
  and a few repeated ``nlminb`` runs from the same start.
- tmbx: the template of ``examples/tmb_ar1xar1.py``. Per lattice, three
  processes: (1) ``TMBX_NO_CACHE=1`` (no persistent compilation cache: the
  true first-fit cost), (2) an empty, dedicated cache directory (compiles and
  writes the cache), (3) the same directory again (warm cache). Each times
  ``import tmbx``, the model build (sparsity detection, colouring, layout),
  the first fit (XLA compile included), ``sdreport`` (fixed and random
  standard errors) and repeated fits in the same process.

The data are simulated once, deterministically, by ``simulate_lattice`` of
the example and written to ``benchmarks/data/ar1xar1_<n>.csv``, which both
sides read. The log-likelihoods must agree to 1e-4. Results:
``benchmarks/results/ar1xar1.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(HERE, "data")
RESULTS = os.path.join(HERE, "results")
SEED = {50: 50, 100: 100}
TARGET_FIRST = 1.0  # tmbx first fit (compile included) <= TMB's time
TARGET_REPEAT = 2.0  # tmbx repeated fit >= 2x faster than TMB's


# ----------------------------------------------------------------------------- data
def data_path(n: int) -> str:
    return os.path.join(DATA, f"ar1xar1_{n}.csv")


def make_data(n: int) -> str:
    """Simulate counts on an n x n lattice once (deterministic seed) into a CSV."""
    path = data_path(n)
    if os.path.exists(path):
        return path
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import numpy as np
    import pandas as pd
    from tmb_ar1xar1 import simulate_lattice

    N = simulate_lattice(n, phi1=0.8, phi2=0.9, seed=SEED.get(n, n))
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    df = pd.DataFrame(dict(N=N.ravel(order="F").astype(int), i=i.ravel(order="F"), j=j.ravel(order="F")))
    os.makedirs(DATA, exist_ok=True)
    df.to_csv(path, index=False)
    return path


# --------------------------------------------------------------------------- worker
def worker(csv: str, repeats: int, profile: bool = False) -> dict:
    """One fresh tmbx process: import, build, first fit, sdreport, repeated fits."""
    t0 = time.perf_counter()
    import numpy as np
    import pandas as pd

    import jax
    import tmbx  # noqa: F401  (import time is part of the measurement)

    t_import = time.perf_counter() - t0
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from tmb_ar1xar1 import build_from_counts

    df = pd.read_csv(csv)
    n1, n2 = int(df["i"].max()) + 1, int(df["j"].max()) + 1
    N = np.zeros((n1, n2))
    N[df["i"], df["j"]] = df["N"]

    t = time.perf_counter()
    model = build_from_counts(N)
    t_build = time.perf_counter() - t
    t, c = time.perf_counter(), time.process_time()
    fit = model.fit()
    t_fit, c_fit = time.perf_counter() - t, time.process_time() - c
    t = time.perf_counter()
    rep = fit.sdreport()
    se = {k: float(v) for k, v in rep.se.items()}
    t_sd_fixed = time.perf_counter() - t
    _ = rep.se_random
    t_sd = time.perf_counter() - t
    # the fit is compiled in tiers (tmbx/_tiered.py): the optimized program may
    # still be compiling in the background; the repeats time it
    wait = getattr(model._fit_core, "wait", None)
    tier_wait = wait() if wait is not None else 0.0
    reps, cpus, lls = [], [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        f2 = model.fit()
        reps.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        lls.append(f2.loglik)
    lay = model.laplace.layout
    prof = None
    if profile:
        sys.path.insert(0, HERE)
        from _profile import print_profile, profile_model

        prof = profile_model(model, fit.x, fit.u)
        print_profile(prof, f"jitted pieces at the optimum ({n1} x {n2}):")
    return dict(profile=prof,
        n1=n1, n2=n2, n_random=int(model.space.n_u),
        import_s=t_import, build_s=t_build, first_fit_s=t_fit, build_plus_fit_s=t_build + t_fit,
        sdreport_fixed_s=t_sd_fixed, sdreport_s=t_sd,
        repeat_fit_s=reps, tier_wait_s=tier_wait, repeat_fit_cpu_s=cpus, repeat_loglik=lls, first_fit_cpu_s=c_fit,
        loadavg_end=os.getloadavg()[0],
        loglik=fit.loglik, converged=bool(fit.converged), status=fit.status, message=fit.message,
        iterations=fit.iterations, max_grad=float(np.max(np.abs(fit.gradient))),
        par={k: float(v) for k, v in fit.par.items()}, se=se,
        phi={"phi1": float(np.tanh(fit.par["transf_phi1"])), "phi2": float(np.tanh(fit.par["transf_phi2"]))},
        layout=dict(kind=lay.kind, **{a: int(getattr(lay, a)) for a in ("n", "s", "nb", "m", "k", "t", "c")
                                      if hasattr(lay, a)}),
        num_colors=int(getattr(model.laplace.hessian, "num_colors", -1)),
        cache=("off" if os.environ.get("TMBX_NO_CACHE") else os.environ.get("TMBX_CACHE_DIR", "default")),
        jax_version=jax.__version__, backend=jax.default_backend(),
        maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


# --------------------------------------------------------------------------- driver
def _last_json(out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON in output:\n{out[-2000:]}")


def run(cmd, env=None, timeout=900) -> dict:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    res = _last_json(p.stdout)
    res["process_wall_s"] = wall
    return res


def tmbx_process(csv, repeats, cache_dir=None, profile=False) -> dict:
    env = dict(os.environ)
    env.pop("TMBX_NO_CACHE", None)
    env.pop("TMBX_CACHE_DIR", None)
    if cache_dir is None:
        env["TMBX_NO_CACHE"] = "1"
    else:
        env["TMBX_CACHE_DIR"] = cache_dir
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", csv, "--repeats", str(repeats)]
    return run(cmd + (["--profile"] if profile else []), env=env)


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100])
    ap.add_argument("--repeats", type=int, default=3, help="repeated fits in the same process")
    ap.add_argument("--worker", metavar="CSV", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true",
                    help="also time the jitted pieces of one Laplace evaluation (in the no-cache process)")
    ap.add_argument("--skip-tmb", action="store_true", help="tmbx only")
    ap.add_argument("--tmb-build", metavar="DIR",
                    help="reuse a directory where ar1xar1.cpp was compiled before (default: compile in a temp dir)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "ar1xar1.json"))
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats, args.profile)))
        return

    os.makedirs(RESULTS, exist_ok=True)
    results = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                                python=sys.version.split()[0]), sizes={})
    reuse = args.tmb_build and os.path.exists(os.path.join(args.tmb_build, "ar1xar1.so"))
    build = args.tmb_build or tempfile.mkdtemp(prefix="tmbx_bench_tmb_")
    try:
        if not args.skip_tmb and not reuse:
            print(f"compiling ar1xar1.cpp with TMB::compile in {build} ...", flush=True)
            results["tmb_compile"] = run(["Rscript", os.path.join(HERE, "tmb_ar1xar1.R"), "compile", build])
        for n in args.sizes:
            csv = make_data(n)
            r = dict(csv=os.path.relpath(csv, ROOT), load_before=loadavg())
            if not args.skip_tmb:
                print(f"[n={n}] TMB (fresh R process) ...", flush=True)
                r["tmb"] = run(["Rscript", os.path.join(HERE, "tmb_ar1xar1.R"), "fit", build, csv,
                                str(args.repeats)])
            print(f"[n={n}] tmbx, no persistent cache (TMBX_NO_CACHE=1) ...", flush=True)
            r["tmbx_nocache"] = tmbx_process(csv, args.repeats, profile=args.profile)
            cache = tempfile.mkdtemp(prefix="tmbx_bench_cache_")
            try:
                print(f"[n={n}] tmbx, empty cache (compile + write) ...", flush=True)
                r["tmbx_cache_fill"] = tmbx_process(csv, args.repeats, cache)
                print(f"[n={n}] tmbx, warm cache ...", flush=True)
                r["tmbx_warm"] = tmbx_process(csv, args.repeats, cache)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            r["load_after"] = loadavg()
            results["sizes"][str(n)] = r
    finally:
        if not args.tmb_build:
            shutil.rmtree(build, ignore_errors=True)

    summarize(results)
    if args.profile:
        sys.path.insert(0, HERE)
        from _profile import print_profile

        for n, r in results["sizes"].items():
            if r["tmbx_nocache"].get("profile"):
                print_profile(r["tmbx_nocache"]["profile"], f"\n{n} x {n}: jitted pieces at the optimum")
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"\nwrote {os.path.relpath(args.out, os.getcwd())}")


def summarize(results):
    comp = results.get("tmb_compile", {}).get("compile_s")
    if comp is not None:
        print(f"\nTMB one-time C++ compile: {comp:.1f} s (excluded below)")
    hdr = (f"{'n':>4} {'n_u':>6} {'method':<26} {'build':>7} {'fit':>7} {'build+fit':>9} "
           f"{'sdrep':>6} {'repeat':>7} {'proc':>6} {'RSS MB':>7} {'logLik':>14}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for n, r in results["sizes"].items():
        tmb = r.get("tmb")
        rows = []
        if tmb:
            rows.append(("TMB MakeADFun+nlminb", tmb["make_s"], tmb["nlminb_s"], tmb["sdreport_s"],
                         min(tmb["repeat_fresh_s"] or [float("nan")]), tmb["process_wall_s"], float("nan"),
                         tmb["loglik"], tmb["n_random"]))
        for key, label in (("tmbx_nocache", "tmbx (no cache)"), ("tmbx_cache_fill", "tmbx (empty cache)"),
                           ("tmbx_warm", "tmbx (warm cache)")):
            x = r[key]
            rows.append((label, x["build_s"], x["first_fit_s"], x["sdreport_s"], min(x["repeat_fit_s"]),
                         x["process_wall_s"], x["maxrss_mb"], x["loglik"], x["n_random"]))
        for label, b, f, sd, rep, proc, rss, ll, nu in rows:
            print(f"{n:>4} {nu:>6} {label:<26} {b:7.2f} {f:7.2f} {b + f:9.2f} {sd:6.2f} {rep:7.3f} "
                  f"{proc:6.1f} {rss:7.0f} {ll:14.6f}")
        if tmb:
            x0, xw = r["tmbx_nocache"], r["tmbx_warm"]
            tmb_total = tmb["make_s"] + tmb["nlminb_s"]
            tmb_rep = min(tmb["repeat_fresh_s"])
            x_rep = min(min(r[k]["repeat_fit_s"]) for k in ("tmbx_nocache", "tmbx_cache_fill", "tmbx_warm"))
            dll = max(abs(r[k]["loglik"] - tmb["loglik"]) for k in ("tmbx_nocache", "tmbx_cache_fill", "tmbx_warm"))
            ratios = dict(
                tmb_first_s=tmb_total, tmb_repeat_s=tmb_rep,
                tmb_repeat_same_obj_s=min(tmb["repeat_same_obj_s"]),
                tmbx_first_nocache_s=x0["build_plus_fit_s"], tmbx_first_warm_s=xw["build_plus_fit_s"],
                tmbx_repeat_s=x_rep,
                first_fit_nocache_over_tmb=x0["build_plus_fit_s"] / tmb_total,
                first_fit_warm_over_tmb=xw["build_plus_fit_s"] / tmb_total,
                tmb_first_over_tmbx_repeat=tmb_total / x_rep,
                tmb_repeat_over_tmbx_repeat=tmb_rep / x_rep,
                tmb_repeat_same_obj_over_tmbx_repeat=min(tmb["repeat_same_obj_s"]) / x_rep,
                loglik_max_abs_diff=dll,
                loglik_ok=dll < 1e-4,
                phi_tmb=[tmb["phi"]["phi1"], tmb["phi"]["phi2"]],
                phi_tmbx=[x0["phi"]["phi1"], x0["phi"]["phi2"]],
                se_tmb=tmb["se"], se_tmbx=x0["se"],
                tmb_repeat_cpu_s=min(tmb.get("repeat_fresh_cpu_s") or [float("nan")]),
                tmbx_repeat_cpu_s=min(min(r[k].get("repeat_fit_cpu_s") or [float("nan")])
                                      for k in ("tmbx_nocache", "tmbx_cache_fill", "tmbx_warm")),
                loadavg=[r.get("load_before"), r.get("load_after")],
            )
            ratios["first_fit_target_met"] = ratios["first_fit_nocache_over_tmb"] <= TARGET_FIRST
            ratios["repeat_target_met"] = ratios["tmb_repeat_over_tmbx_repeat"] >= TARGET_REPEAT
            r["ratios"] = ratios
            print(f"     first fit, tmbx / TMB: {ratios['first_fit_nocache_over_tmb']:.2f} (no cache), "
                  f"{ratios['first_fit_warm_over_tmb']:.2f} (warm cache)  [target <= {TARGET_FIRST}]")
            print(f"     repeated fit, TMB / tmbx: {ratios['tmb_repeat_over_tmbx_repeat']:.2f} (TMB fresh MakeADFun+nlminb), "
                  f"{ratios['tmb_first_over_tmbx_repeat']:.2f} (TMB first fit), "
                  f"{ratios['tmb_repeat_same_obj_over_tmbx_repeat']:.2f} (TMB nlminb on the same obj, "
                  f"warm inner start)  [target >= {TARGET_REPEAT}]")
            print(f"     CPU seconds (all threads) of a repeated fit: TMB {ratios['tmb_repeat_cpu_s']:.2f}, "
                  f"tmbx {ratios['tmbx_repeat_cpu_s']:.2f}; 1-min load average {r.get('load_before', 0):.1f} "
                  f"-> {r.get('load_after', 0):.1f} on {results['machine']['cpus']} cores")
            print(f"     |logLik(tmbx) - logLik(TMB)| = {dll:.2e} {'OK' if ratios['loglik_ok'] else 'MISMATCH'} "
                  f"(< 1e-4); phi TMB {ratios['phi_tmb'][0]:.6f} {ratios['phi_tmb'][1]:.6f}, "
                  f"tmbx {ratios['phi_tmbx'][0]:.6f} {ratios['phi_tmbx'][1]:.6f}")
    print("build: MakeADFun / tmbx.Model(...); fit: nlminb / first Model.fit (XLA compile included); "
          "sdrep: sdreport incl. random-effect SEs;\nrepeat: best repeated fit in the same process "
          "(TMB: fresh MakeADFun + nlminb); proc: whole fresh process wall time (R/Python start-up, "
          "imports, data, everything)")


if __name__ == "__main__":
    main()
