"""Benchmark: NUTS on sleepstudy, ``Reaction ~ Days + (Days | Subject)``.

    python benchmarks/bench_sample.py                 # 4 chains x 1000 draws, both modes
    python benchmarks/bench_sample.py --chains 64     # many chains in one vectorized program
    TMBX_NO_CACHE=1 python benchmarks/bench_sample.py # cold: no persistent XLA cache

For ``laplace=False`` (all 42 parameters, latent effects included) and
``laplace=True`` (the 6 fixed parameters of the exact Gaussian marginal) it
reports the compile time (the vectorized NUTS program, ahead of time) and the
sampling time (warmup + draws) separately, the gradient evaluations per draw,
the smallest bulk ESS and ESS per second of sampling, and the largest R-hat.
Results go to ``benchmarks/results/sample.json``. Chains run as one ``vmap``-ed
program, so on a GPU the cost of more chains is nearly flat.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import jax
import numpy as np

import tmbx


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    df = tmbx.load_dataset("sleepstudy")
    t0 = time.perf_counter()
    fit = tmbx.glmm("Reaction ~ Days + (Days|Subject)", df)
    t_fit = time.perf_counter() - t0
    out = {"device": str(jax.devices()[0]), "chains": args.chains, "draws": args.draws, "fit_s": t_fit,
           "cache": not os.environ.get("TMBX_NO_CACHE")}
    for laplace in (False, True):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            post = fit.sample(num_samples=args.draws, num_chains=args.chains, seed=args.seed, laplace=laplace)
            total = time.perf_counter() - t0
        s = post.summary()
        row = {"compile_s": post.timing["compile"], "sampling_s": post.timing["sampling"], "total_s": total,
               "grad_evals_per_draw": float(np.mean(post.stats["num_steps"])),
               "min_ess_bulk": float(s["ess_bulk"].min()), "max_r_hat": float(s["r_hat"].max()),
               "ess_per_s": float(s["ess_bulk"].min() / post.timing["sampling"]),
               "divergent": post.num_divergent, "warnings": [str(x.message)[:120] for x in w]}
        out["laplace" if laplace else "joint"] = row
        print(f"laplace={laplace}: compile {row['compile_s']:.1f} s, sampling {row['sampling_s']:.1f} s "
              f"({row['grad_evals_per_draw']:.1f} gradients/draw), min ESS {row['min_ess_bulk']:.0f} "
              f"({row['ess_per_s']:.0f}/s), max R-hat {row['max_r_hat']:.4f}, {row['divergent']} divergent")
        print(s.round(3).to_string())
    path = os.path.join(os.path.dirname(__file__), "results", "sample.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
