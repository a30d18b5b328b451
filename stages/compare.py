"""Stage compare: one species' table (Table 1 mouse, Table 2 human) with the statistics a reader needs.

Per organ: every model's accuracy and macro-F1 with its interval (from the fine-tuning and control stages), and
paired comparisons on the same test cells -- Mix-GF minus the single-species baseline, each pretrained model minus
the same transformer from random initialisation, Mix-GF minus the logistic regression -- as a bootstrap interval of
the accuracy difference and McNemar's exact p-value. Across organs: the mean accuracy of every model and the mean
of every difference with intervals (cells resampled within each organ), and a Wilcoxon signed-rank test of the
per-organ differences: the honest form of the paper's "better on most organs".
"""

import argparse
from pathlib import Path

import numpy as np

from common import load_params
from evaluation import read_predictions

from mixgf.io import read_json, write_json_atomic
from mixgf.paper import BASELINE, TABLES
from mixgf.stats import bootstrap_indices, mcnemar_exact, wilcoxon_across


def comparisons(baseline: str) -> dict[str, tuple[str, str]]:
    return {"mixgf_minus_baseline": ("mixgf", baseline), "mixgf_minus_random": ("mixgf", "random"),
            "baseline_minus_random": (baseline, "random"), "mixgf_minus_logreg": ("mixgf", "logreg"),
            "baseline_minus_logreg": (baseline, "logreg")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--species", required=True, choices=sorted(TABLES))
    parser.add_argument("--metrics", required=True, type=Path, help="metrics/finetune")
    parser.add_argument("--predictions", required=True, type=Path, help="metrics/predictions")
    parser.add_argument("--out", required=True, help="metrics JSON")
    args = parser.parse_args(argv)
    params = load_params()
    n_boot = params["controls"]["n_boot"]
    baseline = BASELINE[args.species]
    models = [baseline, "mixgf", "random", "logreg"]
    pairs = comparisons(baseline)
    organs, draws = {}, {m: [] for m in models}  # draws: per organ, bootstrap accuracies on shared resamples
    for organ in TABLES[args.species]:
        folders = {m: args.predictions / f"{args.species}-{m}" / organ for m in models}
        frames = {m: read_predictions(folder) for m, folder in folders.items()}
        truth = frames["mixgf"]["label"].to_numpy()
        for m, f in frames.items():
            if not np.array_equal(f["cell_index"], frames["mixgf"]["cell_index"]):
                raise ValueError(f"{folders[m]}: its test cells differ from {folders['mixgf']}; rerun both stages")
        right = {m: (f["predicted"].to_numpy() == truth) for m, f in frames.items()}
        idx = bootstrap_indices(len(truth), n_boot, seed=0)
        boot = {m: r[idx].mean(1) for m, r in right.items()}
        for m in models:
            draws[m].append(boot[m])
        row = {"n_test": int(len(truth)), "n_types": int(len(np.unique(truth)))}
        for m in models:
            scores = read_json(args.metrics / f"{args.species}-{m}" / f"{organ}.json")
            row[m] = {k: scores[k] for k in ("accuracy", "accuracy_low", "accuracy_high", "macro_f1",
                                             "macro_f1_low", "macro_f1_high")}
            if "test_accuracy_best_on_test" in scores:
                row[m]["accuracy_best_epoch_on_test"] = scores["test_accuracy_best_on_test"]
        for name, (a, b) in pairs.items():
            low, high = np.quantile(boot[a] - boot[b], [0.025, 0.975])
            row[name] = {"difference": float(right[a].mean() - right[b].mean()), "low": float(low),
                         "high": float(high), "mcnemar_p": mcnemar_exact(truth, frames[a]["predicted"],
                                                                         frames[b]["predicted"])}
        organs[organ] = row

    mean_draws = {m: np.mean(draws[m], axis=0) for m in models}  # mean over organs, per resample
    summary = {"n_organs": len(organs)}
    for m in models:
        low, high = np.quantile(mean_draws[m], [0.025, 0.975])
        summary[m] = {"mean_accuracy": float(np.mean([organs[o][m]["accuracy"] for o in organs])),
                      "low": float(low), "high": float(high)}
    for name, (a, b) in pairs.items():
        diffs = [organs[o][name]["difference"] for o in organs]
        low, high = np.quantile(mean_draws[a] - mean_draws[b], [0.025, 0.975])
        summary[name] = {"mean_difference": float(np.mean(diffs)), "low": float(low), "high": float(high),
                         "organs_better": int(sum(d > 0 for d in diffs)), "organs_worse": int(sum(d < 0 for d in diffs)),
                         "wilcoxon_p": wilcoxon_across(diffs)}
    write_json_atomic(args.out, {"species": args.species, "baseline": baseline, "summary": summary, "organs": organs})
    s = summary["mixgf_minus_baseline"]
    print(f"{args.species}: Mix-GF minus {baseline}, mean over {len(organs)} organs {s['mean_difference']:+.4f} "
          f"[{s['low']:+.4f}, {s['high']:+.4f}], better on {s['organs_better']}, Wilcoxon p {s['wilcoxon_p']:.3g}")


if __name__ == "__main__":
    main()
