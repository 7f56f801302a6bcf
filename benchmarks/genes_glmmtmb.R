# A loop of glmmTMB fits, y ~ group + (1|donor), nbinom2, one per gene of a CSV
# (long format: gene, cell, donor, group, y). Prints JSON: per-gene seconds and logLik.
# usage: Rscript benchmarks/genes_glmmtmb.R SAMPLE.csv
suppressPackageStartupMessages({library(glmmTMB); library(jsonlite)})
d <- read.csv(commandArgs(trailingOnly = TRUE)[1], stringsAsFactors = TRUE)
d$group <- factor(d$group, levels = c("A", "B"))
out <- list()
for (g in levels(d$gene)) {
  dg <- droplevels(d[d$gene == g, ])
  t0 <- proc.time()[["elapsed"]]
  fit <- glmmTMB(y ~ group + (1 | donor), data = dg, family = nbinom2)
  out[[g]] <- list(seconds = proc.time()[["elapsed"]] - t0, logLik = as.numeric(logLik(fit)))
}
cat(toJSON(list(version = as.character(packageVersion("glmmTMB")), genes = out), auto_unbox = TRUE, digits = NA))
