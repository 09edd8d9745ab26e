# R nlme (Lindstrom-Bates FOCE, ML) on a Theoph-design CSV written by benchmarks/_design.py.
# Usage: Rscript benchmarks/peers/nlme_fit.R data.csv repeats
# Prints one JSON line: estimates (log ka, log CL, log V; IIV SDs; residual SD), -2LL, fit times.
suppressPackageStartupMessages(library(nlme))
args <- commandArgs(trailingOnly = TRUE)
path <- args[1]
repeats <- if (length(args) > 1) as.integer(args[2]) else 3L
d <- read.csv(path)
d <- d[d$EVID == 0, c("ID", "TIME", "DV", "DOSE")]
d <- groupedData(DV ~ TIME | ID, data = d)
f <- function(Dose, t, lKa, lCl, lV) {
  ka <- exp(lKa); ke <- exp(lCl - lV); v <- exp(lV)
  Dose * ka / (v * (ka - ke)) * (exp(-ke * t) - exp(-ka * t))
}
fit_once <- function() nlme(DV ~ f(DOSE, TIME, lKa, lCl, lV), data = d,
                            fixed = lKa + lCl + lV ~ 1, random = pdDiag(lKa + lCl + lV ~ 1),
                            start = c(lKa = 0.5, lCl = 1.0, lV = 3.5), method = "ML",
                            control = nlmeControl(maxIter = 200, pnlsMaxIter = 20, msMaxIter = 200))
times <- numeric(0)
ok <- TRUE; msg <- ""
for (r in seq_len(repeats)) {
  t0 <- proc.time()[["elapsed"]]
  m <- tryCatch(fit_once(), error = function(e) { ok <<- FALSE; msg <<- conditionMessage(e); NULL })
  times <- c(times, proc.time()[["elapsed"]] - t0)
  if (!ok) break
}
if (ok) {
  fe <- fixef(m); sds <- as.numeric(VarCorr(m)[1:3, "StdDev"])
  cat(sprintf('{"ok": true, "tka": %.6f, "tcl": %.6f, "tv": %.6f, "omega": [%.6f, %.6f, %.6f], "add_sd": %.6f, "m2ll": %.4f, "fit_s": [%s], "n_subjects": %d}\n',
              fe[["lKa"]], fe[["lCl"]], fe[["lV"]], sds[1], sds[2], sds[3], m$sigma, -2 * as.numeric(logLik(m)),
              paste(sprintf("%.4f", times), collapse = ", "), length(unique(d$ID))))
} else {
  cat(sprintf('{"ok": false, "error": "%s", "fit_s": [%s]}\n', gsub('"', "'", msg), paste(sprintf("%.4f", times), collapse = ", ")))
}
