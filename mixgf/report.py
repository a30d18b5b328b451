"""Tables of the reports: this run's numbers with their intervals, the paper's beside them (never in their place).

The notebooks under notebooks/ call these on the stages' outputs and write reports/; keeping the formatting here
keeps the notebooks short and the tables testable.
"""

from __future__ import annotations

import pandas as pd

from mixgf.paper import MODEL_NAMES, TABLES

DEMO_NOTICE = ("**Demo data.** These numbers come from the embedded demo profile: a seeded synthetic atlas with real "
               "gene identifiers (plus 700 real PBMCs as the human Immune organ) and small models pretrained for "
               "minutes on a CPU. They test the pipeline and the statistics; they are not the paper's results, which "
               "are shown beside them for reference only.")
REAL_NOTICE = "**Real data** (profile `{profile}`): the inputs named in params.yaml, profiles.{profile}.inputs."


def notice(profile: str) -> str:
    """The line every report starts with: demo or real data."""
    return DEMO_NOTICE if profile == "demo" or profile == "tiny" else REAL_NOTICE.format(profile=profile)


def data_label(profile: str) -> str:
    """What a figure's title says of its data."""
    return " (demo data)" if profile in ("demo", "tiny") else f" (real data, profile {profile})"


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def with_interval(estimate: float, low: float, high: float, *, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{100 * estimate:{sign}.1f} [{100 * low:{sign}.1f}, {100 * high:{sign}.1f}]"


def p_value(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def accuracy_table(compare: dict) -> pd.DataFrame:
    """One row per organ, in the paper's layout and order, from stage compare's JSON (metrics/compare/<species>.json):
    organ, cell types (ours / paper), test cells, the baseline and Mix-GF (accuracy % [95% CI]), their paired
    difference with McNemar's p, the two controls, and the paper's two numbers in their own columns."""
    species, baseline = compare["species"], compare["baseline"]
    rows = []
    for organ, (types, paper_base, paper_mix) in TABLES[species].items():
        r = compare["organs"][organ]
        d = r["mixgf_minus_baseline"]
        rows.append({
            "organ": organ, "cell types (paper)": f"{r['n_types']} ({types})", "test cells": r["n_test"],
            MODEL_NAMES[baseline]: with_interval(*_acc(r[baseline])), "Mix-GF": with_interval(*_acc(r["mixgf"])),
            "Mix-GF − baseline": with_interval(d["difference"], d["low"], d["high"], signed=True),
            "McNemar p": p_value(d["mcnemar_p"]),
            "random init": with_interval(*_acc(r["random"])), "logistic regression": with_interval(*_acc(r["logreg"])),
            f"paper {MODEL_NAMES[baseline]}": f"{paper_base:.1f}", "paper Mix-GF": f"{paper_mix:.1f}",
        })
    s = compare["summary"]
    mean = {m: with_interval(s[m]["mean_accuracy"], s[m]["low"], s[m]["high"]) for m in (baseline, "mixgf", "random", "logreg")}
    d = s["mixgf_minus_baseline"]
    rows.append({"organ": f"mean of {s['n_organs']}", "cell types (paper)": "", "test cells": sum(r["test cells"] for r in rows),
                 MODEL_NAMES[baseline]: mean[baseline], "Mix-GF": mean["mixgf"],
                 "Mix-GF − baseline": with_interval(d["mean_difference"], d["low"], d["high"], signed=True),
                 "McNemar p": f"Wilcoxon {p_value(d['wilcoxon_p'])}", "random init": mean["random"],
                 "logistic regression": mean["logreg"],
                 f"paper {MODEL_NAMES[baseline]}": f"{sum(v[1] for v in TABLES[species].values()) / len(rows):.1f}",
                 "paper Mix-GF": f"{sum(v[2] for v in TABLES[species].values()) / len(rows):.1f}"})
    return pd.DataFrame(rows)


def _acc(scores: dict) -> tuple[float, float, float]:
    return scores["accuracy"], scores["accuracy_low"], scores["accuracy_high"]


def comparison_table(compare: dict) -> pd.DataFrame:
    """The across-organ summary of every paired comparison: mean difference of accuracy [95% CI], organs better /
    worse, Wilcoxon signed-rank p over organs."""
    baseline = MODEL_NAMES[compare["baseline"]]
    names = {"mixgf_minus_baseline": f"Mix-GF − {baseline}", "mixgf_minus_random": "Mix-GF − random init",
             "baseline_minus_random": f"{baseline} − random init", "mixgf_minus_logreg": "Mix-GF − logistic regression",
             "baseline_minus_logreg": f"{baseline} − logistic regression"}
    rows = []
    for key, name in names.items():
        s = compare["summary"][key]
        rows.append({"comparison": name, "mean difference, points [95% CI]":
                     with_interval(s["mean_difference"], s["low"], s["high"], signed=True),
                     "organs better / worse": f"{s['organs_better']} / {s['organs_worse']}",
                     "Wilcoxon p": p_value(s["wilcoxon_p"])})
    return pd.DataFrame(rows)


def selection_table(compare: dict) -> pd.DataFrame:
    """What choosing the epoch on the test cells (the authors' protocol) adds to each transformer's test accuracy."""
    rows = []
    for model in (compare["baseline"], "mixgf", "random"):
        chosen = [r[model]["accuracy"] for r in compare["organs"].values()]
        on_test = [r[model]["accuracy_best_epoch_on_test"] for r in compare["organs"].values()]
        rows.append({"model": MODEL_NAMES[model], "epoch chosen on validation": pct(sum(chosen) / len(chosen)),
                     "epoch chosen on test (authors)": pct(sum(on_test) / len(on_test)),
                     "gain from the leak, points": f"{100 * (sum(on_test) - sum(chosen)) / len(chosen):+.2f}"})
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    cells = [[str(c) for c in frame.columns]] + [[str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("---" if i == 0 else "---:" for i in range(len(frame.columns))) + "|")
    return "\n".join(lines) + "\n"


def cross_species_table(metrics: dict) -> pd.DataFrame:
    """Figure 2 in numbers, from stage cross_species's JSON: per direction and model, the source-tuned classifier's
    accuracy on the other species' cells and k-NN label transfer in its embedding, beside the ortholog logistic
    regression (accuracy % [95% CI])."""
    rows = []
    for direction, result in metrics.items():
        source, target = direction.split("_to_")
        lr = result["ortholog_logreg"]
        for model, r in result.items():
            if model == "ortholog_logreg":
                continue
            rows.append({"fine-tuned on": f"{source} spleen", "tested on": f"{target} spleen",
                         "model": MODEL_NAMES[model], "cells": r["classifier"]["n_cells"],
                         "classifier": with_interval(*_acc(r["classifier"])), "k-NN in embedding": with_interval(*_acc(r["knn"])),
                         "ortholog logistic regression": with_interval(*_acc(lr))})
    return pd.DataFrame(rows)
