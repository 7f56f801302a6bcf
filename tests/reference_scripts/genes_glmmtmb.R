# glmmTMB 1.1.5 fits of y ~ group + (1|donor), nbinom2, one per gene of
# tests/data/genes_ragged.csv (tests/reference_scripts/genes_make_data.py),
# and lme4-free BH adjustment of the Wald p-values across genes.
# usage: Rscript tests/reference_scripts/genes_glmmtmb.R  -> tests/data/genes_glmmtmb.json
suppressPackageStartupMessages({library(glmmTMB); library(jsonlite)})
args <- commandArgs(trailingOnly = FALSE)
here <- dirname(normalizePath(sub("--file=", "", args[grep("--file=", args)])))
d <- read.csv(file.path(here, "..", "data", "genes_ragged.csv"), stringsAsFactors = FALSE)
d$group <- factor(d$group, levels = c("A", "B"))
d$donor <- factor(d$donor)
out <- list()
secs <- c()
for (g in sort(unique(d$gene))) {
  dg <- d[d$gene == g, ]
  dg$donor <- droplevels(dg$donor)
  t0 <- proc.time()[["elapsed"]]
  fit <- glmmTMB(y ~ group + (1 | donor), data = dg, family = nbinom2)
  secs <- c(secs, proc.time()[["elapsed"]] - t0)
  cf <- summary(fit)$coefficients$cond
  out[[g]] <- list(
    logLik = as.numeric(logLik(fit)), nobs = nobs(fit),
    fixef = as.list(setNames(cf[, 1], rownames(cf))), se = as.list(setNames(cf[, 2], rownames(cf))),
    p = as.list(setNames(cf[, 4], rownames(cf))),
    sd_donor = attr(VarCorr(fit)$cond$donor, "stddev")[[1]], sigma = sigma(fit),
    converged = fit$sdr$pdHess && fit$fit$convergence == 0)
}
genes <- names(out)
for (cn in c("(Intercept)", "groupB")) {
  padj <- p.adjust(sapply(genes, function(g) out[[g]]$p[[cn]]), method = "BH")
  for (g in genes) out[[g]]$padj[[cn]] <- padj[[g]]
}
res <- list(formula = "y ~ group + (1|donor)", family = "nbinom2",
            versions = list(glmmTMB = as.character(packageVersion("glmmTMB")), R = R.version.string),
            seconds_per_gene = median(secs), genes = out)
writeLines(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE),
           file.path(here, "..", "data", "genes_glmmtmb.json"))
