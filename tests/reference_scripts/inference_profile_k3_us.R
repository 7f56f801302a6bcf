# lme4's profile intervals for tests/data/inference/k3_us.csv (see inference_profile_k3_us.py).
# Writes tests/data/inference/k3_us_lme4.json (the test reads loglik and ci).
#   Rscript tests/reference_scripts/inference_profile_k3_us.R
suppressMessages(library(lme4)); library(jsonlite)
d <- read.csv("tests/data/inference/k3_us.csv"); d$g <- factor(d$g)
m <- lmer(y ~ x1 + x2 + (x1 + x2 | g), data = d, REML = FALSE)
t <- system.time(ci <- confint(m, method = "profile", oldNames = FALSE))[["elapsed"]]
print(ci)
out <- list(source = sprintf(paste0(
  "lme4 %s, R %s.%s: lmer(y ~ x1 + x2 + (x1 + x2 | g), REML = FALSE); confint(m, method = 'profile', oldNames = FALSE). ",
  "Data simulated by numpy (seed 20261126; 30 groups x 12, true sds 2, 0.8, 0.6, correlations 0.5, -0.3, 0.4). ",
  "lme4 warned 'non-monotonic profile for cor_x2.(Intercept)|g' (its limits for that parameter are not used)."),
  packageVersion("lme4"), R.version$major, strsplit(R.version$minor, ".", fixed = TRUE)[[1]][1]),
            loglik = as.numeric(logLik(m)), seconds = t,
            ci = setNames(lapply(seq_len(nrow(ci)), function(i) unname(ci[i, ])), rownames(ci)))
write_json(out, "tests/data/inference/k3_us_lme4.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
