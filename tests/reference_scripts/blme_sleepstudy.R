# blme 1.0.5's default-Wishart posterior mode on sleepstudy (REML), converged.
# blmer's default optimizer stops early here ("failed to converge, max|grad| =
# 0.317"; the shared reference blme_wishart_REML is that unconverged point);
# Nelder-Mead with tight tolerances converges without warnings.
library(blme); library(jsonlite)
d <- read.csv("tmbx/data/sleepstudy.csv"); d$Subject <- factor(d$Subject)
f <- blmer(Reaction ~ Days + (Days|Subject), data = d, REML = TRUE,
           control = lmerControl(optimizer = "Nelder_Mead",
                                 optCtrl = list(FtolAbs = 1e-14, FtolRel = 1e-14, maxfun = 1e5)))
stopifnot(length(f@optinfo$conv$lme4) == 0)
vc <- as.data.frame(VarCorr(f))
out <- list(version = as.character(packageVersion("blme")), optimizer = "Nelder_Mead",
            sd = vc$sdcor[1:2], cor = vc$sdcor[3], sigma = sigma(f), fixef = as.list(fixef(f)))
cat(toJSON(out, digits = NA, auto_unbox = TRUE, pretty = TRUE), file = "tests/data/blme_sleepstudy.json")
