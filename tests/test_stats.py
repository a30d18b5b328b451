"""mixgf.stats: metrics against sklearn, bootstrap intervals against an explicit loop, exact tests by hand."""

import json
from math import comb

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from mixgf import stats


def labels(n: int, k: int = 5, error: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """String labels of ``k`` unbalanced classes and predictions that are wrong ``error`` of the time."""
    rng = np.random.default_rng(seed)
    names = np.array([f"type {i}" for i in range(k)])
    y = names[rng.choice(k, n, p=np.arange(1, k + 1) / (k * (k + 1) / 2))]
    pred = np.where(rng.random(n) < error, names[rng.integers(0, k, n)], y)
    return y, pred


def test_accuracy_and_macro_f1_are_sklearns():
    for seed in range(5):
        y, pred = labels(200, seed=seed)
        assert stats.accuracy(y, pred) == pytest.approx(accuracy_score(y, pred), abs=1e-15)
        assert stats.macro_f1(y, pred) == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    # a class only predicted and a class never predicted both count, with F1 = 0
    y, pred = np.array(["a", "a", "b", "c"]), np.array(["a", "d", "b", "b"])
    assert stats.macro_f1(y, pred) == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert stats.macro_f1(y, pred) == pytest.approx((2 / 3 + 2 / 3 + 0 + 0) / 4)
    assert stats.macro_f1([1, 2, 2], [1, 2, 2]) == 1.0  # integer labels too


def test_bootstrap_matches_an_explicit_loop_over_the_same_draws():
    y, pred = labels(150, seed=1)
    idx = stats.bootstrap_indices(len(y), 300, seed=7)
    for metric, slow in (("accuracy", accuracy_score), ("macro_f1", lambda a, b: f1_score(a, b, average="macro"))):
        values = np.array([slow(y[i], pred[i]) for i in idx])
        expected = np.quantile(values, [0.025, 0.975])
        estimate, low, high = stats.bootstrap_ci(y, pred, metric, n_boot=300, seed=7)
        assert estimate == pytest.approx(slow(y, pred))
        assert (low, high) == pytest.approx(tuple(expected), abs=1e-12)
    # a plain function of (y_true, y_pred) gets the same resamples (as integer codes)
    _, low, high = stats.bootstrap_ci(y, pred, accuracy_score, n_boot=300, seed=7)
    assert (low, high) == pytest.approx(tuple(np.quantile([accuracy_score(y[i], pred[i]) for i in idx],
                                                          [0.025, 0.975])))


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_cells():
    widths = []
    for n in (100, 400, 1600):
        y, pred = labels(n, seed=2)
        for metric in ("accuracy", "macro_f1"):
            estimate, low, high = stats.bootstrap_ci(y, pred, metric, n_boot=1000)
            assert low < estimate < high
        widths.append(high - low)
        _, low, high = stats.bootstrap_ci(y, pred, "accuracy", n_boot=1000)
        acc = stats.accuracy(y, pred)  # about 2 x 1.96 x sqrt(p (1 - p) / n)
        assert high - low == pytest.approx(2 * 1.96 * np.sqrt(acc * (1 - acc) / n), rel=0.2)
    assert widths[0] > 1.5 * widths[1] > 2.25 * widths[2]  # halves when the cells quadruple
    assert stats.bootstrap_ci(y, pred, n_boot=200, seed=3) == stats.bootstrap_ci(y, pred, n_boot=200, seed=3)


def test_paired_difference_uses_the_same_cells_for_both_models():
    y, a = labels(300, error=0.2, seed=3)
    b = a.copy()
    b[:12] = "wrong"  # b is a with more errors on the first 12 cells (those a got right)
    extra = stats.accuracy(y, a) - stats.accuracy(y, b)
    diff, low, high = stats.paired_difference(y, a, b, n_boot=1000)
    assert diff == pytest.approx(extra) and 0 < low < diff < high
    # pairing: the interval is far narrower than that of the difference of two independently resampled accuracies
    right_a, right_b = a == y, b == y
    unpaired = (right_a[stats.bootstrap_indices(300, 1000, 1)].mean(1)
                - right_b[stats.bootstrap_indices(300, 1000, 2)].mean(1))
    low_u, high_u = np.quantile(unpaired, [0.025, 0.975])
    assert high - low < 0.5 * (high_u - low_u)
    assert stats.paired_difference(y, a, a, n_boot=100) == (0.0, 0.0, 0.0)


def test_mcnemar_exact_by_hand():
    # 2 x 2 table: both right 10, only a right b = 1, only b right c = 7, both wrong 2
    y = np.zeros(20, int)
    a = np.array([0] * 10 + [0] * 1 + [1] * 7 + [1] * 2)
    b = np.array([0] * 10 + [1] * 1 + [0] * 7 + [1] * 2)
    expected = 2 * sum(comb(8, k) for k in range(2)) / 2**8
    assert expected == 0.0703125
    assert stats.mcnemar_exact(y, a, b) == pytest.approx(expected, abs=1e-15)
    assert stats.mcnemar_exact(y, b, a) == pytest.approx(expected, abs=1e-15)
    assert stats.mcnemar_exact(y, a, a) == 1.0  # no discordant cells
    assert stats.mcnemar_exact([0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]) == pytest.approx(2 / 2**4)


def test_wilcoxon_across_organs_is_scipys():
    d = np.array([0.7, 1.5, -0.1, 0.5, 1.1, 0.2, 0.9, 0.4, -0.3])  # e.g. accuracy points, Mix-GF minus baseline
    assert stats.wilcoxon_across(d) == pytest.approx(scipy.stats.wilcoxon(d).pvalue)
    # exact null: the negatives hold ranks 1 and 3 (|-0.1|, |-0.3|), T = 4; 7 of the 2^9 sign patterns give T <= 4
    # ({}, {1}, {2}, {3}, {4}, {1, 2}, {1, 3}), so p = 2 x 7 / 512
    assert stats.wilcoxon_across(d) == pytest.approx(2 * 7 / 2**9)
    assert stats.wilcoxon_across(np.zeros(9)) == 1.0
    assert stats.wilcoxon_across([0.0, 0.0, 0.3]) == pytest.approx(scipy.stats.wilcoxon([0.0, 0.0, 0.3]).pvalue)


def test_per_class_and_confusion():
    y = np.array(["a", "a", "b", "b", "b", "c"])
    pred = np.array(["a", "b", "b", "b", "a", "a"])
    table = stats.per_class(y, pred)
    assert list(table.index) == ["a", "b", "c"]
    assert table.loc["a"].tolist() == pytest.approx([1 / 3, 1 / 2, 0.4, 2])
    assert table.loc["c"].tolist() == [0, 0, 0, 1]
    cm = stats.confusion(y, pred)
    assert (cm.to_numpy() == confusion_matrix(y, pred, labels=["a", "b", "c"])).all()
    assert cm.loc["b", "a"] == 1 and cm.to_numpy().sum() == 6


def test_bad_input_fails_clearly():
    with pytest.raises(ValueError, match="equal length"):
        stats.accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="metric must be"):
        stats.bootstrap_ci([1, 2], [1, 2], "auc")


def test_evaluate_reports_what_a_table_row_needs():
    from sklearn.metrics import accuracy_score, f1_score, precision_score

    from mixgf.stats import evaluate

    rng = np.random.default_rng(3)
    y = rng.choice(["a", "b", "c"], 200)
    pred = np.where(rng.random(200) < 0.7, y, rng.choice(["a", "b", "c"], 200))
    out = evaluate(y, pred, n_boot=500, seed=1)
    assert out["n_cells"] == 200
    assert out["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert out["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert out["accuracy_low"] < out["accuracy"] < out["accuracy_high"]
    assert (out["accuracy_low"], out["accuracy_high"]) == stats.bootstrap_ci(y, pred, n_boot=500, seed=1)[1:]
    assert out["per_class"]["b"]["precision"] == pytest.approx(precision_score(y, pred, labels=["b"], average=None)[0])
    assert sum(c["support"] for c in out["per_class"].values()) == 200
    json.dumps(out)  # plain types only: it goes into a metrics file
