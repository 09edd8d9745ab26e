# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Neural ODE vs UDE: one subject, 36 dosing regimens
#
# The seeds' talk ("A Deep Dive into Generative Scientific Machine Learning", section "Neural ODE vs
# UDE") trains models of one subject of the indirect-response (IDR) PK/PD model on 36 dosing
# regimens and shows, with pictures, that all of them fit the training data but only the
# universal differential equation (UDE) predicts unseen regimens. Here the same experiment with
# numbers:
#
# - **Data.** One subject of the IDR model (Depot, Central, R; Hill drug effect
#   `h(c) = Smax c^n / (SC50^n + c^n)` on the production of R, `Smax = 2, SC50 = 1, n = 1.5`),
#   36 training regimens (25-200 mg, every 8, 12 or 24 h, 1-3 doses), concentration (10%
#   proportional error) and response (additive SD 1) observed 9 times per regimen. Each regimen
#   is a pseudo-subject of a population without random effects.
# - **Models**, from least to most prior knowledge (the talk's three levels):
#   (ii) a neural ODE for all three states, `d(Depot, Central, R)/dt = NN(Depot, Central, R)`;
#   (iii) the talk's middle variant, `dDepot/dt = -NN1(Depot)`,
#   `dCentral/dt = NN1(Depot) - NN2(Central)`, `dR/dt = NN3(Central, R)`;
#   (i) the UDE, the IDR model with `h` replaced by an MLP of `C = Central/Vc`.
# - **Test.** Unseen regimens: the training doses every 4 or 6 h (six doses, "seen dosage, higher
#   frequency"), and doses outside the training range (10, 400 and 800 mg).
#
# Every model is fitted by maximum likelihood (`nlmegen.FOCEI` on a population without random
# effects is naive pooled maximum likelihood; BFGS with exact reverse-mode gradients through the
# ODE solver).

# %%
import json
import os
import time
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import nlmegen
from nlmegen import examples_sciml as sx
from nlmegen._simulate import model_values

SMALL = os.environ.get("NLMEGEN_TUTORIAL_SMALL") == "1"  # the test suite runs this file at a small size
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path("tutorials").resolve()
OUT = Path(os.environ.get("NLMEGEN_TUTORIAL_OUT", HERE / "results"))
if SMALL and "NLMEGEN_TUTORIAL_OUT" not in os.environ:  # never overwrite the committed full-size results
    import tempfile

    OUT = Path(tempfile.mkdtemp())
OUT.mkdir(parents=True, exist_ok=True)
started = time.perf_counter()

# %% [markdown]
# ## Data
# Training and test regimens are simulated from the same subject with independent noise. The
# small size (test suite) keeps 6 training regimens and 2 of each test kind.

# %%
train_regimens = sx.TRAIN_REGIMENS[::6] if SMALL else sx.TRAIN_REGIMENS
tests = {"frequent": sx.TEST_FREQUENT[::4] if SMALL else sx.TEST_FREQUENT,
         "outside": sx.TEST_OUTSIDE[::6] if SMALL else sx.TEST_OUTSIDE}
train = sx.simulate_regimens(train_regimens, key=jax.random.key(0))
sets = {"train": nlmegen.read_nonmem(train)}
for k, (name, regimens) in enumerate(tests.items()):
    sets[name] = nlmegen.read_nonmem(sx.simulate_regimens(regimens, sx.TEST_TIMES, key=jax.random.key(k + 1)))
scales = sx.data_scales(train)
truth = {name: sx.true_predictions(pop) for name, pop in sets.items()}
print(f"{len(train_regimens)} training regimens; scales {scales}")
for name, pop in sets.items():
    print(f"{name:9s} {pop.n_subjects:3d} regimens, {int(np.asarray(pop.mask).sum())} observations")

