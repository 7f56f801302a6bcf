"""Profile intervals and the parametric bootstrap: tmbx against lme4 and glmmTMB.

    python benchmarks/bench_inference.py            # tmbx timings, ratios to the reference times
    python benchmarks/bench_inference.py --live     # also time lme4/glmmTMB here (needs Rscript)
    python benchmarks/bench_inference.py --scale    # 10,000 refits of a Poisson GLMM, 1,000 groups (GPU)
    TMBX_NO_CACHE=1 python benchmarks/bench_inference.py   # first calls without the compilation cache

Reference times (``seconds`` in tests/data/inference/*.json) were taken on a
2-core machine; ``--live`` reruns the peers on this one, so the ratios compare
like with like. "first" is the first call in this process (tracing and
compiling included, unless the persistent cache already holds the program);
"repeat" the median of three further calls. Results go to
benchmarks/results/bench_inference_<device>[_nocache].json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import tmbx

ROOT = Path(__file__).resolve().parents[1]
INF = ROOT / "tests" / "data" / "inference"
SHARED = ROOT / "tmbx" / "data"  # the bundled copies of the reference data sets

MODELS = {
    "sleepstudy": {"formula": "Reaction ~ Days + (Days|Subject)", "family": "gaussian",
                   "r": "lmer(Reaction ~ Days + (Days|Subject), data = d, REML = FALSE)",
                   "r_tmb": "glmmTMB(Reaction ~ Days + (Days|Subject), data = d)"},
    "cbpp": {"formula": "cbind(incidence, size - incidence) ~ period + (1|herd)", "family": "binomial",
             "r": "glmer(cbind(incidence, size - incidence) ~ period + (1|herd), data = d, family = binomial)",
             "r_tmb": "glmmTMB(cbind(incidence, size - incidence) ~ period + (1|herd), data = d, "
                      "family = binomial)"},
}


def timed(fn, repeats=3):
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    # a small model's programs are optimized in the background after their first
    # run (tmbx/_tiered.py): the repeats time the optimized programs
    from tmbx._tiered import wait_all

    wait_all()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return out, first, float(np.median(times))


def run_r(code: str) -> float:
    """Seconds of the R expression's ``system.time``, run by Rscript."""
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as f:
        f.write(code)
    res = subprocess.run(["Rscript", f.name], capture_output=True, text=True, timeout=1800, check=False)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("SECONDS")]
    if not lines:
        raise RuntimeError(res.stderr[-2000:])
    return float(lines[-1].split()[1])


def r_data(name):
    return f"""suppressPackageStartupMessages({{library(lme4); library(glmmTMB); library(jsonlite)}})
d <- read.csv("{SHARED / (name + '.csv')}", stringsAsFactors = FALSE)
lv <- fromJSON("{SHARED / (name + '.levels.json')}")
for (v in names(lv)) d[[v]] <- factor(d[[v]], levels = lv[[v]])
"""


def live_peers(name, m, nboot):
    out = {}
    out["lme4_profile"] = run_r(r_data(name) + f"m <- {m['r']}\n"
                                "t <- system.time(confint(m, method = 'profile'))[['elapsed']]\n"
                                "cat('SECONDS', t, '\\n')\n")
    out["glmmTMB_profile"] = run_r(r_data(name) + f"m <- {m['r_tmb']}\n"
                                   "t <- system.time(confint(m, method = 'profile'))[['elapsed']]\n"
                                   "cat('SECONDS', t, '\\n')\n")
    if nboot:
        out["lme4_bootMer"] = run_r(r_data(name) + f"m <- {m['r']}\n"
                                    f"t <- system.time(bootMer(m, function(x) c(fixef(x), getME(x, 'theta')), "
                                    f"nsim = {nboot}, seed = 1))[['elapsed']]\ncat('SECONDS', t, '\\n')\n")
    return out


