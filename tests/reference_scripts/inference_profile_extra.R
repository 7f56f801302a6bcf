# Profile-likelihood intervals for models the shared reference files do not
# cover (tests/test_inference_profile.py reads the JSON this writes):
#   - a Poisson GLMM with crossed random effects (lme4::glmer, profile on the sd scale)
#   - a zero-inflated Poisson (glmmTMB, profile of the zi coefficients)
#   - an ar1 covariance (glmmTMB, rho profiled on its transformed scale, mapped back
#     with glmmTMB's rho = x / sqrt(1 + x^2))
# Run from the repository root: Rscript tests/reference_scripts/inference_profile_extra.R
suppressPackageStartupMessages({library(lme4); library(glmmTMB); library(jsonlite)})
ref <- "/work/shared/reference/data"
rd <- function(name) {
  d <- read.csv(file.path(ref, paste0(name, ".csv")), stringsAsFactors = FALSE)
  lv <- fromJSON(file.path(ref, paste0(name, ".levels.json")))
  for (v in names(lv)) d[[v]] <- factor(d[[v]], levels = lv[[v]])
  d
}
out <- list(versions = list(lme4 = as.character(packageVersion("lme4")),
                            glmmTMB = as.character(packageVersion("glmmTMB"))))
tab <- function(ci, secs) list(names = rownames(ci), lower = unname(ci[, 1]), upper = unname(ci[, 2]),
                              seconds = secs)

sal <- rd("salamanders")
# crossed GLMMs (lme4's profile; a model where it fails is recorded as such)
sal$present <- as.integer(sal$count > 0)
crossed <- list(
  poisson_crossed = list(f = count ~ mined + cover + (1|site) + (1|spp), family = poisson,
                         py = "count ~ mined + cover + (1|site) + (1|spp)", fam = "poisson"),
  binomial_crossed = list(f = present ~ mined + (1|site) + (1|spp), family = binomial,
                          py = "present ~ mined + (1|site) + (1|spp)", fam = "binomial"))
for (nm in names(crossed)) {
  cc <- crossed[[nm]]
  t0 <- Sys.time()
  m <- glmer(cc$f, data = sal, family = cc$family)
  fit_s <- as.numeric(Sys.time() - t0, units = "secs")
  t0 <- Sys.time()
  ci <- tryCatch(confint(m, method = "profile", oldNames = FALSE), error = function(e) conditionMessage(e))
  secs <- as.numeric(Sys.time() - t0, units = "secs")
  out[[nm]] <- list(python_formula = cc$py, family = cc$fam, logLik = as.numeric(logLik(m)),
                    fit_seconds = fit_s,
                    profile_ci_lme4 = if (is.character(ci)) list(error = ci, seconds = secs) else tab(ci, secs))
}

# zero-inflated Poisson: profile of the zi coefficient(s) (glmmTMB's profile
# can fail with "spline must be monotone"; the first model that works is kept)
zcands <- list(list(zi = "~mined", parm = c("zi~(Intercept)", "zi~minedno")),
               list(zi = "~1", parm = "zi~(Intercept)"))
for (zc in zcands) {
  z <- glmmTMB(count ~ mined + (1|site), ziformula = as.formula(zc$zi), data = sal, family = poisson)
  t0 <- Sys.time()
  ci <- tryCatch(confint(z, method = "profile", parm = zc$parm), error = function(e) NULL)
  if (is.null(ci)) next
  out$zip <- list(python_formula = "count ~ mined + (1|site)", ziformula = zc$zi, family = "poisson",
                  logLik = as.numeric(logLik(z)),
                  profile_ci_glmmTMB = tab(ci[, 1:2, drop = FALSE], as.numeric(Sys.time() - t0, units = "secs")))
  break
}

# ar1: glmmTMB's confint(method = "profile") profiles the log sd but fails on rho
# here ("spline must be monotone"), so rho's profile is computed directly: refit
# with theta[2] (rho's transform, rho = x / sqrt(1 + x^2)) held by map at each
# grid value, zeta = sign * sqrt(deviance difference), limits by spline.
od <- rd("orthodont")
od$fage <- factor(od$age)
a <- glmmTMB(distance ~ age + Sex + ar1(fage + 0|Subject), data = od)
th <- getME(a, "theta")
t0 <- Sys.time()
ci_sd <- confint(a, method = "profile", parm = 5)
grid <- th[2] + seq(-1.6, 2.4, by = 0.2)
zeta <- sapply(grid, function(v) {
  m <- glmmTMB(distance ~ age + Sex + ar1(fage + 0|Subject), data = od,
               start = list(theta = c(th[1], v)), map = list(theta = factor(c(1, NA))))
  sign(v - th[2]) * sqrt(max(0, 2 * (as.numeric(logLik(a)) - as.numeric(logLik(m)))))
})
secs <- as.numeric(Sys.time() - t0, units = "secs")
inv <- splinefun(zeta, grid, method = "monoH.FC")
zq <- qnorm(0.975)
rho <- function(x) x / sqrt(1 + x^2)
out$ar1 <- list(python_formula = "distance ~ age + Sex + ar1(C(age) + 0|Subject)", family = "gaussian",
                logLik = as.numeric(logLik(a)), seconds = secs,
                rho = list(estimate = rho(th[2]), lower = rho(inv(-zq)), upper = rho(inv(zq)),
                           grid_theta = grid, zeta = zeta),
                sd = list(estimate = exp(th[1]), lower = exp(ci_sd[1, 1]), upper = exp(ci_sd[1, 2])))
write(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), "tests/data/inference/profile_extra.json")
