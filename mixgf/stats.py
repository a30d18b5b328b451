"""Statistics of a comparison on small test sets: accuracy, macro-F1, bootstrap intervals, paired tests.

The paper reports single accuracies on test splits of a few hundred to a few thousand cells and calls differences of
0.1-1.5 points improvements. These functions say how large a difference such a test set can resolve: a percentile
bootstrap over test cells for one model, a paired bootstrap and McNemar's exact test for two models on the same cells,
and a Wilcoxon signed-rank test across organs. Labels may be any comparable values (strings or integers); numbers
come back as floats.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

Metric = Callable[[np.ndarray, np.ndarray], float]


def accuracy(y_true, y_pred) -> float:
    """Share of cells whose prediction equals the label."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    _check_pair(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean of the per-class F1 over the classes present in ``y_true`` or ``y_pred``: sklearn's
    ``f1_score(average="macro")`` (a class never predicted, or predicted but absent, counts with F1 = 0)."""
    codes_true, codes_pred, k = _encode(y_true, y_pred)
    return float(_macro_f1_draws(codes_true[None], codes_pred[None], k)[0])


def _check_pair(y_true: np.ndarray, y_pred: np.ndarray) -> None:
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"need two non-empty 1-d label arrays of equal length, got shapes {y_true.shape}, "
                         f"{y_pred.shape}")


def _encode(y_true, *preds) -> tuple:
    """Integer codes 0..k-1 of the labels in ``y_true`` and every array of ``preds`` (one shared code book)."""
    arrays = [np.asarray(y_true)] + [np.asarray(p) for p in preds]
    for p in arrays[1:]:
        _check_pair(arrays[0], p)
    _, codes = np.unique(np.concatenate(arrays), return_inverse=True)
    n = len(arrays[0])
    return (*[codes[i * n : (i + 1) * n] for i in range(len(arrays))], int(codes.max()) + 1)


def _macro_f1_draws(codes_true: np.ndarray, codes_pred: np.ndarray, k: int) -> np.ndarray:
    """Macro-F1 of each row of (B, n) code arrays, vectorised: per-row class counts with one bincount each."""
    b = len(codes_true)
    offset = np.arange(b)[:, None] * k

    def counts(codes, where=None):
        return np.bincount((offset + codes)[where] if where is not None else (offset + codes).ravel(),
                           minlength=b * k).reshape(b, k)

    n_true, n_pred = counts(codes_true), counts(codes_pred)
    tp = counts(codes_true, codes_true == codes_pred)
    present = (n_true + n_pred) > 0
    f1 = np.divide(2.0 * tp, n_true + n_pred, out=np.zeros((b, k)), where=present)
    return f1.sum(1) / present.sum(1)


def _draws(metric: str | Metric, codes_true: np.ndarray, codes_pred: np.ndarray, k: int,
           idx: np.ndarray) -> np.ndarray:
    """``metric`` on every bootstrap sample, ``idx`` a (B, n) array of cell indices."""
    if metric == "accuracy":
        return (codes_true == codes_pred)[idx].mean(1)
    if metric == "macro_f1":
        return _macro_f1_draws(codes_true[idx], codes_pred[idx], k)
    if callable(metric):
        return np.array([metric(codes_true[i], codes_pred[i]) for i in idx], dtype=np.float64)
    raise ValueError(f"metric must be 'accuracy', 'macro_f1' or a function (y_true, y_pred) -> float; got {metric!r}")


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """All resamples at once: a (n_boot, n) array of cell indices drawn with replacement
    (``numpy.random.default_rng(seed).integers(0, n, (n_boot, n))``)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_ci(y_true, y_pred, metric: str | Metric = "accuracy", *, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """``(estimate, low, high)``: ``metric`` on all cells and its percentile bootstrap interval over test cells.

    ``metric``: ``"accuracy"``, ``"macro_f1"`` (both vectorised over the resamples) or any function
    ``(y_true, y_pred) -> float``, which then sees integer label codes. Resamples: :func:`bootstrap_indices`.
    """
    codes_true, codes_pred, k = _encode(y_true, y_pred)
    estimate = _draws(metric, codes_true, codes_pred, k, np.arange(len(codes_true))[None])[0]
    values = _draws(metric, codes_true, codes_pred, k, bootstrap_indices(len(codes_true), n_boot, seed))
    return (float(estimate), *_interval(values, level))


def paired_difference(y_true, pred_a, pred_b, metric: str | Metric = "accuracy", *, n_boot: int = 2000,
                      seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``(difference, low, high)``: ``metric`` of model a minus model b on the same cells, with a paired bootstrap
    interval (each resample of cells scores both models)."""
    codes_true, codes_a, codes_b, k = _encode(y_true, pred_a, pred_b)
    every = np.arange(len(codes_true))[None]
    idx = bootstrap_indices(len(codes_true), n_boot, seed)
    estimate = _draws(metric, codes_true, codes_a, k, every)[0] - _draws(metric, codes_true, codes_b, k, every)[0]
    values = _draws(metric, codes_true, codes_a, k, idx) - _draws(metric, codes_true, codes_b, k, idx)
    return (float(estimate), *_interval(values, level))


def mcnemar_exact(y_true, pred_a, pred_b) -> float:
    """Two-sided p-value of McNemar's exact test: of the cells exactly one model gets right (b: only a, c: only b),
    is the split b : c consistent with 1 : 1? ``scipy.stats.binomtest(b, b + c, 0.5)``; 1.0 when b + c = 0."""
    from scipy.stats import binomtest

    y_true, pred_a, pred_b = np.asarray(y_true), np.asarray(pred_a), np.asarray(pred_b)
    _check_pair(y_true, pred_a)
    _check_pair(y_true, pred_b)
    right_a, right_b = pred_a == y_true, pred_b == y_true
    b, c = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)


def wilcoxon_across(differences) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test that paired differences (e.g. one accuracy difference per
    organ) are centred on 0 (``scipy.stats.wilcoxon``, zero differences dropped); 1.0 when all are 0."""
    from scipy.stats import wilcoxon

    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError(f"need a non-empty 1-d array of differences, got shape {d.shape}")
    if not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d, alternative="two-sided").pvalue)


