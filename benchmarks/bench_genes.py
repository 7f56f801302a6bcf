"""Benchmark: one negative binomial GLMM per gene, tmbx.glmm_batch against loops.

    python benchmarks/bench_genes.py                       # 2,000 genes x 5,000 cells, samples of 20 for the loops
    python benchmarks/bench_genes.py --genes 200 --sample 10 --device cpu
    python benchmarks/bench_genes.py --genes 20000 --inproc     # data drawn in memory, tmbx alone
    python benchmarks/bench_gpu.py --out DIR --sections genes   # the same on a GPU

Data: ``benchmarks/reference/make_genes_data.py`` (10 donors in two
groups, NB2 counts with a random donor intercept per gene), written to
``benchmarks/data/genes_{G}x{C}.csv`` on first use (git-ignored). Model:
``y ~ group + (1|donor)``, nbinom2.

- ``tmbx``: ``tmbx.glmm_batch`` on all genes in a fresh process with JAX's
  persistent compilation cache off (``TMBX_NO_CACHE=1``): the first call
  (formula, layout, XLA compilation and the fits), then a second call in the
  same process (compiled programs reused);
- ``glmmTMB`` (``benchmarks/genes_glmmtmb.R``) and ``glmm`` (PyPI, family
  "negativebinomial"): loops of single fits on a sample of genes, timed per
  fit and scaled up to all genes.

Log-likelihoods of the sample are compared with tmbx's. Ratios: the loops'
scaled times over tmbx's time. Results go to ``benchmarks/results/genes.json``
with the machine's load average (on a shared machine, compare the tools
measured side by side only).
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
ROOT = os.path.dirname(HERE)
GEN = os.path.join(HERE, "reference", "make_genes_data.py")
FORMULA = "y ~ group + (1|donor)"
MARK = "@@RESULT@@"


def data_csv(genes: int, cells: int, seed: int = 1) -> str:
    path = os.path.join(HERE, "data", f"genes_{genes}x{cells}.csv")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        subprocess.run([sys.executable, GEN, str(genes), str(cells), path, str(seed)], check=True)
    return path


def genes_frame(genes: int, cells: int, seed: int = 1):
    """The model of ``make_genes_data.py`` drawn in memory, vectorized over genes
    (another random stream than the script's, same distribution), with
    categorical columns: 20,000 genes x 5,000 cells is 1e8 rows, too many for a
    CSV round trip."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    donor = rng.integers(0, 10, cells)
    b0 = rng.normal(0.0, 1.0, genes)
    b1 = np.where(rng.random(genes) < 0.1, rng.normal(0.0, 0.5, genes), 0.0)
    sd = rng.uniform(0.1, 0.5, genes)
    theta = rng.uniform(0.5, 5.0, genes)[:, None]
    u = rng.normal(0.0, 1.0, (genes, 10)) * sd[:, None]
    y = np.empty((genes, cells), np.int64)
    for lo in range(0, genes, 1000):  # in slices: bounded temporary memory
        sl = slice(lo, lo + 1000)
        mu = np.exp(b0[sl, None] + b1[sl, None] * (donor >= 5) + u[sl][:, donor])
        y[sl] = rng.negative_binomial(theta[sl], theta[sl] / (theta[sl] + mu))
    cat = pd.Categorical.from_codes
    return pd.DataFrame({
        "gene": cat(np.repeat(np.arange(genes), cells), [f"g{g:05d}" for g in range(genes)]),
        "cell": np.tile(np.arange(cells), genes),
        "donor": cat(np.tile(donor, genes), [f"d{d}" for d in range(10)]),
        "group": cat(np.tile((donor >= 5).astype(np.int8), genes), ["A", "B"]),
        "y": y.reshape(-1),
    })


def time_glmm_batch(df, device=None, batch_size=None, calls=2) -> dict:
    """``calls`` glmm_batch calls on ``df`` in this process: their times, and the table's summary."""
    import jax
    import tmbx

    times, tab, fits = [], None, None
    for _ in range(calls):
        t = time.perf_counter()
        fits = tmbx.glmm_batch(FORMULA, data=df, by="gene", family="nbinom2", device=device,
                               batch_size=batch_size, progress=False)
        tab = fits.table()
        times.append(time.perf_counter() - t)
    buckets = [dict(rows=int(b.rows.shape[1]), members=len(b)) for b in fits.buckets]
    return dict(first_seconds=times[0], warm_seconds=times[-1], converged=int(tab["converged"].sum()),
                genes=len(tab), buckets=buckets,
                device=str(jax.devices(device)[0] if device else jax.devices()[0]),
                loglik=tab["loglik"].to_dict())


def worker_tmbx(csv: str, device: str | None, batch_size: int | None):
    """Runs in a fresh process: two glmm_batch calls, their times and the table.
    ``csv`` "inproc:GENES:CELLS" draws the data in memory (`genes_frame`)."""
    sys.path.insert(0, ROOT)
    import pandas as pd

    t = time.perf_counter()
    import jax  # noqa: F401
    import tmbx  # noqa: F401

    t_import = time.perf_counter() - t
    if csv.startswith("inproc:"):
        df = genes_frame(*map(int, csv.split(":")[1:]))
    else:
        df = pd.read_csv(csv)
    res = time_glmm_batch(df, device, batch_size)
    print(MARK + json.dumps(dict(import_seconds=t_import, **res)))


def worker_glmm(sample_csv: str):
    import warnings

    import glmm
    import pandas as pd

    df = pd.read_csv(sample_csv)
    out = {}
    glmm.fit(df[df.gene == df.gene.iloc[0]], FORMULA, family="negativebinomial")  # warm-up
    for g, dg in df.groupby("gene"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            f = glmm.fit(dg.reset_index(drop=True), FORMULA, family="negativebinomial")
            out[g] = dict(seconds=time.perf_counter() - t, logLik=float(f.loglik))
    print(MARK + json.dumps(dict(genes=out)))


def run_worker(args: list[str], env=None) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                          env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        raise RuntimeError(f"worker {args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len(MARK):])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--cells", type=int, default=5000)
    ap.add_argument("--sample", type=int, default=20, help="genes in the loops of single fits")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--inproc", action="store_true",
                    help="draw the data in the worker (genes_frame), no CSV; implies --no-peers")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "tmbx":
            worker_tmbx(rest[0], None if rest[1] == "none" else rest[1], None if rest[2] == "none" else int(rest[2]))
        else:
            worker_glmm(rest[0])
        return
    import pandas as pd

    csv = f"inproc:{args.genes}:{args.cells}" if args.inproc else data_csv(args.genes, args.cells)
    args.no_peers |= args.inproc
    load = os.getloadavg()[0]
    env = dict(os.environ, TMBX_NO_CACHE="1")
    tm = run_worker(["--worker", "tmbx", csv, args.device or "none", str(args.batch_size or "none")], env=env)
    result = dict(genes=args.genes, cells=args.cells, load_1min=load, tmbx=tm)
    print(f"tmbx.glmm_batch on {args.genes} genes x {args.cells} cells ({tm['device']}): "
          f"first call {tm['first_seconds']:.1f} s, warm {tm['warm_seconds']:.1f} s, "
          f"{tm['converged']}/{tm['genes']} converged, buckets {tm['buckets']}")
    if not args.no_peers:
        df = pd.read_csv(csv)
        sample = sorted(df.gene.unique())[:: max(1, args.genes // args.sample)][: args.sample]
        with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as fh:
            df[df.gene.isin(sample)].to_csv(fh.name, index=False)
        r = subprocess.run(["Rscript", os.path.join(HERE, "genes_glmmtmb.R"), fh.name], capture_output=True,
                           text=True, check=True)
        peers = {"glmmTMB": json.loads(r.stdout), "glmm": run_worker(["--worker", "glmm", fh.name])}
        os.unlink(fh.name)
        for name, res in peers.items():
            per_gene = sorted(v["seconds"] for v in res["genes"].values())
            med = per_gene[len(per_gene) // 2]
            total = sum(per_gene) / len(per_gene) * args.genes
            dll = max(abs(v["logLik"] - tm["loglik"][g]) for g, v in res["genes"].items())
            result[name] = dict(seconds_per_gene_mean=sum(per_gene) / len(per_gene), seconds_per_gene_median=med,
                                scaled_total_seconds=total, max_abs_loglik_diff=dll,
                                ratio_to_tmbx_warm=total / tm["warm_seconds"],
                                ratio_to_tmbx_first=total / tm["first_seconds"])
            print(f"{name}: {result[name]['seconds_per_gene_mean']:.3f} s/gene -> {total:.0f} s for {args.genes} "
                  f"genes; x{result[name]['ratio_to_tmbx_warm']:.1f} tmbx warm, "
                  f"x{result[name]['ratio_to_tmbx_first']:.1f} tmbx first call; max |dlogLik| {dll:.2e}")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    tag = f"{args.genes}x{args.cells}" + (f"_{args.device}" if args.device else "") + ("_inproc" if args.inproc else "")
    path = os.path.join(HERE, "results", "genes.json")
    allres = json.load(open(path)) if os.path.exists(path) else {}
    result["tmbx"].pop("loglik")
    allres[tag] = result
    json.dump(allres, open(path, "w"), indent=1)


if __name__ == "__main__":
    main()
