"""FO, FOCE, FOCEI and Laplace (NONMEM's conditional estimation methods).

- `backend`: the backend objects and the outer fit (BFGS over theta, covariance step);
- `objective`: the per-subject OFV, the EBE searches, the curvatures of each method;
- `reverse`: the reverse gradient engine (sensitivity-augmented ODE solves, one reverse pass);
- `bfgs`: the outer quasi-Newton method; `finish`: the `FitResult` of a fit.
"""