def bench_model(name, m, live, nboot):
    ref = json.loads((INF / f"{name}_inference.json").read_text())
    data = tmbx.load_dataset(name)
    t = time.perf_counter()
    fit = tmbx.glmm(m["formula"], data, family=m["family"])
    rec = {"fit_seconds": time.perf_counter() - t}
    prof, first, rep = timed(lambda: fit.profile(progress=False))
    ci = prof.confint()
    lme4 = ref["profile_ci_lme4"]
    err = []
    for nm, lo, hi in zip(lme4["names"], lme4["lower"], lme4["upper"]):
        ours = nm.replace("(Intercept)", "Intercept")
        if ours not in ci.index:
            ours = ours.replace("period", "period[T.") + "]"
        err.append(max(abs(ci.loc[ours, "lower"] - lo), abs(ci.loc[ours, "upper"] - hi)) / (hi - lo))
    peers = {"lme4_profile": lme4["seconds"], "glmmTMB_profile": ref["profile_ci_glmmTMB"]["seconds"]}
    rec.update(profile_first=first, profile_repeat=rep, profile_points=len(prof.table),
               profile_max_err_rel_width=float(max(err)), peers_reference=peers)
    if nboot:
        _, bfirst, brep = timed(lambda: fit.bootstrap(nsim=nboot, seed=1, progress=False), repeats=1)
        rec.update(bootstrap_nsim=nboot, bootstrap_first=bfirst, bootstrap_repeat=brep)
        if "boot_ci_lme4" in ref:
            peers["lme4_bootMer"] = ref["boot_ci_lme4"]["seconds"]
    if live and shutil.which("Rscript"):
        rec["peers_live"] = live_peers(name, m, nboot)
    for src in ("peers_reference", "peers_live"):
        p = rec.get(src)
        if not p:
            continue
        fastest = min(p["lme4_profile"], p["glmmTMB_profile"])
        rec[f"speedup_profile_repeat_{src}"] = fastest / rep
        rec[f"speedup_profile_first_{src}"] = fastest / first
        if nboot and "lme4_bootMer" in p:
            rec[f"speedup_bootstrap_{src}"] = p["lme4_bootMer"] * (nboot / 1000) / rec["bootstrap_repeat"]
    return rec


def bench_scale(nsim=10_000, groups=1_000, per=10, batch=2_000):
    """10,000 parametric-bootstrap refits of a Poisson GLMM with 1,000 groups."""
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(groups), per)
    x = rng.normal(size=groups * per)
    y = rng.poisson(np.exp(0.5 + 0.3 * x + rng.normal(0, 0.7, groups)[g]))
    df = pd.DataFrame({"y": y, "x": x, "g": g.astype(str)})
    t = time.perf_counter()
    fit = tmbx.glmm("y ~ x + (1|g)", df, family="poisson")
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    small = fit.bootstrap(nsim=batch, seed=0, batch_size=batch, progress=False)  # compiles
    first = time.perf_counter() - t
    t = time.perf_counter()
    boot = fit.bootstrap(nsim=nsim, seed=1, batch_size=batch, progress=False)
    sec = time.perf_counter() - t
    return {"nsim": nsim, "groups": groups, "nobs": groups * per, "batch_size": batch, "fit_seconds": fit_s,
            "first_batch_seconds_with_compile": first, "seconds": sec, "failed": boot.n_failed,
            "ci": boot.confint().round(4).to_dict(orient="index"), "small_failed": small.n_failed}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--live", action="store_true", help="time lme4/glmmTMB here too (Rscript)")
    ap.add_argument("--scale", action="store_true", help="10,000 refits of a 1,000-group Poisson GLMM")
    ap.add_argument("--only-scale", action="store_true")
    ap.add_argument("--nboot", type=int, default=1000)
    args = ap.parse_args()
    import jax

    dev = jax.devices()[0]
    res = {"device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}", "models": {}}
    if not args.only_scale:
        for name, m in MODELS.items():
            res["models"][name] = bench_model(name, m, args.live, args.nboot if name == "sleepstudy" else 0)
            print(name, json.dumps(res["models"][name], indent=1), flush=True)
    if args.scale or args.only_scale:
        res["scale"] = bench_scale()
        print("scale", json.dumps(res["scale"], indent=1), flush=True)
    import os

    tag = "_nocache" if os.environ.get("TMBX_NO_CACHE") else ""
    out = ROOT / "benchmarks" / "results" / f"bench_inference_{dev.platform}{tag}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
