"""SAEM (Monolix's algorithm): `backend` (the iterations and the M-step), `kernels` (the MCMC E-step
kernels, vmapped over subjects), `finish` (conditional run, importance-sampling -2LL, FitResult)."""
