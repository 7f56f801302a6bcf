"""``python -m tmbx``: fit glmmTMB's Salamanders zero-inflated negative binomial model
(a bundled real data set) and print the summary, as a first check that tmbx works.

``python -m tmbx --help`` lists the other bundled examples.
"""

import argparse
import time

import tmbx

EXAMPLES = {
    "salamanders": dict(formula="count ~ spp + mined + (1|site)", data="salamanders", family="nbinom2",
                        ziformula="~spp + mined"),
    "sleepstudy": dict(formula="Reaction ~ Days + (Days|Subject)", data="sleepstudy", family="gaussian"),
    "cbpp": dict(formula="cbind(incidence, size - incidence) ~ period + (1|herd)", data="cbpp",
                 family="binomial"),
    "owls": dict(formula="SiblingNegotiation ~ FoodTreatment*SexParent + offset(logBroodSize) + (1|Nest)",
                 data="owls", family="nbinom1", ziformula="~1"),
}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tmbx", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("example", nargs="?", default="salamanders", choices=sorted(EXAMPLES))
    args = ap.parse_args(argv)
    spec = dict(EXAMPLES[args.example])
    df = tmbx.load_dataset(spec.pop("data"))
    formula = spec.pop("formula")
    t0 = time.perf_counter()
    fit = tmbx.glmm(formula, data=df, **spec)
    elapsed = time.perf_counter() - t0
    print(fit.summary())
    print(f"(fitted in {elapsed:.2f} s, compilation included)")


if __name__ == "__main__":
    main()
