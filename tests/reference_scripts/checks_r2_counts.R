# R2 (Nakagawa) for count GLMMs: performance::r2_nakagawa (0.10.2) on glmmTMB fits, with
# the variance components by insight::get_variance's rules spelled out (and checked
# against performance's R2 to 1e-12):
#   v_f = var(X beta); v_r = sum over terms of mean(diag(Z Sigma Z')); v_e = log1p(Var(mu)/mu^2)
#   with mu = exp(intercept of the null model update(fit, . ~ (re terms))).
# Writes tests/data/checks_extra.json.
suppressMessages({library(glmmTMB); library(jsonlite); library(performance)})
sal <- read.csv("/work/shared/reference/data/salamanders.csv")
lev <- fromJSON("/work/shared/reference/data/salamanders.levels.json")
for (v in names(lev)) if (v %in% names(sal)) sal[[v]] <- factor(sal[[v]], levels = lev[[v]])
r2_counts <- function(fit, null, family) {
  X <- getME(fit, "X")
  beta <- fixef(fit)$cond
  vf <- var(as.vector(X %*% beta))
  vc <- VarCorr(fit)$cond
  vr <- sum(sapply(vc, function(S) { Z <- X[, rownames(S), drop = FALSE]; mean(rowSums((Z %*% S) * Z)) }))
  mu <- exp(unname(fixef(null)$cond[1]))
  var_y <- switch(family, poisson = mu, nbinom2 = mu * (1 + mu / sigma(fit)))
  ve <- log1p(var_y / mu^2)
  perf <- suppressWarnings(r2_nakagawa(fit))
  stopifnot(abs(perf$R2_marginal - vf / (vf + vr + ve)) < 1e-12,
            abs(perf$R2_conditional - (vf + vr) / (vf + vr + ve)) < 1e-12)
  list(marginal = unname(perf$R2_marginal), conditional = unname(perf$R2_conditional),
       var_fixed = vf, var_random = vr, var_distribution = ve, null_intercept = log(mu),
       logLik = as.numeric(logLik(fit)), fixef = as.list(beta))
}
out <- list(versions = list(glmmTMB = as.character(packageVersion("glmmTMB")), R = R.version.string),
            performance = as.character(packageVersion("performance")),
            note = "performance::r2_nakagawa on glmmTMB fits; variance components by insight's rules")
for (fam in c("poisson", "nbinom2")) {
  fit <- glmmTMB(count ~ spp + mined + (1 | site), data = sal, family = fam)
  null <- glmmTMB(count ~ (1 | site), data = sal, family = fam)
  out[[paste0("r2_salamanders_", fam)]] <- r2_counts(fit, null, fam)
}
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), "/work/main/tests/data/checks_extra.json")
