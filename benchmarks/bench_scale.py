"""Benchmark: Poisson GLMMs with very many latent effects (tmbx templates).

    python benchmarks/bench_scale.py                     # all cases
    python benchmarks/bench_scale.py --cases a_lg b_lg --profile

Cases (each fitted in a fresh process, one at a time, so that the process's
peak resident memory ``ru_maxrss`` belongs to that case alone):

- ``a_generic``: one grouping factor with 200,000 levels, 1,000,000 rows,
  ``log mu = b0 + b1 x + u[g]``, ``u ~ N(0, sigma^2)``, written as a plain
  template ``nll(p, d)`` (Hessian pattern read off the jaxpr and coloured).
- ``a_lg``: the same model declared as a `tmbx.LatentGaussian`
  (``H = J' W J + Q``).
- ``b_lg``: two crossed factors, 50,000 x 2,000 levels, 500,000 rows,
  ``log mu = b0 + b1 x + u[a] + v[b]``, declared as a `LatentGaussian`.

Per case: model build time, first fit (XLA compile included, persistent cache
off unless ``--cache``), repeated fits in the same process, peak RSS (after
import, after build, at the end), the latent Hessian's layout and its sizes,
whether a dense ``n_u x n_u`` matrix could have been allocated (peak RSS
against ``8 n_u^2`` bytes), and the estimates against the simulated truth
(with their standard errors). ``--profile`` also times the jitted pieces of
one Laplace evaluation. Results: ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

CASES = {
    "a_generic": dict(kind="one", template="generic", n_levels=200_000, n_rows=1_000_000),
    "a_lg": dict(kind="one", template="latent_gaussian", n_levels=200_000, n_rows=1_000_000),
    "b_lg": dict(kind="crossed", template="latent_gaussian", n_a=50_000, n_b=2_000, n_rows=500_000),
}
# jaxlib 0.10.x's CPU LAPACK kernels (batched trsm/potrf) split the batch over XLA's intra-op
# thread pool and block waiting for it; when as many such calls run concurrently as the pool has
# threads (2 on a 2-core machine), the process deadlocks (see README). Serializing XLA:CPU's
# schedule avoids it in our runs.
XLA_WORKAROUND = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
TRUTH = dict(beta=[0.5, 0.3], sigma=0.6, sigma_a=0.6, sigma_b=0.4)


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_T0 = time.perf_counter()


def _log(msg):
    """Progress on stderr (the driver shows it when a case fails or times out)."""
    print(f"[{time.perf_counter() - _T0:7.1f} s, peak RSS {_rss_mb():6.0f} MB] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- templates
def simulate(case: dict, seed: int = 1):
    import numpy as np
    from scipy.special import gammaln

    rng = np.random.default_rng(seed)
    n = case["n_rows"]
    x = rng.normal(size=n)
    b0, b1 = TRUTH["beta"]
    if case["kind"] == "one":
        q = case["n_levels"]
        g = rng.permutation(np.arange(n) % q)  # every level observed (n / q rows each)
        u = rng.normal(0.0, TRUTH["sigma"], q)
        eta = b0 + b1 * x + u[g]
        idx = dict(g=g.astype(np.int32))
        u_true = u
    else:
        na, nb = case["n_a"], case["n_b"]
        a = rng.permutation(np.arange(n) % na)
        b = rng.integers(0, nb, n)
        ua = rng.normal(0.0, TRUTH["sigma_a"], na)
        ub = rng.normal(0.0, TRUTH["sigma_b"], nb)
        eta = b0 + b1 * x + ua[a] + ub[b]
        idx = dict(a=a.astype(np.int32), b=b.astype(np.int32))
        u_true = np.concatenate([ua, ub])
    y = rng.poisson(np.exp(eta)).astype(float)
    return dict(y=y, x=x, lgy=gammaln(y + 1), **idx), u_true


def build_model(case: dict, data: dict):
    import jax.numpy as jnp
    import numpy as np

    import tmbx

    def gauss_nll(u, log_sd):
        # -sum log N(u; 0, exp(log_sd)^2)
        return 0.5 * jnp.sum(u**2) * jnp.exp(-2 * log_sd) + u.shape[0] * (log_sd + 0.5 * np.log(2 * np.pi))

    def pois_nll(eta, d):
        return -(d["y"] * eta - jnp.exp(eta) - d["lgy"])

    if case["kind"] == "one":
        q = case["n_levels"]
        params = dict(beta=np.zeros(2), log_sigma=0.0, u=np.zeros(q))

        def eta(p, d):
            return p["beta"][0] + p["beta"][1] * d["x"] + p["u"][d["g"]]

        def latent(p, d):
            return gauss_nll(p["u"], p["log_sigma"])
    else:
        na, nb = case["n_a"], case["n_b"]
        params = dict(beta=np.zeros(2), log_sigma_a=0.0, log_sigma_b=0.0, u=np.zeros(na + nb))

        def eta(p, d):
            return p["beta"][0] + p["beta"][1] * d["x"] + p["u"][d["a"]] + p["u"][na + d["b"]]

        def latent(p, d):
            return gauss_nll(p["u"][:na], p["log_sigma_a"]) + gauss_nll(p["u"][na:], p["log_sigma_b"])

    if case["template"] == "generic":
        def nll(p, d):
            return jnp.sum(pois_nll(eta(p, d), d)) + latent(p, d)

        return tmbx.Model(nll, params, data=data, random=["u"])
    lg = tmbx.LatentGaussian(eta=eta, obs_nll=lambda e, p, d: pois_nll(e, d), latent_nll=latent)
    return tmbx.Model(None, params, data=data, random=["u"], latent_gaussian=lg)


def truth_of(case):
    import math

    if case["kind"] == "one":
        return {"beta[0]": TRUTH["beta"][0], "beta[1]": TRUTH["beta"][1], "log_sigma": math.log(TRUTH["sigma"])}
    return {"beta[0]": TRUTH["beta"][0], "beta[1]": TRUTH["beta"][1],
            "log_sigma_a": math.log(TRUTH["sigma_a"]), "log_sigma_b": math.log(TRUTH["sigma_b"])}


# ------------------------------------------------------------------------- worker
def profile_only(name: str) -> dict:
    """Build the model and time its jitted pieces at the start values (no fit)."""
    import jax.numpy as jnp

    from _profile import print_profile, profile_model

    case = CASES[name]
    data, _ = simulate(case)
    model = build_model(case, data)
    _log("built; profiling at the start values")
    x = jnp.asarray(model.par)
    u, _, _ = model.laplace.newton(x, jnp.asarray(model.space.start("u")), model.data)
    prof = profile_model(model, x, u)
    print_profile(prof, f"{name}: jitted pieces at the start values")
    return dict(case=name, profile=prof)


def worker(name: str, repeats: int, profile: bool) -> dict:
    t0 = time.perf_counter()
    import jax
    import numpy as np

    import tmbx  # noqa: F401

    res = dict(case=name, **CASES[name])
    res["import_s"] = time.perf_counter() - t0
    res["rss_after_import_mb"] = _rss_mb()
    case = CASES[name]
    t = time.perf_counter()
    data, u_true = simulate(case)
    res["simulate_s"] = time.perf_counter() - t
    res["rss_after_data_mb"] = _rss_mb()

    _log("data simulated; building the model")
    t = time.perf_counter()
    model = build_model(case, data)
    res["build_s"] = time.perf_counter() - t
    res["rss_after_build_mb"] = _rss_mb()
    lap = model.laplace
    lay = lap.layout
    res["n_u"] = int(model.space.n_u)
    res["layout"] = dict(kind=lay.kind, **{a: int(getattr(lay, a)) for a in ("n", "m", "k", "t", "c", "s", "nb")
                                           if hasattr(lay, a)}, storage_doubles=int(lay.size))
    hess = lap.hessian
    res["colors"] = int(getattr(hess, "num_colors", getattr(getattr(hess, "jcoloring", None), "num_colors", -1)))
    res["hessian_evaluator"] = type(hess).__name__

    _log(f"built: layout {res['layout']}; first fit")
    t = time.perf_counter()
    fit = model.fit()
    res["first_fit_s"] = time.perf_counter() - t
    res["rss_after_first_fit_mb"] = _rss_mb()
    _log(f"first fit {res['first_fit_s']:.1f} s, {fit.iterations} evaluations, loglik {fit.loglik:.4f}")
    reps = []
    for _ in range(repeats):
        t = time.perf_counter()
        f2 = model.fit()
        reps.append(time.perf_counter() - t)
        _log(f"repeated fit {reps[-1]:.1f} s")
    res["repeat_fit_s"] = reps
    res["repeat_loglik"] = [f2.loglik] if repeats else []
    t = time.perf_counter()
    rep = fit.sdreport()
    se = dict(zip(rep.labels, np.sqrt(np.diag(rep.cov_fixed))))
    res["sdreport_fixed_s"] = time.perf_counter() - t

    labels = list(model.space.labels["x"])
    est = dict(zip(labels, map(float, fit.x)))
    truth = truth_of(case)
    res.update(
        loglik=fit.loglik, converged=bool(fit.converged), status=fit.status, message=fit.message,
        iterations=fit.iterations, max_grad=float(np.max(np.abs(fit.gradient))),
        estimates=est, se={k: float(v) for k, v in se.items()}, truth=truth,
        z={k: (est[k] - truth[k]) / float(se[k]) for k in truth},
    )
    res["recovered"] = bool(all(abs(z) < 4 for z in res["z"].values()))
    res["corr_u_true"] = float(np.corrcoef(fit.u, u_true)[0, 1])  # conditional modes vs simulated effects
    if profile:
        from _profile import profile_model

        _log("profiling the jitted pieces")
        res["profile"] = profile_model(model, fit.x, fit.u)
    res["peak_rss_mb"] = _rss_mb()
    res["dense_hessian_mb"] = 8 * res["n_u"] ** 2 / 2**20
    res["no_dense_hessian"] = res["peak_rss_mb"] < 0.05 * res["dense_hessian_mb"]
    res["jax_version"] = jax.__version__
    res["cache"] = "off" if os.environ.get("TMBX_NO_CACHE") else "on"
    res["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return res


# ------------------------------------------------------------------------- driver
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="time the jitted pieces of one evaluation")
    ap.add_argument("--cache", action="store_true", help="keep JAX's persistent cache on (default: off)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per case")
    ap.add_argument("--no-xla-workaround", action="store_true",
                    help=f"do not add {XLA_WORKAROUND} to XLA_FLAGS (jaxlib 0.10.x may then deadlock, see README)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--profile-only", metavar="CASE", help="build CASE and time its jitted pieces (no fit)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "scale.json"))
    args = ap.parse_args()

    if args.profile_only:
        sys.path.insert(0, HERE)
        res = profile_only(args.profile_only)
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, f"profile_{args.profile_only}.json"), "w") as fh:
            json.dump(res, fh, indent=1)
        return
    if args.worker:
        sys.path.insert(0, HERE)
        print(json.dumps(worker(args.worker, args.repeats, args.profile)))
        return

    os.makedirs(RESULTS, exist_ok=True)
    results = {}
    if os.path.exists(args.out):  # keep other cases' results from earlier runs
        with open(args.out) as fh:
            results = json.load(fh)
    env = dict(os.environ)
    if not args.cache:
        env["TMBX_NO_CACHE"] = "1"
    if not args.no_xla_workaround:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + XLA_WORKAROUND).strip()
    for name in args.cases:
        print(f"[{name}] fresh process ...", flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--repeats", str(args.repeats)]
        if args.profile:
            cmd.append("--profile")
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            results[name] = dict(case=name, error=f"timed out after {args.timeout} s", progress=err[-4000:])
            print(f"  timed out after {args.timeout} s; progress:\n{err[-4000:]}")
            continue
        wall = time.perf_counter() - t
        if p.returncode != 0:
            results[name] = dict(case=name, error=f"exit {p.returncode}", stderr=p.stderr[-4000:])
            print(f"  failed ({p.returncode}):\n{p.stderr[-4000:]}")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["process_wall_s"] = wall
        r["progress"] = p.stderr[-4000:]
        print(p.stderr[-4000:], end="")
        results[name] = r
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    summarize(results)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"\nwrote {os.path.relpath(args.out, os.getcwd())}")


def summarize(results):
    hdr = (f"{'case':<10} {'n_u':>7} {'rows':>8} {'layout':<28} {'build':>6} {'1st fit':>8} {'repeat':>7} "
           f"{'peak MB':>8} {'dense MB':>9} {'conv':>5} {'recov':>5}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<10} ERROR: {r['error']}")
            continue
        lay = r["layout"]
        if lay["kind"] == "arrow":
            ls = f"arrow m={lay['m']} k={lay['k']} t={lay['t']} c={lay['c']}"
        elif lay["kind"] == "banded":
            ls = f"banded s={lay['s']} nb={lay['nb']}"
        else:
            ls = lay["kind"]
        rep = min(r["repeat_fit_s"]) if r["repeat_fit_s"] else float("nan")
        print(f"{name:<10} {r['n_u']:>7} {r['n_rows']:>8} {ls:<28} {r['build_s']:6.1f} {r['first_fit_s']:8.1f} "
              f"{rep:7.1f} {r['peak_rss_mb']:8.0f} {r['dense_hessian_mb']:9.0f} {str(r['converged']):>5} "
              f"{str(r['recovered']):>5}")
        for k, v in r["estimates"].items():
            print(f"{'':12}{k:<14} est {v:8.4f}  se {r['se'][k]:.4f}  truth {r['truth'][k]:8.4f}  z {r['z'][k]:6.2f}")
        if "profile" in r:
            from _profile import print_profile

            print_profile(r["profile"], f"{'':12}jitted pieces at the optimum:")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
