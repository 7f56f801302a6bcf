"""Benchmark: adaptive Gauss-Hermite quadrature (``tmbx.glmm(..., nagq=)``).

    python benchmarks/bench_agq.py                  # cbpp at nagq=25 against lme4, and the bias study
    python benchmarks/bench_agq.py --only cbpp      # timing only
    python benchmarks/bench_agq.py --only bias --nsim 500
    TMBX_NO_CACHE=1 python benchmarks/bench_agq.py  # cold: no persistent XLA cache

``cbpp``: ``cbind(incidence, size - incidence) ~ period + (1|herd)`` at
nagq = 25: tmbx's first fit (design, compilation, fit, in this process) and
the median of repeated fits of the compiled model, against lme4's
``glmer(nAGQ = 25)`` timed in one ``Rscript`` process (when R and lme4 are
installed; median of repeated fits).

``bias``: binary logistic data on clusters of 3-5 observations with a random
intercept of sd 1.75 (``y ~ x + (1|g)``, intercept -1, slope 0.5, 100
clusters); ``nsim`` data sets refitted by Laplace (nagq = 1) and by AGQ (nagq =
15), each as one ``vmap``-ed program (`Model.fit_batch`). Reports mean
estimate, bias, relative bias and Monte Carlo standard error per parameter.
Results go to ``benchmarks/results/agq.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time

import jax
import numpy as np
import pandas as pd

import tmbx

CBPP = "cbind(incidence, size - incidence) ~ period + (1|herd)"
TRUTH = {"Intercept": -1.0, "x": 0.5, "sd": 1.75}

R_SCRIPT = r"""
suppressMessages(library(lme4))
d <- read.csv(commandArgs(TRUE)[1])
d$period <- factor(d$period); d$herd <- factor(d$herd)
f <- function() glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), d, binomial, nAGQ = 25)
t0 <- Sys.time(); m <- f(); first <- as.numeric(Sys.time() - t0, units = "secs")
reps <- sapply(1:10, function(i) system.time(f())[["elapsed"]])
cat(sprintf('{"first_s": %.6f, "median_s": %.6f, "logLik": %.10f, "sd": %.10f}\n', first, median(reps),
            as.numeric(logLik(m)), attr(VarCorr(m)$herd, "stddev")))
"""


def bench_cbpp(reps: int = 10) -> dict:
    df = tmbx.load_dataset("cbpp")
    t0 = time.perf_counter()
    fit = tmbx.glmm(CBPP, df, family="binomial", nagq=25)
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fit.model.fit()
        times.append(time.perf_counter() - t0)
    out = {"tmbx": {"first_s": first, "median_s": float(np.median(times)), "logLik": fit.loglik,
                    "sd": float(fit.varcorr["herd"].sd.iloc[0]), "device": str(jax.devices()[0])}}
    if shutil.which("Rscript"):
        with tempfile.TemporaryDirectory() as tmp:
            csv, script = os.path.join(tmp, "cbpp.csv"), os.path.join(tmp, "agq.R")
            df.to_csv(csv, index=False)
            with open(script, "w") as fh:
                fh.write(R_SCRIPT)
            run = subprocess.run(["Rscript", script, csv], capture_output=True, text=True, check=False)
            if run.returncode == 0:
                out["lme4"] = json.loads(run.stdout.strip().splitlines()[-1])
            else:
                out["lme4"] = {"error": run.stderr.strip()[-300:]}
    return out


def simulate_clusters(nsim: int, seed: int = 0, n_clusters: int = 100):
    """One design (cluster sizes 3-5, covariate x) and ``nsim`` binary responses from the truth."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 6, n_clusters)
    g = np.repeat(np.arange(n_clusters), sizes)
    x = rng.standard_normal(g.size)
    b = TRUTH["sd"] * rng.standard_normal((nsim, n_clusters))
    eta = TRUTH["Intercept"] + TRUTH["x"] * x + b[:, g]
    y = (rng.random(eta.shape) < 1 / (1 + np.exp(-eta))).astype(float)
    df = pd.DataFrame({"y": y[0], "x": x, "g": [f"c{i:03d}" for i in g]})
    return df, y


def fit_many(df, y, nagq: int) -> pd.DataFrame:
    """Refit the formula's template to every response vector in ``y`` (one vmap)."""
    fit = tmbx.glmm("y ~ x + (1|g)", df, family="binomial", nagq=nagq)
    model = fit.model
    data = jax.tree_util.tree_map(lambda a: np.broadcast_to(a, (len(y),) + np.shape(a)), model.data)
    data["y"] = y
    batch = model.fit_batch(data)
    est = pd.DataFrame({"Intercept": batch.x[:, 0], "x": batch.x[:, 1], "sd": np.exp(batch.x[:, 2])})
    est["converged"] = batch.converged
    return est


def bias_table(nsim: int = 200, seed: int = 0, orders=(1, 15)) -> pd.DataFrame:
    df, y = simulate_clusters(nsim, seed)
    rows = []
    for q in orders:
        est = fit_many(df, y, q)
        ok = est[est["converged"]]
        for name, true in TRUTH.items():
            v = ok[name].to_numpy()
            rows.append({"method": "Laplace" if q == 1 else f"AGQ (nagq={q})", "parameter": name,
                         "true": true, "mean": v.mean(), "bias": v.mean() - true,
                         "rel_bias": (v.mean() - true) / true, "mc_se": v.std(ddof=1) / np.sqrt(len(v)),
                         "converged": len(v)})
    return pd.DataFrame(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["cbpp", "bias"])
    ap.add_argument("--nsim", type=int, default=200)
    args = ap.parse_args()
    out = {"cache": not os.environ.get("TMBX_NO_CACHE")}
    if args.only in (None, "cbpp"):
        out["cbpp"] = bench_cbpp()
        print(json.dumps(out["cbpp"], indent=1))
    if args.only in (None, "bias"):
        t0 = time.perf_counter()
        tab = bias_table(args.nsim)
        out["bias_seconds"] = time.perf_counter() - t0
        out["bias"] = tab.to_dict(orient="records")
        print(tab.round(4).to_string(index=False))
        print(f"({args.nsim} data sets, {out['bias_seconds']:.1f} s)")
    path = os.path.join(os.path.dirname(__file__), "results", "agq.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