# %% [markdown]
# ## The three models and their fits
# The networks are small tanh MLPs: the UDE's `h` is 1-8-8-1 (97 weights), the neural ODE's
# right-hand side 3-12-12-3 (243 weights), the middle variant's three networks 1-8-8-1, 1-8-8-1
# and 2-8-8-1 (299 weights). The networks of the neural ODE and the middle variant see the states
# divided by fixed scales from the training data (largest dose, largest observed concentration,
# mean response) and start with small output layers (slow initial dynamics). Their randomly
# initialised right-hand sides are far from anything that fits, so Adam steps come first
# (`adam_steps`), then BFGS; when BFGS stops without converging (a failed line search in the
# weights' narrow valleys) it is restarted from where it stopped, up to `rounds` times. As a
# reference, the true structure (Hill drug effect, 8 parameters) is fitted too. The ODE
# tolerances of the networks' models are looser (rtol 1e-5): a tenth of the cost per
# evaluation, far below the noise. They also get a combined (additive + proportional) error on
# the concentration instead of the data's proportional one: with a purely proportional error a
# right-hand side that starts with near-zero concentrations makes the likelihood so rugged that
# BFGS stalled (the middle variant stopped at an OFV of 2639 after 2443 evaluations, against
# -1233 for the UDE). The RMSE below does not depend on the error model.

# %%
models = {
    "UDE (MLP drug effect)": (sx.ude_model("mlp", hidden=(8, 8)), 0, 1),
    "middle variant (NN1, NN2, NN3)": (sx.middle_model(scales, hidden=(8, 8), rtol=1e-5, atol=1e-6,
                                                        combined_error=True), 1000, 3),
    "neural ODE": (sx.node_model(scales, hidden=(12, 12), rtol=1e-5, atol=1e-6, combined_error=True), 1000, 3),
    "true structure (Hill)": (sx.ude_model("hill"), 0, 1),
}
maxiter = 40 if SMALL else 1500
fits, info = {}, {}
for name, (model, adam, rounds) in models.items():
    t0 = time.perf_counter()
    init, evaluations, statuses = sx.start_values(model, scales, seed=0), 0.0, []
    for r in range(1 if SMALL else rounds):
        backend = nlmegen.FOCEI(covariance="none", progress=False, maxiter=maxiter,
                                adam_steps=(20 if SMALL else adam) if r == 0 else 0, learning_rate=0.02)
        fit = nlmegen.fit(model, sets["train"], backend, init=init)
        evaluations += float(fit.timings["n_evaluations"])
        statuses.append(fit.status)
        if fit.status == "converged":
            break
        init = model_values(fit)
    fits[name] = fit
    wall = time.perf_counter() - t0
    n_free = int(sum(np.size(v) for v in jax.tree.leaves(fit.estimates)))
    info[name] = {"status": fit.status, "rounds": statuses, "message": fit.message, "ofv": float(fit.ofv),
                  "n_parameters": n_free, "n_evaluations": evaluations, "wall_s": wall}
    print(f"{name:32s} {fit.status:14s} OFV {fit.ofv:10.2f}  {n_free:4d} parameters  "
          f"{evaluations:5.0f} evaluations  {wall:6.1f} s")

# %% [markdown]
# ## Predictions on training and test regimens
# The predictions are noise-free (`noise=False`). The RMSE is against the true, noise-free
# trajectories of the subject (0 is a perfect model; the residual error of the data does not
# enter), and, in the JSON, also against the noisy observations (whose floor is the noise:
# SD 1 for the response, 10% of the concentration). "First dose" is the part of each test
# regimen before its second dose (at most 24 h): the talk notes that the neural ODE predicts
# that part of the higher-frequency regimens too.


# %%
def rmse(pred, ref, sel):
    return float(np.sqrt(np.mean((pred[sel] - ref[sel]) ** 2)))


