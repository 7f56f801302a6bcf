"""Benchmark: a fresh process's first calls of a fit's common methods.

    python benchmarks/bench_methods.py                      # every case, cold and warm
    python benchmarks/bench_methods.py --cases owls --caches cold

A user's script fits once and then asks for the summary, intervals, random
effects, predictions, residuals and simulations; in a fresh process each of
those first calls pays for tracing and compiling its programs (JAX's
persistent cache cold) or for loading them (warm). `bench_glmm.py` times the
fit alone; this times the rest, method by method, each case in a fresh
process: ``cold`` with an empty cache directory, ``warm`` with one primed by a
first process. It measures the tmbx that ``import tmbx`` finds (``PYTHONPATH``
first; the workers start in a temporary directory). Results go to
``benchmarks/results/methods.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

#: case -> (dataset, formula, keyword arguments of tmbx.glmm)
CASES = {
    "sleepstudy": ("sleepstudy", "Reaction ~ Days + (Days|Subject)", dict(family="gaussian")),
    "cbpp": ("cbpp", "cbind(incidence, size - incidence) ~ period + (1|herd)", dict(family="binomial")),
    "owls": ("owls", "SiblingNegotiation ~ FoodTreatment*SexParent + offset(logBroodSize) + (1|Nest)",
             dict(family="nbinom1", ziformula="~1")),
}

#: the methods, in the order a script calls them
STEPS = ["glmm", "summary", "confint", "ranef", "predict", "predict_se", "residuals", "simulate"]

WORKER = r"""
import json, sys, time, warnings
import tmbx
warnings.simplefilter("ignore")
name, formula, kw = json.loads(sys.argv[1])
df = tmbx.load_dataset(name)
out = {}
def step(label, fn):
    t = time.perf_counter(); r = fn(); out[label] = time.perf_counter() - t
    return r
f = step("glmm", lambda: tmbx.glmm(formula, data=df, **kw))
step("summary", lambda: str(f.summary()))
step("confint", lambda: f.confint())
step("ranef", lambda: f.ranef())
step("predict", lambda: f.predict())
step("predict_se", lambda: f.predict(type="response", se_fit=True))
step("residuals", lambda: f.residuals(type="pearson"))
step("simulate", lambda: f.simulate(nsim=10, seed=1))
print(json.dumps(out))
"""


def run_case(case: str, cache: str) -> dict:
    """Seconds per method in a fresh process with the given cache directory."""
    name, formula, kw = CASES[case]
    env = dict(os.environ, TMBX_CACHE_DIR=cache)
    env.pop("TMBX_NO_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps([name, formula, kw])],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"{case}: worker failed\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ",".join(CASES))
    ap.add_argument("--caches", default="cold,warm", help="cold, warm or both")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "methods.json"))
    args = ap.parse_args(argv)
    results = {}
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory(prefix="tmbx-bench-cache-") as cache:
            res = {"cold": run_case(case, cache)}  # (also primes the cache for "warm")
            if "warm" in args.caches:
                res["warm"] = run_case(case, cache)
            results[case] = {k: v for k, v in res.items() if k in args.caches.split(",")}
    print(f"{'case':12s} {'cache':5s} " + " ".join(f"{s:>10s}" for s in STEPS) + f" {'total':>8s}")
    for case, res in results.items():
        for cache, times in res.items():
            print(f"{case:12s} {cache:5s} " + " ".join(f"{times[s]:10.3f}" for s in STEPS)
                  + f" {sum(times.values()):8.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
