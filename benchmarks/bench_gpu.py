"""The accelerator figures: batch refits and batch fits on one GPU.

    python benchmarks/bench_gpu.py --out DIR                         # every section
    python benchmarks/bench_gpu.py --out DIR --sections boot --nsim 2000 --genes 200   # a small run (CPU too)

Sections, each written to ``DIR/<section>.json`` as soon as it ends (a run
stopped at its time limit keeps what it finished):

- ``env``: the JAX version and devices;
- ``boot``: ``nsim`` parametric-bootstrap refits of a Poisson GLMM with 1,000
  groups of 10 (`bench_inference.bench_scale`), for each ``--boot-batch``;
- ``genes``: ``tmbx.glmm_batch`` on ``--genes`` genes x 5,000 cells (NB2, random
  donor intercept; `bench_genes.genes_frame`, drawn in memory), a first call
  (compilation included) and a second one;
- ``glmm``: `bench_glmm.py` with tmbx alone (cold and warm persistent cache,
  a fresh process each) on ``--glmm-cases``.

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
    if "glmm" in sections:
        out = os.path.join(args.out, "glmm.json")
        r = subprocess.run([sys.executable, os.path.join(HERE, "bench_glmm.py"), "--cases", args.glmm_cases,
                            "--tools", "tmbx_cold,tmbx_warm", "--out", out], capture_output=True, text=True)
        print(r.stdout[-4000:], r.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
