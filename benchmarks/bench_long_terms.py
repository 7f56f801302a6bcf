"""Benchmark: an ar1 term over long series, tmbx against glmmTMB.

    python benchmarks/bench_long_terms.py                  # every case, tmbx and glmmTMB (if R is installed)
    python benchmarks/bench_long_terms.py --cases ar1_1x400 --tools tmbx

Poisson counts ``y ~ 1 + ar1(t + 0 | g)`` over ``t`` = 1..T time points in
each of G groups (an AR(1) latent series with phi = 0.8, simulated here with
a fixed seed and written to ``benchmarks/data/``). Each row of such a term
depends on all T of its group's random effects (the covariance factor mixes
them), the case that `tmbx._hessian.LatentGaussianHessian`'s block products
are for. Each tool fits in a fresh process: tmbx with JAX's persistent cache
off (``TMBX_NO_CACHE=1``: the first fit includes every compile) and the median
of three ``refit()`` calls; glmmTMB's ``glmmTMB()`` call through Rscript. The
log-likelihoods are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from _worker import run_json

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, "data")

#: case -> (groups, time points)
CASES = {"ar1_1x100": (1, 100), "ar1_1x400": (1, 400), "ar1_20x100": (20, 100)}

R_SCRIPT = """
suppressMessages(library(glmmTMB))
args <- commandArgs(trailingOnly = TRUE)
df <- read.csv(args[1])
df$t <- factor(df$t, levels = sort(unique(df$t)))
df$g <- factor(df$g)
t0 <- proc.time()[["elapsed"]]
f <- glmmTMB(y ~ 1 + ar1(t + 0 | g), family = poisson, data = df)
el <- proc.time()[["elapsed"]] - t0
cat(sprintf('{"first": %.6f, "loglik": %.10f}\\n', el, as.numeric(logLik(f))))
"""


def data_path(case: str) -> str:
    """The case's CSV, simulated on first use (seeded: the same rows every time)."""
    import numpy as np
    import pandas as pd

    path = os.path.join(DATA_DIR, f"long_{case}.csv")
    if os.path.exists(path):
        return path
    groups, times = CASES[case]
    rng = np.random.default_rng(groups * 1000 + times)
    e = np.zeros((groups, times))
    e[:, 0] = rng.normal(size=groups)
    for i in range(1, times):
        e[:, i] = 0.8 * e[:, i - 1] + 0.6 * rng.normal(size=groups)
    y = rng.poisson(np.exp(0.5 + 0.7 * e))
    g, t = np.meshgrid(np.arange(groups), np.arange(times), indexing="ij")
    os.makedirs(DATA_DIR, exist_ok=True)
    pd.DataFrame({"y": y.ravel(), "t": t.ravel(), "g": [f"g{i}" for i in g.ravel()]}).to_csv(path, index=False)
    return path


def worker(case: str) -> dict:
    import pandas as pd

    import tmbx

    df = pd.read_csv(data_path(case))
    df["t"] = pd.Categorical(df["t"])
    t = time.perf_counter()
    fit = tmbx.glmm("y ~ 1 + ar1(t + 0 | g)", data=df, family="poisson")
    first = time.perf_counter() - t
    refits = []
    for _ in range(3):
        t = time.perf_counter()
        fit.refit()
        refits.append(time.perf_counter() - t)
    return {"first": first, "repeated": statistics.median(refits), "loglik": float(fit.loglik)}


def run_tmbx(case: str) -> dict:
    return run_json([sys.executable, __file__, "--worker", case], env=dict(os.environ, TMBX_NO_CACHE="1"))


def run_glmmtmb(case: str) -> dict:
    if shutil.which("Rscript") is None:
        return {"error": "Rscript not found"}
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as f:
        f.write(R_SCRIPT)
    try:
        return run_json(["Rscript", f.name, data_path(case)])
    finally:
        os.unlink(f.name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--tools", default="tmbx,glmmTMB")
    ap.add_argument("--worker", metavar="CASE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    tools = args.tools.split(",")
    print(f"{'case':11s} {'tmbx 1st (cold)':>15s} {'repeated':>9s} {'glmmTMB':>8s}  logLik tmbx (glmmTMB - tmbx)")
    for case in args.cases.split(","):
        data_path(case)
        t = run_tmbx(case) if "tmbx" in tools else {}
        r = run_glmmtmb(case) if "glmmTMB" in tools else {}
        diff = r["loglik"] - t["loglik"] if "loglik" in r and "loglik" in t else float("nan")
        print(f"{case:11s} {t.get('first', float('nan')):15.2f} {t.get('repeated', float('nan')):9.3f} "
              f"{r.get('first', float('nan')):8.2f}  {t.get('loglik', float('nan')):.4f} ({diff:+.1e})"
              + (f"  errors: {t.get('error', '')} {r.get('error', '')}" if "error" in t or "error" in r else ""))


if __name__ == "__main__":
    main()
