"""What the fine-tuning and control stages write for one species, one model and each organ, in one place: the test
cells' predictions and their evaluation (mixgf.stats.evaluate), read back by stage compare.

<metrics>/<Organ>.json            accuracy and macro-F1 with 95% bootstrap intervals, per-class scores, extras
<predictions>/<Organ>/predictions.csv  cell_index (row in the organ's token dataset), cell_id, label, predicted
<predictions>/<Organ>/confusion.csv    rows: true label, columns: predicted label

The metrics folders hold JSON only, so that dvc.yaml can list metrics/finetune as a whole for `dvc metrics show`.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from mixgf.paper import TABLES
from mixgf.io import write_json_atomic, write_text_atomic
from mixgf.stats import confusion, evaluate

PREDICTIONS, CONFUSION = "predictions.csv", "confusion.csv"


def organs_of(species: str, chosen: str) -> list[str]:
    """``chosen``: "all" (the species' organs of Tables 1-2) or a comma-separated list of them."""
    known = list(TABLES[species])
    organs = known if chosen == "all" else chosen.split(",")
    unknown = sorted(set(organs) - set(known))
    if unknown:
        raise SystemExit(f"unknown {species} organs {unknown}; choose from {known}")
    return organs


def write_results(metrics_file: Path, predictions_dir: Path, cell_index, cell_id, label, predicted, *, n_boot: int,
                  extra: dict) -> dict:
    """Evaluate ``predicted`` against ``label`` on one organ's test cells and write its three files."""
    label, predicted = np.asarray(label).astype(str), np.asarray(predicted).astype(str)
    metrics = {**extra, **evaluate(label, predicted, n_boot=n_boot, seed=0)}
    write_json_atomic(metrics_file, metrics)
    frame = pd.DataFrame({"cell_index": cell_index, "cell_id": cell_id, "label": label, "predicted": predicted})
    write_text_atomic(predictions_dir / PREDICTIONS, frame.to_csv(index=False))
    write_text_atomic(predictions_dir / CONFUSION, confusion(label, predicted, labels=np.unique(label)).to_csv())
    return metrics


def read_predictions(predictions_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(predictions_dir) / PREDICTIONS, dtype={"cell_id": str, "label": str, "predicted": str})
