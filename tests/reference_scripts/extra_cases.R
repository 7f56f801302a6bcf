# glmmTMB 1.1.5 fits of models that the shared reference cases do not cover, on the
# bundled data sets; output: tests/data/extra_cases.json (read by
# tests/test_extra_cases.py). Run from the repo root: Rscript tests/reference_scripts/extra_cases.R
suppressMessages({library(glmmTMB); library(jsonlite)})
load_data <- function(name) {
  df <- read.csv(file.path("tmbx", "data", paste0(name, ".csv")), stringsAsFactors = FALSE)
  lv <- fromJSON(file.path("tmbx", "data", paste0(name, ".levels.json")))
  for (col in names(lv)) if (col %in% names(df)) df[[col]] <- factor(as.character(df[[col]]), levels = lv[[col]])
  df
}
cases <- list(
  list(id = "cbpp_proportion_weights", data = "cbpp", r = "incidence/size ~ period + (1|herd)",
       py = "incidence/size ~ period + (1|herd)", family = "binomial", weights = "size"),
  list(id = "sleepstudy_two_terms", data = "sleepstudy", r = "Reaction ~ Days + (1|Subject) + (0+Days|Subject)",
       py = "Reaction ~ Days + (1|Subject) + (0+Days|Subject)", family = "gaussian"),
  list(id = "owls_nb2_disp", data = "owls", r = "SiblingNegotiation ~ FoodTreatment + (1|Nest)",
       py = "SiblingNegotiation ~ FoodTreatment + (1|Nest)", family = "nbinom2", disp = "~SexParent"),
  list(id = "cake_nested_reml", data = "cake", r = "angle ~ temperature + (1|recipe/replicate)",
       py = "angle ~ temperature + (1|recipe/replicate)", family = "gaussian", REML = TRUE),
  list(id = "salamanders_genpois", data = "salamanders", r = "count ~ mined + (1|site)",
       py = "count ~ mined + (1|site)", family = "genpois"),
  list(id = "salamanders_nb1", data = "salamanders", r = "count ~ spp + mined + (1|site)",
       py = "count ~ spp + mined + (1|site)", family = "nbinom1"),
  list(id = "orthodont_slopes_reml", data = "orthodont", r = "distance ~ age + Sex + (age|Subject)",
       py = "distance ~ age + Sex + (age|Subject)", family = "gaussian", REML = TRUE),
  list(id = "salamanders_zip_re", data = "salamanders", r = "count ~ mined + (1|site)",
       py = "count ~ mined + (1|site)", family = "poisson", zi = "~mined + (1|site)")
)
out <- list()
for (cs in cases) {
  df <- load_data(cs$data)
  fam <- switch(cs$family, gaussian = gaussian(), binomial = binomial(), poisson = poisson(),
                nbinom2 = nbinom2(), nbinom1 = nbinom1(), genpois = genpois())
  args <- list(formula = as.formula(cs$r), data = df, family = fam,
               REML = isTRUE(cs$REML))
  if (!is.null(cs$zi)) args$ziformula <- as.formula(cs$zi)
  if (!is.null(cs$disp)) args$dispformula <- as.formula(cs$disp)
  if (!is.null(cs$weights)) args$weights <- df[[cs$weights]]
  fit <- do.call(glmmTMB, args)
  fe <- fixef(fit)
  se <- lapply(vcov(fit), function(v) if (length(v)) sqrt(diag(v)) else NULL)
  vc <- VarCorr(fit)$cond
  out[[cs$id]] <- list(
    dataset = cs$data, python_formula = cs$py, family = cs$family, REML = isTRUE(cs$REML),
    ziformula = if (is.null(cs$zi)) NULL else cs$zi, dispformula = if (is.null(cs$disp)) NULL else cs$disp,
    weights = if (is.null(cs$weights)) NULL else cs$weights,
    logLik = as.numeric(logLik(fit)), df = attr(logLik(fit), "df"),
    fixef = lapply(fe, function(v) as.list(v)), se = lapply(se, function(v) as.list(v)),
    sd = lapply(vc, function(v) as.numeric(attr(v, "stddev"))),
    sigma = sigma(fit), version = as.character(packageVersion("glmmTMB"))
  )
}
writeLines(toJSON(out, auto_unbox = TRUE, digits = 15, null = "null"), "tests/data/extra_cases.json")
