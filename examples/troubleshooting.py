"""Troubleshooting a mixed model: a singular fit, what diagnose() says, allfit, and a prior.

Dyestuff2 (lme4) has no batch-to-batch variation beyond the residual: lme4
calls the fit singular, glmmTMB stops at an sd of 1e-4 with a "positive
definite" Hessian. tmbx warns, names the term and what to try; blme's default
Wishart prior (or a gamma prior on the sd) gives a regularized posterior mode.

    python examples/troubleshooting.py
"""

import warnings

import tmbx


def main():
    df = tmbx.load_dataset("dyestuff2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = tmbx.glmm("Yield ~ 1 + (1|Batch)", data=df, reml=True)
    print("warning at fit time:\n", *(str(w.message) for w in caught), "\n")
    print("is_singular:", fit.is_singular())
    print("rePCA:\n", fit.rePCA()["Batch"], "\n")
    print(fit.diagnose(), "\n")

    tab = fit.allfit(progress=False)
    print(tab[["loglik", "converged", "time", "sd_Intercept|Batch"]])
    print("verdict:", tab.attrs["verdict"], "\n")

    # blme's default prior on the covariance relative to sigma^2, and blme's
    # gamma(shape 2.5, rate 0) on the sd, in glmmTMB's spelling
    for prior in ({"prior": "wishart()", "class": "cov"}, {"prior": "gamma(1e8, 2.5)", "class": "ranef_sd"}):
        reg = tmbx.glmm("Yield ~ 1 + (1|Batch)", data=df, reml=True, priors=[prior])
        print(f"{prior['prior']:>16}: sd_Batch = {reg.varcorr['Batch'].sd.iloc[0]:.4f}, "
              f"sigma = {reg.sigma:.4f}, singular: {reg.is_singular()}")


if __name__ == "__main__":
    main()
