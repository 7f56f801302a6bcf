# Time one glmmTMB or lme4 fit of a benchmark case (driven by bench_glmm.py).
#
#   Rscript benchmarks/r_glmm_fit.R SPEC.json
#
# SPEC.json (written by bench_glmm.py): tool ("glmmTMB" or "lme4"), csv, levels
# (a .levels.json: factor columns and their levels in R's order, or null),
# factors (further columns to read as factors), setup (R code run on `data`
# before fitting, e.g. numFactor for spatial structures), formula, family
# (glmmTMB's family as R code: "poisson", "Gamma(link='log')", ...), ziformula,
# dispformula, REML, warmup (fits before timing), repeats (timed fits).
#
# Only the fit call is timed (elapsed wall time); loading packages and reading
# the data are not. Prints one line: "@@RESULT@@ {json}".

suppressPackageStartupMessages({
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
spec <- fromJSON(args[[1]], simplifyVector = TRUE)
tool <- spec$tool

t_pkg <- system.time(suppressPackageStartupMessages({
  if (tool == "glmmTMB") library(glmmTMB) else library(lme4)
}))[["elapsed"]]

read_data <- function(spec) {
  lv <- if (!is.null(spec$levels)) fromJSON(spec$levels, simplifyVector = TRUE) else list()
  cls <- setNames(rep("character", length(lv)), names(lv))
  data <- read.csv(spec$csv, colClasses = cls, check.names = FALSE)
  for (col in names(lv)) {
    if (col %in% names(data)) data[[col]] <- factor(data[[col]], levels = as.character(lv[[col]]))
  }
  for (col in spec$factors) data[[col]] <- factor(data[[col]])
  if (!is.null(spec$setup) && nzchar(spec$setup)) {
    eval(parse(text = spec$setup))
  }
  data
}

make_family <- function(f) {
  if (grepl("(", f, fixed = TRUE)) eval(parse(text = f)) else eval(parse(text = paste0(f, "()")))
}

data <- read_data(spec)
form <- as.formula(spec$formula)
fam <- make_family(spec$family)
zi <- if (is.null(spec$ziformula)) ~0 else as.formula(spec$ziformula)
disp <- if (is.null(spec$dispformula)) ~1 else as.formula(spec$dispformula)
reml <- isTRUE(spec$REML)

fit_once <- function() {
  if (tool == "glmmTMB") {
    glmmTMB(form, data = data, family = fam, ziformula = zi, dispformula = disp, REML = reml)
  } else if (fam$family == "gaussian" && fam$link == "identity") {
    lmer(form, data = data, REML = reml)
  } else {
    glmer(form, data = data, family = fam)
  }
}

warns <- character(0)
one <- function() {
  fit <- NULL
  el <- system.time(fit <- withCallingHandlers(fit_once(), warning = function(w) {
    warns <<- unique(c(warns, conditionMessage(w)))
    invokeRestart("muffleWarning")
  }))[["elapsed"]]
  list(fit = fit, seconds = el)
}

res <- tryCatch({
  times <- numeric(0)
  first <- NA_real_
  n_warm <- if (is.null(spec$warmup)) 0 else spec$warmup
  n_rep <- if (is.null(spec$repeats)) 1 else max(1, spec$repeats)
  last <- NULL
  for (i in seq_len(n_warm + n_rep)) {
    r <- one()
    if (i == 1) first <- r$seconds
    if (i > n_warm) times <- c(times, r$seconds)
    last <- r$fit
  }
  ll <- as.numeric(logLik(last))
  conv <- if (tool == "glmmTMB") {
    isTRUE(last$fit$convergence == 0) && !isFALSE(last$sdr$pdHessian)
  } else {
    length(last@optinfo$conv$lme4$messages) == 0
  }
  list(ok = TRUE, tool = tool, version = as.character(packageVersion(tool)),
       seconds = median(times), seconds_all = times, first_seconds = first,
       package_load_seconds = t_pkg, loglik = ll, converged = conv,
       warnings = warns, nobs = nobs(last))
}, error = function(e) {
  list(ok = FALSE, tool = tool, error = conditionMessage(e), warnings = warns)
})

cat("@@RESULT@@", toJSON(res, auto_unbox = TRUE, digits = NA, null = "null", na = "null"), "\n")
