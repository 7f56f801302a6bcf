# lmerTest / pbkrtest / nlme / car references for tmbx's df, anova, drop1 and contrasts on models the shared
# reference files do not cover. Output: tests/data/inference_extra_ddf_anova.json (read by
# tests/test_inference_ddf.py and tests/test_inference_anova_emmeans.py).
# Run from the repo root: Rscript tests/reference_scripts/ddf_anova_extra.R
suppressMessages({library(lme4); library(lmerTest); library(pbkrtest); library(nlme); library(car)
                  library(glmmTMB); library(jsonlite)})
load_data <- function(name) {
  df <- read.csv(file.path("tmbx", "data", paste0(name, ".csv")), stringsAsFactors = FALSE)
  lv <- fromJSON(file.path("tmbx", "data", paste0(name, ".levels.json")))
  for (col in names(lv)) if (col %in% names(df)) df[[col]] <- factor(as.character(df[[col]]), levels = lv[[col]])
  df
}
tab <- function(x) { x <- as.data.frame(x); x[["_row"]] <- rownames(x); x }
out <- list(versions = lapply(c(lmerTest = "lmerTest", pbkrtest = "pbkrtest", nlme = "nlme", car = "car",
                                glmmTMB = "glmmTMB", lme4 = "lme4"), function(p) as.character(packageVersion(p))))

## LMM, between-subject factor: Orthodont
orth <- load_data("orthodont")
m <- lmer(distance ~ age + Sex + (1|Subject), data = orth, REML = TRUE)
L2 <- rbind(c(0, 1, 0), c(0, 0, 1))
out$orthodont <- list(
  formula = "distance ~ age + Sex + (1|Subject)",
  satterthwaite = tab(coef(summary(m, ddf = "Satterthwaite"))),
  kenward_roger = tab(coef(summary(m, ddf = "Kenward-Roger"))),
  anova3_satterthwaite = tab(anova(m, type = 3, ddf = "Satterthwaite")),
  anova2_satterthwaite = tab(anova(m, type = 2, ddf = "Satterthwaite")),
  anova3_kenward_roger = tab(anova(m, type = 3, ddf = "Kenward-Roger")),
  contest_1d = tab(contest(m, c(0, 1, -1), ddf = "Satterthwaite")),
  contest_2d_satterthwaite = tab(contest(m, L2, ddf = "Satterthwaite")),
  contest_2d_kenward_roger = tab(contest(m, L2, ddf = "Kenward-Roger")),
  nlme_df = tab(summary(lme(distance ~ age + Sex, random = ~1|Subject, data = orth))$tTable),
  krmodcomp = {k <- KRmodcomp(m, lmer(distance ~ 1 + (1|Subject), data = orth, REML = TRUE))$test
               tab(k)}
)

## Unbalanced random slopes (every 7th row dropped), correlated and uncorrelated
sleep <- load_data("sleepstudy")[-seq(1, 180, by = 7), ]
ms <- lmer(Reaction ~ Days + (Days|Subject), data = sleep, REML = TRUE)
md <- lmer(Reaction ~ Days + (1|Subject) + (0 + Days|Subject), data = sleep, REML = TRUE)
out$sleepstudy_unbalanced <- list(
  rows_dropped = "every 7th row, starting with the first (R's seq(1, 180, by = 7))",
  formula_us = "Reaction ~ Days + (Days|Subject)",
  us_satterthwaite = tab(coef(summary(ms, ddf = "Satterthwaite"))),
  us_kenward_roger = tab(coef(summary(ms, ddf = "Kenward-Roger"))),
  formula_diag = "Reaction ~ Days + (1|Subject) + (0 + Days|Subject)",
  diag_satterthwaite = tab(coef(summary(md, ddf = "Satterthwaite"))),
  diag_kenward_roger = tab(coef(summary(md, ddf = "Kenward-Roger")))
)

