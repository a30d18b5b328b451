"""Stage control_logreg: logistic regression on log1p CP10k expression for each organ of one species, the control of
Tables 1-2.

The same test cells as the transformers (mixgf.classify.split_cells on the same labels and settings), trained on
their whole training part (training + validation cells: it has no epoch to choose), on the raw counts of the same
cells in the atlas. Boiarsky et al. (2023) and Kedzierska et al. (2025) found such a model often matches
single-cell foundation models; a table without it cannot say whether pretraining bought anything.
"""

import argparse
from pathlib import Path

import anndata as ad
import numpy as np

from common import load_params
from evaluation import organs_of, write_results

from mixgf.baseline import expression_control
from mixgf.classify import split_cells
from mixgf.io import atomic_dir
from mixgf.tokens import load_tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--species", required=True, choices=["mouse", "human"])
    parser.add_argument("--organs", default="all", help="all, or a comma-separated list")
    parser.add_argument("--tokens", required=True, type=Path, help="folder of <species>_<Organ> token datasets")
    parser.add_argument("--atlas", required=True, type=Path, help="folder of <species>_finetune.h5ad raw counts")
    for option in ("metrics", "predictions"):
        parser.add_argument(f"--{option}", required=True, type=Path)
    parser.add_argument("--label", default="cell_type")
    args = parser.parse_args(argv)
    params = load_params()
    f = params["finetune"]
    adata = ad.read_h5ad(args.atlas / f"{args.species}_finetune.h5ad")
    with atomic_dir(args.metrics) as metrics, atomic_dir(args.predictions) as predictions:
        for organ in organs_of(args.species, args.organs):
            dataset, _ = load_tokens(args.tokens / f"{args.species}_{organ}")
            obs = dataset.select_columns(["cell_id", args.label]).to_pandas()
            split = split_cells(obs[args.label], min_fraction=f["min_fraction"], test_fraction=f["test_fraction"],
                                val_fraction=f["val_fraction"], seed=params["seed"])
            cells, labels = obs["cell_id"].to_numpy(), obs[args.label].to_numpy()
            train = np.concatenate([split.train, split.val])
            predicted = expression_control(adata, args.label, cells[train], cells[split.test],
                                           C=params["controls"]["logreg_C"], seed=params["seed"])
            scores = write_results(metrics / f"{organ}.json", predictions / organ, split.test, cells[split.test],
                                   labels[split.test], predicted, n_boot=params["controls"]["n_boot"],
                                   extra={"n_train": len(train), "n_labels": len(split.labels)})
            print(f"{args.species} {organ}, logistic regression: test accuracy {scores['accuracy']:.3f} "
                  f"[{scores['accuracy_low']:.3f}, {scores['accuracy_high']:.3f}] on {scores['n_cells']} cells",
                  flush=True)


if __name__ == "__main__":
    main()
