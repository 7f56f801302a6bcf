# emmeans 1.8.4.1 on glmmTMB 1.1.5 fits that the shared references do not cover:
# a zero-inflated Poisson (conditional rates and their ratios; zero-inflation
# probabilities) and a Gamma GLMM with a dispersion model. Writes
# tests/data/emmeans_extra.json (run from the repository root).
suppressMessages({library(glmmTMB); library(emmeans); library(jsonlite)})
read <- function(name) {
  d <- read.csv(file.path("tmbx/data", paste0(name, ".csv")))
  lev <- fromJSON(file.path("tmbx/data", paste0(name, ".levels.json")))
  for (v in names(lev)) if (v %in% names(d)) d[[v]] <- factor(d[[v]], levels = lev[[v]])
  d
}
sal <- read("salamanders"); cake <- read("cake")
tab <- function(x) { x <- as.data.frame(x); lapply(x, function(col) if (is.factor(col)) as.character(col) else col) }
zi <- glmmTMB(count ~ spp + mined + (1|site), ziformula = ~mined + cover, data = sal, family = poisson())
gm <- glmmTMB(angle ~ recipe + temperature + (1|recipe:replicate), dispformula = ~recipe, data = cake,
              family = Gamma(link = "log"))
em_spp <- emmeans(zi, "spp", type = "response")
em_zi <- emmeans(zi, "mined", component = "zi", type = "response")
em_gm <- emmeans(gm, "recipe", type = "response")
out <- list(
  versions = list(glmmTMB = as.character(packageVersion("glmmTMB")), emmeans = as.character(packageVersion("emmeans"))),
  salamanders_zip = list(formula = "count ~ spp + mined + (1|site)", ziformula = "~mined + cover",
                         logLik = as.numeric(logLik(zi)),
                         emmeans_spp_response = tab(em_spp), pairs_spp_ratio = tab(pairs(em_spp)),
                         emmeans_zi_mined_response = tab(em_zi)),
  cake_gamma_disp = list(formula = "angle ~ recipe + temperature + (1|recipe:replicate)", dispformula = "~recipe",
                         logLik = as.numeric(logLik(gm)), emmeans_recipe_response = tab(em_gm),
                         pairs_recipe_ratio = tab(pairs(em_gm)))
)
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, na = "null", pretty = TRUE), "tests/data/emmeans_extra.json")