## LMM with an interaction and nested random effects: cake
cake <- load_data("cake")
m2 <- lmer(angle ~ recipe * temp + (1|recipe:replicate), data = cake, REML = TRUE)
m2a <- lmer(angle ~ recipe + temp + (1|recipe:replicate), data = cake, REML = TRUE)
out$cake <- list(
  formula = "angle ~ recipe * temp + (1|recipe:replicate)",
  satterthwaite = tab(coef(summary(m2, ddf = "Satterthwaite"))),
  kenward_roger = tab(coef(summary(m2, ddf = "Kenward-Roger"))),
  anova3_satterthwaite = tab(anova(m2, type = 3, ddf = "Satterthwaite")),
  anova2_satterthwaite = tab(anova(m2, type = 2, ddf = "Satterthwaite")),
  nlme_df = tab(summary(lme(angle ~ recipe * temp, random = ~1|recipe/replicate, data = cake))$tTable),
  krmodcomp = tab(KRmodcomp(m2, m2a)$test)
)

m3 <- lmer(angle ~ recipe * temperature + (1|recipe:replicate), data = cake, REML = TRUE)
out$cake_factorial <- list(
  formula = "angle ~ recipe * temperature + (1|recipe:replicate)",
  anova3_satterthwaite = tab(anova(m3, type = 3, ddf = "Satterthwaite")),
  anova2_satterthwaite = tab(anova(m3, type = 2, ddf = "Satterthwaite")),
  anova3_kenward_roger = tab(anova(m3, type = 3, ddf = "Kenward-Roger"))
)

## GLMMs (glmmTMB) for car::Anova, drop1 and linear hypotheses
sal <- load_data("salamanders")
nb <- glmmTMB(count ~ spp * mined + cover + (1|site), data = sal, family = nbinom2())
hyp <- c("sppPR - sppDM = 0", "sppDF = 0")
lh <- linearHypothesis(nb, hyp, coef. = fixef(nb)$cond, vcov. = vcov(nb)$cond)
lh1 <- linearHypothesis(nb, "sppPR - sppDM = 0", coef. = fixef(nb)$cond, vcov. = vcov(nb)$cond)
out$salamanders_nb2 <- list(
  formula = "count ~ spp * mined + cover + (1|site)", family = "nbinom2",
  logLik = as.numeric(logLik(nb)),
  anova2 = tab(Anova(nb, type = 2)), anova3 = tab(Anova(nb, type = 3)),
  drop1 = tab(drop1(nb, test = "Chisq")),
  lh_joint = list(Chisq = lh$Chisq[2], Df = lh$Df[2], p = lh[["Pr(>Chisq)"]][2]),
  lh_single = list(Chisq = lh1$Chisq[2], Df = lh1$Df[2], p = lh1[["Pr(>Chisq)"]][2])
)
pc <- glmmTMB(count ~ spp + mined + (1|site) + (1|DOY), data = sal, family = poisson())
out$salamanders_poisson_crossed <- list(
  formula = "count ~ spp + mined + (1|site) + (1|DOY)", family = "poisson",
  logLik = as.numeric(logLik(pc)), sd = lapply(VarCorr(pc)$cond, function(v) attr(v, "stddev")),
  anova2 = tab(Anova(pc, type = 2)), anova3 = tab(Anova(pc, type = 3)),
  drop1 = tab(drop1(pc, test = "Chisq"))
)
zi <- glmmTMB(count ~ spp + mined + (1|site), ziformula = ~mined + cover, data = sal, family = poisson())
out$salamanders_zip <- list(
  formula = "count ~ spp + mined + (1|site)", ziformula = "~mined + cover", family = "poisson",
  logLik = as.numeric(logLik(zi)),
  anova2_zi = tab(Anova(zi, type = 2, component = "zi")), anova3_zi = tab(Anova(zi, type = 3, component = "zi"))
)
gm <- glmmTMB(angle ~ recipe + temperature + (1|recipe:replicate), dispformula = ~recipe, data = cake,
              family = Gamma(link = "log"))
out$cake_gamma_disp <- list(
  formula = "angle ~ recipe + temperature + (1|recipe:replicate)", dispformula = "~recipe",
  family = "Gamma(link='log')", logLik = as.numeric(logLik(gm)),
  anova3_cond = tab(Anova(gm, type = 3)),
  anova3_disp = tryCatch(tab(Anova(gm, type = 3, component = "disp")), error = function(e) conditionMessage(e))
)
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, null = "null", na = "null", pretty = TRUE),
           "tests/data/inference_extra_ddf_anova.json")
