"""Checking a fit: R2, overdispersion, zero-inflation, DHARMa residuals, plots, and for
templates TMB's checkConsistency, one-step-ahead residuals and bias correction.

Run: python examples/model_checking.py   (writes the figures to the temporary directory)
"""

import math
import os
import tempfile

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import tmbx

matplotlib.use("Agg")
OUT = tempfile.gettempdir()


def glmm_checks():
    sal = tmbx.load_dataset("salamanders")
    fit = tmbx.glmm("count ~ spp + mined + (1|site)", data=sal, family="poisson")
    print("R2:", fit.r2())                                     # performance::r2_nakagawa
    print("overdispersion:", fit.check_overdispersion())       # Pearson chi-square
    print("zero-inflation:", fit.check_zeroinflation())        # observed vs predicted zeros
    res = fit.simulate_residuals(nsim=250, seed=0)             # DHARMa scaled residuals
    for test in (res.test_uniformity, res.test_dispersion, res.test_zeroinflation, res.test_outliers):
        print(f"{test.__name__}:", test())
    res.plot().savefig(os.path.join(OUT, "dharma_residuals.png"))
    fit.plot().savefig(os.path.join(OUT, "fit_panel.png"))
    fit.plot_ranef().savefig(os.path.join(OUT, "ranef_caterpillar.png"))
    print("figures written to", OUT)
    # the remedy the checks point to: a zero-inflated negative binomial
    better = tmbx.glmm("count ~ spp + mined + (1|site)", data=sal, family="nbinom2", ziformula="~spp + mined")
    print("zinb2 dispersion test:", better.simulate_residuals().test_dispersion())


def ar1_template_checks(n=150):
    """A Gaussian AR1 state-space template: OSA residuals, checkConsistency, bias correction."""

    def nll(p, d):
        phi, s, sig = jnp.tanh(p["tphi"]), jnp.exp(p["logs"]), jnp.exp(p["logsig"])
        u = p["u"]
        innov = (u[1:] - phi * u[:-1]) / (s * jnp.sqrt(1 - phi**2))
        latent = 0.5 * (u[0] / s) ** 2 + 0.5 * jnp.sum(innov**2) + n * jnp.log(s) + (n - 1) * 0.5 * jnp.log1p(-phi**2)
        obs = 0.5 * jnp.sum(((d["y"] - p["mu"] - u) / sig) ** 2) + n * jnp.log(sig)
        return latent + obs + n * math.log(2 * math.pi)

    def simulate(p, d, key):
        k1, k2 = jax.random.split(key)
        phi, s, sig = jnp.tanh(p["tphi"]), jnp.exp(p["logs"]), jnp.exp(p["logsig"])
        e = jax.random.normal(k1, (n,))

        def step(prev, ei):
            nxt = phi * prev + s * jnp.sqrt(1 - phi**2) * ei
            return nxt, nxt

        _, rest = jax.lax.scan(step, s * e[0], e[1:])
        u = jnp.concatenate([s * e[:1], rest])
        return {"y": p["mu"] + u + sig * jax.random.normal(k2, (n,)), "u": u}  # "u": TMB's complete=TRUE

    params = dict(mu=1.0, tphi=math.atanh(0.8), logs=0.0, logsig=math.log(0.5), u=np.zeros(n))
    y = tmbx.Model(nll, params, data={"y": np.zeros(n)}, random=["u"], simulate=simulate).simulate(seed=1)["y"]
    model = tmbx.Model(nll, params, data={"y": np.asarray(y)}, random=["u"], simulate=simulate,
                       report=lambda p, d: {"level": jnp.exp(p["mu"] + p["u"][-1])})
    fit = model.fit()
    osa = fit.one_step_predict("y", method="fullGaussian")     # TMB's oneStepPredict
    print("OSA residuals: mean %.3f sd %.3f" % (osa["residual"].mean(), osa["residual"].std()))
    chk = fit.check_consistency(nsim=100, seed=0)               # TMB's checkConsistency
    print(chk)
    print(chk.summary())
    rep = fit.sdreport(bias_correct=True)                       # sdreport(bias.correct = TRUE)
    print("level:", rep.report_value["level"], "bias-corrected:", rep.report_value_bc["level"])


if __name__ == "__main__":
    glmm_checks()
    ar1_template_checks()
