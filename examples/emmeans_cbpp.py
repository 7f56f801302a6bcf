"""Marginal means, pairwise odds ratios, Wald tables and drop1 for the cbpp GLMM,
and Satterthwaite / Kenward-Roger tests for the sleepstudy LMM (emmeans, car,
lmerTest and pbkrtest in R). Run: python examples/emmeans_cbpp.py"""

import tmbx

cbpp = tmbx.load_dataset("cbpp")
fit = tmbx.glmm("cbind(incidence, size - incidence) ~ period + (1|herd)", data=cbpp, family="binomial")
em = fit.emmeans("period", type="response")       # probabilities, delta-method SEs, df = df.residual
print(em.table)
print(em.pairs(adjust="tukey"))                  # odds ratios, Tukey-adjusted p-values
print(fit.anova(type=3))                          # car::Anova, Wald chi-square per term
print(fit.drop1(test="Chisq"))                    # likelihood-ratio test of each droppable term
print(fit.contrast(["period[T.2] - period[T.3] = 0", "period[T.4] = 0"], adjust="holm"))

sleep = tmbx.load_dataset("sleepstudy")
lmm = tmbx.glmm("Reaction ~ Days + (Days|Subject)", data=sleep, reml=True)
print(lmm.coef_table(ddf="satterthwaite"))        # lmerTest
print(lmm.coef_table(ddf="kenward-roger"))        # pbkrtest's adjusted covariance and df
print(lmm.anova(type=3, ddf="satterthwaite"))
lmm0 = tmbx.glmm("Reaction ~ 1 + (Days|Subject)", data=sleep, reml=True)
print(tmbx.kr_test(lmm0, lmm))                    # pbkrtest::KRmodcomp
