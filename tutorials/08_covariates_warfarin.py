# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Covariate modelling on warfarin: relations, stepwise search (SCM), comparison, VPC
#
# The warfarin PK data (O'Reilly's study as in nlmixr2data: 32 subjects, one oral dose, `cp` in
# mg/L) record weight (40-102 kg), age (21-63 years) and sex (27 men, 5 women). The questions a
# pharmacometrician asks: does body weight explain the between-subject variability of clearance and
# volume by the usual power laws, and do age or sex add anything? This tutorial
#
# 1. writes the model once, as a *factory* `make_model(relations)` whose CL and V are multiplied by
#    `relations.factors(pop)` (`nlmegen.examples.warfarin_pk_covariate_model`);
# 2. runs PsN's stepwise covariate modelling over weight (power), age (exponential) and sex
#    (categorical) on CL and V: forward inclusion at p < 0.05, backward elimination at p < 0.01;
# 3. compares the base and final models (`nlmegen.compare`) and draws the final model's VPC.

# %%
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import matplotlib
import pandas as pd

import nlmegen
from nlmegen.covariates import Relation

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
SMALL = os.environ.get("NLMEGEN_TUTORIAL_SMALL") == "1"  # the test suite runs this file at a small size
OUT = Path(tempfile.mkdtemp(prefix="nlmegen-tutorial-08-")) if SMALL else Path(__file__).parent / "results"
OUT.mkdir(exist_ok=True)
pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 20)

# %% [markdown]
# ## Data and relations
# Only the PK records (`dvid == "cp"`). Covariates are constant within subjects, so each relation
# uses one value per subject. A `Relation` names a parameter, a covariate and a form; every form is a
# factor equal to 1 at its centre (the median weight and age, PsN's choice; for sex the most common
# category, men), so `tcl` stays the log clearance of a typical subject whatever is included:
#
# | form | factor | coefficient 0 means |
# |---|---|---|
# | `power` | `(x / ref) ** theta` | no effect |
# | `exponential` | `exp(theta (x - ref))` | no effect |
# | `linear` | `1 + theta (x - ref)`, theta bounded to keep it positive over the data | no effect |
# | `categorical` | `exp(theta_k)` in category k, 1 in the reference | no effect |

# %%
table = nlmegen.datasets.load("warfarin")
table = table[table["dvid"] == "cp"].drop(columns="dvid")
pop = nlmegen.read_nonmem(table)
print(pop)
candidates = [Relation("cl", "wt", "power"), Relation("v", "wt", "power")]
if not SMALL:
    candidates += [Relation("cl", "age", "exponential"), Relation("v", "age", "exponential"),
                   Relation("cl", "sex", "categorical"), Relation("v", "sex", "categorical")]
else:  # the test suite: one candidate (three fits: base, forward, backward)
    candidates = candidates[:1]

# %% [markdown]
# ## Stepwise covariate modelling
# `nlmegen.scm` fits the base model, then each forward step fits the current model plus each
# remaining candidate (warm-started from the current estimates) and includes the most significant
# one by the likelihood-ratio test; then backward steps remove relations that are not significant at
# p < 0.01. The fits of one step are independent: pass `executor=` (a
# `concurrent.futures.ProcessPoolExecutor`, a Dask client) to run them in parallel; the default runs
# them one after another here.

# %%
start = time.perf_counter()
search = nlmegen.scm(nlmegen.examples.warfarin_pk_covariate_model, pop, candidates, parameters=["cl", "v"],
                     method="focei")
scm_wall = time.perf_counter() - start
print(search.report())
print(f"SCM: {len(search.steps)} fits in {scm_wall:.0f} s")

# %% [markdown]
# ## The final model: standard errors, comparison with the base model
# The SCM fits skip the covariance step; the final model is refitted with it (same model object,
# so nothing recompiles), and `nlmegen.compare` puts the base and final models side by side: OFV
# difference, likelihood-ratio test with the degrees of freedom from the parameter counts, AIC, BIC.

# %%
final = nlmegen.fit(search.model, pop, init=search.fit.params, progress=False)
print(final.table().round(4))
comparison = nlmegen.compare(search.base_fit, final, names=["base", "final"], loo=False)
print(comparison.round(4))

# %% [markdown]
# ## VPC of the final model

# %%
vpc = nlmegen.vpc(final, n_sim=50 if SMALL else 500, key=jax.random.key(1))
fig = vpc.plot(units={"time": "h", "DV": "mg/L"})
fig.savefig(OUT / "08_covariates_warfarin_vpc.png", dpi=110)

# %%
results = {
    "small": SMALL, "candidates": [r.label for r in candidates], "final_relations": search.relations.label,
    "scm_wall_s": scm_wall, "n_fits": len(search.steps),
    "steps": search.steps.drop(columns=["message"]).to_dict(orient="records"),
    "final_estimates": {k: v.tolist() for k, v in final.params.items()},
    "final_se": {k: v.tolist() for k, v in final.se.items()},
    "final_status": final.status,
    "compare": comparison.reset_index().to_dict(orient="records"),
}
(OUT / "08_covariates_warfarin.json").write_text(json.dumps(results, indent=2, default=float))
print(json.dumps({k: results[k] for k in ("final_relations", "final_estimates", "scm_wall_s")}, indent=1,
                 default=float))
