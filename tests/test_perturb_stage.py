"""Stage perturb's scoring of a gene ranking against the planted drivers, and its 'after' cells."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
from perturb import driver_scores, perturbed  # noqa: E402


def test_driver_recall_and_ranks_by_hand():
    genes = [f"G{i}" for i in range(100)]  # ranked by mean shift, G0 first
    stats = pd.DataFrame({"ensembl_id": genes, "fdr": [0.01] * 10 + [0.5] * 90})
    drivers = pd.DataFrame({"ensembl_id": ["G3", "G30", "G60", "GX"], "symbol": ["a", "b", "c", "absent"]})
    d = driver_scores(stats, drivers)
    assert d["n_drivers"] == 4 and d["n_perturbed"] == 3
    assert d["recall_at_20"] == 0.25 and d["recall_at_50"] == 0.5  # G3; G3 and G30
    assert d["recall_at_20_significant"] == 0.25 and d["recall_at_50_significant"] == 0.25  # only G0..G9 pass FDR
    assert d["ranks"] == {"a": 4, "b": 31, "c": 61, "absent": None}
    assert d["median_rank"] == 31 and d["median_rank_if_random"] == 50.5


def test_after_cells_delete_or_move_the_gene_to_the_front():
    cells = [np.array([5, 6, 7]), np.array([7, 8, 9])]
    assert [c.tolist() for c in perturbed(cells, 7, "delete", 3)] == [[5, 6], [8, 9]]
    assert [c.tolist() for c in perturbed(cells, 9, "overexpress", 3)] == [[9, 5, 6], [9, 7, 8]]
    assert [c.tolist() for c in perturbed(cells, 6, "overexpress", 4)] == [[6, 5, 7], [6, 7, 8, 9]]


@pytest.mark.parametrize("mode", ["delete", "overexpress"])
def test_no_drivers_no_recall(mode):
    stats = pd.DataFrame({"ensembl_id": ["G0"], "fdr": [1.0]})
    d = driver_scores(stats, pd.DataFrame({"ensembl_id": [], "symbol": []}))
    assert d["n_drivers"] == 0 and d["recall_at_20"] is None and d["median_rank"] is None
