## Posterior modes (MAP) under priors, computed independently of tmbx for
## tests/test_priors.py; output: tests/data/priors_extra.json.
##
## glmmTMB 1.1.5 has no `priors` argument, and blme is not installed here, so
## the modes are computed from lme4's own objectives plus the prior's log
## density, optimized to tight tolerance:
## - cbpp (binomial GLMM, Laplace): glmer's deviance function of (theta, beta)
##   plus -2 * glmmTMB's log prior (normal(mean, sd); t(mean, sd, df) =
##   dt((x - mean)/sd, df)/sd) on the non-intercept fixed effects
##   (glmmTMB's default when coef is blank).
## - sleepstudy (REML): lmer's profiled REML deviance of theta plus blme's
##   Wishart "polynomial term" for scale = Inf, common.scale = TRUE
##   (blme R/dist_wishart.R: -2 (df - d - 1) sum(log(diag(Lambda)))),
##   df = d + 2.5 (blmer's default) and df = 3.5.
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
dd <- "tmbx/data"
out <- list(versions = list(lme4 = as.character(packageVersion("lme4")), R = R.version.string))

cbpp <- read.csv(file.path(dd, "cbpp.csv"), colClasses = c(herd = "character", period = "character"))
cbpp$herd <- factor(cbpp$herd, levels = as.character(1:15))
cbpp$period <- factor(cbpp$period, levels = as.character(1:4))
form <- cbind(incidence, size - incidence) ~ period + (1 | herd)
g0 <- glmer(form, cbpp, family = binomial)
dev <- glmer(form, cbpp, family = binomial, devFunOnly = TRUE)  # Laplace deviance of c(theta, beta)
logprior <- list(
  "normal(0, 1)" = function(b) sum(dnorm(b[-1], 0, 1, log = TRUE)),
  "t(0, 1, 3)" = function(b) sum(dt((b[-1] - 0) / 1, 3, log = TRUE) - log(1))
)
for (nm in names(logprior)) {
  obj <- function(p) dev(p) - 2 * logprior[[nm]](p[-1])
  start <- c(getME(g0, "theta"), fixef(g0))
  o <- nlminb(start, obj, lower = c(0, rep(-Inf, 4)), control = list(rel.tol = 1e-14, eval.max = 1e4, iter.max = 1e4))
  o <- optim(o$par, obj, method = "BFGS", control = list(reltol = 1e-15, maxit = 1e4))
  b <- o$par[-1]; names(b) <- names(fixef(g0))
  out$cbpp[[nm]] <- list(python_formula = "cbind(incidence, size - incidence) ~ period + (1|herd)",
                          family = "binomial", fixef = as.list(b), sd_herd = o$par[1],
                          log_posterior = -o$value / 2)
}

ss <- read.csv(file.path(dd, "sleepstudy.csv"), colClasses = c(Subject = "character"))
devr <- lmer(Reaction ~ Days + (Days | Subject), ss, REML = TRUE, devFunOnly = TRUE)
for (df in c(4.5, 3.5)) {
  pen <- function(th) {
    L <- matrix(c(th[1], th[2], 0, th[3]), 2)
    if (any(diag(L) <= 0)) return(Inf)
    devr(th) - 2 * (df - 2 - 1) * sum(log(diag(L)))
  }
  o <- optim(c(1, 0, 1), pen, method = "Nelder-Mead", control = list(reltol = 1e-15, maxit = 1e5))
  o <- optim(o$par, pen, method = "BFGS", control = list(reltol = 1e-15))
  th <- o$par
  m <- lmer(Reaction ~ Days + (Days | Subject), ss, REML = TRUE, start = list(theta = th),
            control = lmerControl(optimizer = NULL))
  L <- matrix(c(th[1], th[2], 0, th[3]), 2); s <- sigma(m); S <- s^2 * L %*% t(L)
  out$sleepstudy_wishart[[paste0("df=", df)]] <- list(
    python_formula = "Reaction ~ Days + (Days|Subject)", REML = TRUE,
    sd = sqrt(diag(S)), cor = S[1, 2] / sqrt(S[1, 1] * S[2, 2]), sigma = s, fixef = as.list(fixef(m)))
}
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), "tests/data/priors_extra.json")
