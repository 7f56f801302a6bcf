# lme4's profile intervals of a singular fit (Dyestuff2: batch variance estimated
# at 0), ML criterion; read by tests/test_inference_profile.py.
# Run from the repository root: Rscript tests/reference_scripts/inference_profile_dyestuff2.R
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
d <- read.csv("/work/shared/reference/data/dyestuff2.csv", stringsAsFactors = TRUE)
m <- lmer(Yield ~ 1 + (1|Batch), data = d, REML = FALSE)
ci <- confint(m, method = "profile", oldNames = FALSE)
write(toJSON(list(python_formula = "Yield ~ 1 + (1|Batch)", REML = FALSE, lme4 = as.character(packageVersion("lme4")),
                  logLik = as.numeric(logLik(m)),
                  profile_ci_lme4 = list(names = rownames(ci), lower = unname(ci[, 1]), upper = unname(ci[, 2]))),
           auto_unbox = TRUE, digits = NA, pretty = TRUE), "tests/data/inference/profile_dyestuff2.json")
