"""Markdown tables of tutorials 03 and 04 from their JSON results (what the README shows).

Usage: python tutorials/results/tables.py
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def node_vs_ude(path=HERE / "03_node_vs_ude.json") -> str:
    r = json.loads(path.read_text())
    rows = {}
    for e in r["errors"]:
        rows.setdefault(e["model"], {})[e["set"], e["output"]] = e
    lines = ["| model | parameters | fit | train PK | train PD | frequent PK | frequent PD | first dose PK / PD "
             "| outside PK | outside PD | first dose PK / PD |", "|---" * 11 + "|"]
    for model, cells in rows.items():
        f = r["fits"][model]
        c = [f"{cells[s, o]['rmse_truth']:.3f}" for s, o in (("train", "conc"), ("train", "resp"))]
        for s in ("frequent", "outside"):
            c += [f"{cells[s, 'conc']['rmse_truth']:.3f}", f"{cells[s, 'resp']['rmse_truth']:.3f}",
                  f"{cells[s, 'conc']['rmse_truth_first_dose']:.3f} / {cells[s, 'resp']['rmse_truth_first_dose']:.3f}"]
        fit = f"{f['status']}, {f['n_evaluations']:.0f} ev., {f['wall_s']:.0f} s"
        lines.append(f"| {model} | {f['n_parameters']} | {fit} | " + " | ".join(c) + " |")
    return "\n".join(lines)


def learned_effect(path=HERE / "04_learned_drug_effect.json") -> str:
    r = json.loads(path.read_text())
    lines = ["| curves | n | band width inside | outside | at 3 c_max | median RMSE inside | outside "
             "| median abs. error at 3 c_max (max) |", "|---" * 8 + "|"]
    names = {"starts": "plain MLP, random starts", "bootstrap": "plain MLP, bootstrap",
             "saturating": "saturating MLP(c/(c+K)), random starts"}
    for k, b in r["bands"].items():
        lines.append(f"| {names[k]} | {b['n']} | {b['width_inside_mean']:.3f} | {b['width_outside_mean']:.3f} | "
                     f"{b['width_at_3cmax']:.3f} | {b['rmse_inside_median']:.3f} | {b['rmse_outside_median']:.3f} | "
                     f"{b['abs_error_at_3cmax_median']:.3f} ({b['abs_error_at_3cmax_max']:.3f}) |")
    low = r.get("low_doses")
    if low:
        lines += ["", f"Doses / 10 (c_max = {low['c_max']:.2f} mg/L, true h(c_max) = {low['true_h_at_cmax']:.2f}, "
                  f"h(3 c_max) = {low['true_h_at_3cmax']:.2f}):", "",
                  "| architecture | n | median RMSE inside | outside | median abs. error at 3 c_max (max) |",
                  "|---" * 5 + "|"]
        for k in ("plain", "saturating"):
            b = low[k]
            lines.append(f"| {k} MLP | {len(b['abs_error_at_3cmax'])} | {b['rmse_inside_median']:.3f} | "
                         f"{b['rmse_outside_median']:.3f} | {b['abs_error_at_3cmax_median']:.3f} "
                         f"({b['abs_error_at_3cmax_max']:.3f}) |")
    lines += ["", "| Bayesian UDE | 95% band width inside | outside | coverage inside | outside | status | wall |",
              "|---" * 7 + "|"]
    for k, b in r["bayes"].items():
        lines.append(f"| {k.upper()} | {b['width_inside_mean']:.3f} | {b['width_outside_mean']:.3f} | "
                     f"{b['coverage_inside']:.2f} | {b['coverage_outside']:.2f} | {b['status']} | "
                     f"{b['wall_s']:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    for f in (node_vs_ude, learned_effect):
        try:
            print(f(), "\n")
        except FileNotFoundError as e:
            print(f"(missing {e.filename})\n")
