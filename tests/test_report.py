"""The report tables: the paper's layout, this run's numbers with intervals, the paper's in their own columns."""

import pandas as pd

from mixgf import report
from mixgf.paper import TABLE2


def _scores(acc: float) -> dict:
    return {"accuracy": acc, "accuracy_low": acc - 0.05, "accuracy_high": min(acc + 0.05, 1.0), "macro_f1": acc - 0.1,
            "macro_f1_low": acc - 0.2, "macro_f1_high": acc, "accuracy_best_epoch_on_test": acc + 0.01}


def _difference(d: float, p: float) -> dict:
    return {"difference": d, "low": d - 0.02, "high": d + 0.02, "mcnemar_p": p}


def fake_compare() -> dict:
    organs = {}
    for i, organ in enumerate(TABLE2):
        organs[organ] = {"n_test": 80, "n_types": 5, "geneformer": _scores(0.80), "mixgf": _scores(0.825),
                         "random": _scores(0.5), "logreg": _scores(0.9),
                         **{k: _difference(0.025, 0.5) for k in ("mixgf_minus_baseline", "mixgf_minus_random",
                                                                "baseline_minus_random", "mixgf_minus_logreg",
                                                                "baseline_minus_logreg")}}
    summary = {"n_organs": 9, **{m: {"mean_accuracy": a, "low": a - 0.01, "high": a + 0.01}
                                 for m, a in (("geneformer", 0.8), ("mixgf", 0.825), ("random", 0.5), ("logreg", 0.9))},
               **{k: {"mean_difference": 0.025, "low": 0.01, "high": 0.04, "organs_better": 9, "organs_worse": 0,
                      "wilcoxon_p": 0.0039} for k in ("mixgf_minus_baseline", "mixgf_minus_random",
                                                      "baseline_minus_random", "mixgf_minus_logreg",
                                                      "baseline_minus_logreg")}}
    return {"species": "human", "baseline": "geneformer", "summary": summary, "organs": organs}


def test_accuracy_table_has_the_papers_rows_and_numbers_beside_ours():
    table = report.accuracy_table(fake_compare())
    assert list(table["organ"]) == [*TABLE2, "mean of 9"]
    immune = table.set_index("organ").loc["Immune"]
    assert immune["Geneformer"] == "80.0 [75.0, 85.0]" and immune["Mix-GF"] == "82.5 [77.5, 87.5]"
    assert immune["Mix-GF − baseline"] == "+2.5 [+0.5, +4.5]"
    assert (immune["paper Geneformer"], immune["paper Mix-GF"]) == ("94.4", "95.1")
    assert immune["cell types (paper)"] == "5 (10)"
    mean = table.set_index("organ").loc["mean of 9"]
    assert mean["McNemar p"] == "Wilcoxon 0.0039" and mean["test cells"] == 720
    assert mean["paper Mix-GF"] == f"{sum(v[2] for v in TABLE2.values()) / 9:.1f}"


def test_selection_table_shows_the_gain_from_choosing_the_epoch_on_test():
    table = report.selection_table(fake_compare()).set_index("model")
    assert table.loc["Mix-Geneformer", "gain from the leak, points"] == "+1.00"


def test_markdown_and_notice():
    text = report.markdown(pd.DataFrame({"organ": ["Brain"], "acc": ["97.0"]}))
    assert text == "| organ | acc |\n|---|---:|\n| Brain | 97.0 |\n"
    assert report.notice("demo").startswith("**Demo data.**")
    assert "paper" in report.notice("paper") and "Demo" not in report.notice("paper")
