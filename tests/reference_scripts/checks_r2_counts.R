# R2 (Nakagawa) for count GLMMs by insight::get_variance's rules (performance 0.10.2 /
# insight 0.19), computed by hand in R because performance is not installed here:
#   v_f = var(X beta); v_r = sum over terms of mean(diag(Z Sigma Z')); v_e = log1p(Var(mu)/mu^2)
#   with mu = exp(intercept of the null model update(fit, . ~ (re terms))).
# Writes tests/data/checks_extra.json.
suppressMessages({library(glmmTMB); library(jsonlite)})
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
  list(marginal = vf / (vf + vr + ve), conditional = (vf + vr) / (vf + vr + ve),
       var_fixed = vf, var_random = vr, var_distribution = ve, null_intercept = log(mu),
       logLik = as.numeric(logLik(fit)), fixef = as.list(beta))
}
out <- list(versions = list(glmmTMB = as.character(packageVersion("glmmTMB")), R = R.version.string),
            note = "performance is not installed; insight's variance rules applied by hand to glmmTMB fits")
for (fam in c("poisson", "nbinom2")) {
  fit <- glmmTMB(count ~ spp + mined + (1 | site), data = sal, family = fam)
  null <- glmmTMB(count ~ (1 | site), data = sal, family = fam)
  out[[paste0("r2_salamanders_", fam)]] <- r2_counts(fit, null, fam)
}
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), "/work/main/tests/data/checks_extra.json")
