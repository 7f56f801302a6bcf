"""Benchmark: 1e5-row GLMMs of the count and positive families, tmbx against glmm.

    python benchmarks/bench_families.py                 # every case, tmbx and glmm
    python benchmarks/bench_families.py --cases nbinom2 --tools tmbx

The ladder of `bench_glmm.py` holds Poisson, Bernoulli and Gaussian models;
these add the families whose densities carry ``lgamma`` terms (negative
binomial, Gamma) and zero inflation, on ``y ~ x + (1 | g)`` with 1,000 groups
(data simulated here with a fixed seed, written to ``benchmarks/data/``).
Each tool fits in a fresh process: tmbx's first fit (JAX's persistent cache
warm: a first process primes it) and the median of five ``refit()`` calls;
glmm's ``fit`` (the Rust peer, `bench_glmm.py`'s fastest). The log-likelihoods
are compared (glmm has no zero inflation: that case is tmbx alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from _worker import run_json

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, "data")

#: case -> (tmbx family, ziformula, glmm family and link)
CASES = {
    "nbinom2": ("nbinom2", None, dict(family="negativebinomial")),
    "gamma": ("Gamma(link='log')", None, dict(family="gamma", link="log")),
    "zinb2": ("nbinom2", "~1", None),
}


def data_path(case: str) -> str:
    """The case's CSV, simulated on first use (seeded: the same rows every time)."""
    import numpy as np
    import pandas as pd

    path = os.path.join(DATA_DIR, f"families_{case}_1e5.csv")
    if os.path.exists(path):
        return path
    rng = np.random.default_rng({"nbinom2": 1, "gamma": 2, "zinb2": 3}[case])
    n, groups = 100_000, 1_000
    g = rng.integers(0, groups, n)
    x = rng.normal(size=n)
    mu = np.exp(0.5 + 0.3 * x + rng.normal(scale=0.5, size=groups)[g])
    if case == "gamma":
        y = rng.gamma(shape=3.0, scale=mu / 3.0)
    else:
        y = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(float)
        if case == "zinb2":
            y[rng.random(n) < 0.2] = 0.0
    os.makedirs(DATA_DIR, exist_ok=True)
    pd.DataFrame({"y": y, "x": x, "g": g}).to_csv(path, index=False)
    return path


def worker(tool: str, case: str) -> dict:
    import pandas as pd

    df = pd.read_csv(data_path(case))
    family, zi, peer = CASES[case]
    if tool == "glmm":
        import glmm

        df["g"] = df["g"].astype(str)
        t = time.perf_counter()
        f = glmm.fit(df, "y ~ x + (1 | g)", **peer)
        return {"first": time.perf_counter() - t, "loglik": float(f.loglik)}
    import tmbx

    df["g"] = pd.Categorical(df["g"].astype(str))
    t = time.perf_counter()
    fit = tmbx.glmm("y ~ x + (1 | g)", data=df, family=family, ziformula=zi)
    first = time.perf_counter() - t
    refits = []
    for _ in range(5):
        t = time.perf_counter()
        fit.refit()
        refits.append(time.perf_counter() - t)
    return {"first": first, "repeated": statistics.median(refits), "loglik": float(fit.loglik)}


def run(tool: str, case: str) -> dict:
    return run_json([sys.executable, __file__, "--worker", tool, case])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--tools", default="tmbx,glmm")
    ap.add_argument("--worker", nargs=2, metavar=("TOOL", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    tools = args.tools.split(",")
    print(f"{'case':10s} {'tmbx 1st':>9s} {'repeated':>9s} {'glmm':>8s} {'ratio':>6s}  logLik tmbx (glmm - tmbx)")
    for case in args.cases.split(","):
        data_path(case)
        res = {}
        if "tmbx" in tools:
            run("tmbx", case)  # primes JAX's persistent cache: the timed process finds it warm
            res["tmbx"] = run("tmbx", case)
        if "glmm" in tools and CASES[case][2] is not None:
            res["glmm"] = run("glmm", case)
        t, g = res.get("tmbx", {}), res.get("glmm", {})
        ratio = g["first"] / t["repeated"] if "first" in g and "repeated" in t else float("nan")
        diff = g["loglik"] - t["loglik"] if "loglik" in g and "loglik" in t else float("nan")
        print(f"{case:10s} {t.get('first', float('nan')):9.2f} {t.get('repeated', float('nan')):9.3f} "
              f"{g.get('first', float('nan')):8.2f} {ratio:6.1f}  {t.get('loglik', float('nan')):.4f} ({diff:+.1e})"
              + (f"  errors: {t.get('error', '')} {g.get('error', '')}" if "error" in t or "error" in g else ""))


if __name__ == "__main__":
    main()
