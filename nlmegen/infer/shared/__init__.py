"""What every backend shares: the result type (`result`), start values and fixed sites (`start`),
draw summaries (`draws`), pointwise log-likelihoods for ArviZ (`pointwise`) and the NONMEM-style
covariance step (`covariance`). The density itself lives in `nlmegen.model`."""