def per_class(y_true, y_pred, labels=None) -> pd.DataFrame:
    """Precision, recall, F1 and support (true cells) per class, one row per label (``labels``: the classes and their
    order; default the sorted labels present), from sklearn; 0 where a ratio is undefined."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = np.unique(np.concatenate([np.asarray(y_true), np.asarray(y_pred)])) if labels is None else labels
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return pd.DataFrame({"precision": p, "recall": r, "f1": f, "support": s}, index=pd.Index(labels, name="label"))


def confusion(y_true, y_pred, labels=None) -> pd.DataFrame:
    """Confusion matrix (sklearn): rows are true labels, columns predicted labels, cells count cells."""
    from sklearn.metrics import confusion_matrix

    labels = np.unique(np.concatenate([np.asarray(y_true), np.asarray(y_pred)])) if labels is None else labels
    return pd.DataFrame(confusion_matrix(y_true, y_pred, labels=labels), index=pd.Index(labels, name="true"),
                        columns=pd.Index(labels, name="predicted"))


def evaluate(y_true, y_pred, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Everything a table row reports on one test set: ``n_cells``, ``accuracy`` and ``macro_f1`` each with its
    bootstrap interval (``accuracy_low`` / ``accuracy_high`` ...; the same resamples for both), and ``per_class``
    precision / recall / F1 / support keyed by label. Plain floats and dicts: ready for a metrics JSON."""
    y_true, y_pred = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    out = {"n_cells": len(y_true)}
    for metric in ("accuracy", "macro_f1"):
        estimate, low, high = bootstrap_ci(y_true, y_pred, metric, n_boot=n_boot, seed=seed, level=level)
        out |= {metric: estimate, f"{metric}_low": low, f"{metric}_high": high}
    table = per_class(y_true, y_pred, labels=np.unique(y_true))
    out["per_class"] = {label: {k: float(v) if k != "support" else int(v) for k, v in row.items()}
                        for label, row in table.iterrows()}
    return out
