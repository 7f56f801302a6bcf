"""Profile, bootstrap and likelihood-ratio inference on sleepstudy (lme4's examples).

    python examples/inference_sleepstudy.py
"""

import matplotlib

matplotlib.use("Agg")

import tmbx

d = tmbx.load_dataset("sleepstudy")
m0 = tmbx.glmm("Reaction ~ Days + (1|Subject)", d)
m1 = tmbx.glmm("Reaction ~ Days + (Days|Subject)", d)

# profile-likelihood intervals (lme4's confint(method = "profile")), all points batched
prof = m1.profile()
print(prof.confint(level=0.95))
prof.plot().savefig("sleepstudy_profile.png", dpi=100)

# parametric bootstrap (bootMer, use.u = FALSE): 1,000 refits in one vmapped program
boot = m1.bootstrap(nsim=1000, seed=1)
print(boot.confint(level=0.95))
icc = m1.bootstrap(nsim=1000, seed=1,
                   fn=lambda p: {"icc": p["sd_Intercept|Subject"] ** 2
                                 / (p["sd_Intercept|Subject"] ** 2 + p["sigma"] ** 2)})
print(icc.confint())

# likelihood-ratio test (anova), with the chi-bar-square p-value for the added variance,
# and the parametric-bootstrap p-value (pbkrtest's PBmodcomp)
print(tmbx.anova(m0, m1))
print({k: v for k, v in tmbx.pb_test(m0, m1, nsim=500, seed=1).items() if k != "lrt_sim"})
