# TMB side of the ar1xar1 benchmark (driven by bench_ar1xar1.py).
#
#   Rscript benchmarks/tmb_ar1xar1.R compile <build_dir>
#       copies ar1xar1.cpp into <build_dir> and compiles it with TMB::compile;
#       prints {"compile_s": ...} as JSON.
#   Rscript benchmarks/tmb_ar1xar1.R fit <build_dir> <counts.csv> [repeats]
#       in this (fresh) process: dyn.load, MakeADFun, nlminb, sdreport, then
#       `repeats` repeated fits (a fresh MakeADFun + nlminb, and nlminb again on
#       the first object); prints the timings and estimates as one JSON line.
suppressPackageStartupMessages({
  library(TMB)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
mode <- args[1]
build <- normalizePath(args[2], mustWork = FALSE)
here <- local({
  f <- sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))
  dirname(normalizePath(f))
})

if (mode == "compile") {
  dir.create(build, showWarnings = FALSE, recursive = TRUE)
  file.copy(file.path(here, "ar1xar1.cpp"), file.path(build, "ar1xar1.cpp"), overwrite = TRUE)
  old <- setwd(build)
  t <- system.time(TMB::compile("ar1xar1.cpp"))[["elapsed"]]
  setwd(old)
  cat(toJSON(list(compile_s = t, tmb_version = as.character(packageVersion("TMB"))),
             auto_unbox = TRUE, digits = NA), "\n")
  quit(status = 0)
}

stopifnot(mode == "fit")
csv <- args[3]
repeats <- if (length(args) >= 4) as.integer(args[4]) else 3L

t0 <- proc.time()[["elapsed"]]
dyn.load(dynlib(file.path(build, "ar1xar1")))
t_load <- proc.time()[["elapsed"]] - t0

df <- read.csv(csv)
n1 <- max(df$i) + 1L
n2 <- max(df$j) + 1L
N <- matrix(0, n1, n2)
N[cbind(df$i + 1L, df$j + 1L)] <- df$N

parameters <- list(eta = matrix(0, n1, n2), transf_phi1 = atanh(0.5), transf_phi2 = atanh(0.5))

cpu_last <- NA
elapsed <- function(expr) {
  p <- proc.time()
  force(expr)
  q <- proc.time() - p
  cpu_last <<- q[["user.self"]] + q[["sys.self"]]
  q[["elapsed"]]
}

t_make <- elapsed(obj <- MakeADFun(data = list(N = N), parameters = parameters,
                                   random = "eta", DLL = "ar1xar1", silent = TRUE))
t_opt <- elapsed(opt <- nlminb(obj$par, obj$fn, obj$gr))
cpu_opt <- cpu_last
t_sd <- elapsed(rep <- sdreport(obj))
s <- summary(rep, "fixed")
sr <- summary(rep, "report")

# repeated fits in the same process:
#  - fresh: a new MakeADFun + nlminb (inner problem starts from eta = 0, like tmbx's repeated fit);
#  - same: nlminb again on the same object (TMB warm-starts the inner problem at the last optimum).
t_fresh <- numeric(0); ll_fresh <- numeric(0); cpu_fresh <- numeric(0)
t_same <- numeric(0); ll_same <- numeric(0)
for (r in seq_len(repeats)) {
  t_fresh[r] <- elapsed({
    obj_r <- MakeADFun(data = list(N = N), parameters = parameters, random = "eta",
                       DLL = "ar1xar1", silent = TRUE)
    opt_r <- nlminb(obj_r$par, obj_r$fn, obj_r$gr)
  })
  cpu_fresh[r] <- cpu_last
  ll_fresh[r] <- -opt_r$objective
  t_same[r] <- elapsed(opt_s <- nlminb(obj$par, obj$fn, obj$gr))
  ll_same[r] <- -opt_s$objective
}

out <- list(
  n1 = n1, n2 = n2, n_random = length(obj$env$random),
  load_s = t_load, make_s = t_make, nlminb_s = t_opt, sdreport_s = t_sd,
  total_s = t_make + t_opt, total_with_sdreport_s = t_make + t_opt + t_sd,
  repeat_fresh_s = t_fresh, repeat_fresh_cpu_s = cpu_fresh, repeat_fresh_loglik = ll_fresh,
  nlminb_cpu_s = cpu_opt,
  repeat_same_obj_s = t_same, repeat_same_obj_loglik = ll_same,
  loglik = -opt$objective, convergence = opt$convergence, message = opt$message,
  iterations = opt$iterations, evaluations = as.list(opt$evaluations),
  par = as.list(opt$par), se = as.list(setNames(s[, "Std. Error"], rownames(s))),
  phi = as.list(setNames(sr[, "Estimate"], rownames(sr))),
  max_grad = max(abs(rep$gradient.fixed)), pd_hess = rep$pdHess,
  tmb_version = as.character(packageVersion("TMB")),
  ad_framework = "CppAD (TMB::compile default in 1.9.2: -DCPPAD_FRAMEWORK)",
  omp_threads = tryCatch(TMB::openmp(DLL = "ar1xar1")[[1]], error = function(e) NA)
)
cat(toJSON(out, auto_unbox = TRUE, digits = NA), "\n")
