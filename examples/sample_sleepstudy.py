"""Full-posterior sampling of a linear mixed model (tmbstan's role), on sleepstudy.

    python examples/sample_sleepstudy.py

NUTS on every parameter (fixed effects, sds, the correlation, sigma and the 36
latent effects), 4 chains in one vectorized program; then the same with the
random effects integrated out by the (here exact) Laplace marginal. The
summary names each parameter's prior: flat on the fixed effects (proper for a
Gaussian LMM with full-rank X), half-t(3, 0, max(2.5, mad(y))) on the sds and
sigma, LKJ(2) on the correlation.
"""

import tmbx

df = tmbx.load_dataset("sleepstudy")
fit = tmbx.glmm("Reaction ~ Days + (Days|Subject)", df)
print(fit.confint())

for laplace in (False, True):
    post = fit.sample(num_samples=1000, num_chains=4, seed=0, laplace=laplace)
    print(post, f"compile {post.timing['compile']:.1f} s, sampling {post.timing['sampling']:.1f} s")
    print(post.summary().round(3).to_string())

idata = post.to_arviz()  # arviz's InferenceData (DataTree in arviz 1.x), e.g. for az.plot_trace(idata)
print(idata)