predictions, rows = {}, []
for name, fit in fits.items():
    params = model_values(fit)
    for set_name, pop in sets.items():
        pred = nlmegen.simulate_arrays(fit.model, params, pop, key=jax.random.key(0), noise=False)[0]
        predictions[name, set_name] = pred
        mask, dvid = np.asarray(pop.mask), np.asarray(pop.dvid)
        first = sx.first_dose_mask(pop)
        for k, output in enumerate(pop.outputs):
            sel = mask & (dvid == k)
            row = {"model": name, "set": set_name, "output": output,
                   "rmse_truth": rmse(pred, truth[set_name], sel),
                   "rmse_obs": rmse(pred, np.asarray(pop.dv), sel),
                   "noise_floor": rmse(truth[set_name], np.asarray(pop.dv), sel)}
            if set_name != "train":
                row["rmse_truth_first_dose"] = rmse(pred, truth[set_name], sel & first)
                row["rmse_truth_later"] = rmse(pred, truth[set_name], sel & ~first)
            rows.append(row)
errors = pd.DataFrame(rows)
table = errors.pivot_table(index="model", columns=["set", "output"], values="rmse_truth", sort=False)
print("RMSE against the true trajectories (conc mg/L, resp units of R)")
print(table.round(3).to_string())
first_table = errors[errors["set"] != "train"].pivot_table(
    index="model", columns=["set", "output"], values=["rmse_truth_first_dose", "rmse_truth_later"], sort=False)
print("\nTest RMSE of the first dose and of the rest")
print(first_table.round(3).to_string())

# %% [markdown]
# ## Test error relative to training error
# The talk's claim in one number per model: how many times the training error the test error is.

# %%
ratio = pd.DataFrame({(s, o): table[s, o] / table["train", o] for s in tests for o in ("conc", "resp")})
print(ratio.round(1).to_string())

# %% [markdown]
# ## Figure: one regimen of each test kind
# Truth (line), test observations (dots) and each model's prediction.

# %%
show = {"frequent": sets["frequent"].n_subjects - 1, "outside": sets["outside"].n_subjects - 1}
fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
colours = dict(zip(fits, ("C0", "C2", "C3", "C7"), strict=True))
panels = [("train", 0 if SMALL else 26)] + list(show.items())
for col, (set_name, i) in enumerate(panels):
    pop = sets[set_name]
    dvid, mask, t = np.asarray(pop.dvid)[i], np.asarray(pop.mask)[i], np.asarray(pop.times)[i]
    doses = np.asarray(pop.dose_amts)[i][np.asarray(pop.dose_mask)[i]]
    gaps = np.diff(np.asarray(pop.dose_times)[i][np.asarray(pop.dose_mask)[i]])
    for row, output in enumerate(pop.outputs):
        ax = axes[row, col]
        sel = mask & (dvid == row)
        ax.plot(t[sel], truth[set_name][i, sel], "k-", lw=2, label="truth")
        ax.plot(t[sel], np.asarray(pop.dv)[i, sel], "ko", ms=3, label="observations")
        for name in fits:
            ax.plot(t[sel], predictions[name, set_name][i, sel], "-", color=colours[name], label=name)
        every = f" every {gaps[0]:g} h" if len(gaps) else ""
        ax.set_title(f"{set_name}: {len(doses)} x {doses[0]:g} mg{every}", fontsize=10)
        ax.set_ylabel("concentration (mg/L)" if output == "conc" else "response R")
        ax.set_xlabel("time (h)")
axes[0, 0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "03_node_vs_ude.png", dpi=80)

# %% [markdown]
# ## Results file
# Full-size numbers (with wall times on the machine that ran this) go to
# `tutorials/results/03_node_vs_ude.json`; the README's table is taken from it.

# %%
result = {"small": SMALL, "n_train_regimens": len(train_regimens),
          "n_test_regimens": {k: len(v) for k, v in tests.items()}, "scales": scales, "fits": info,
          "errors": errors.to_dict(orient="records"), "wall_s": time.perf_counter() - started,
          "machine": {"cpus": os.cpu_count(), "jax": jax.__version__}}
(OUT / "03_node_vs_ude.json").write_text(json.dumps(result, indent=1))
print(f"written {OUT / '03_node_vs_ude.json'} ({result['wall_s']:.0f} s)")
