"""Stage finetune: one pretrained model fine-tuned as a cell-type classifier on each organ of one species
(Tables 1-2, SPEC §5).

The paper's split and recipe (mixgf.classify), the epoch chosen on a validation part of the training cells. Per organ:
the classifier to <out>/<Organ>, the test cells' scores to <metrics>/<Organ>.json and their predictions to
<predictions>/<Organ>/ (stages/evaluation.py). One stage per (species, model), so an ablation of Mix-GF's
pretraining re-tunes only Mix-GF.
"""

import argparse
from pathlib import Path

import numpy as np

from common import load_params
from evaluation import organs_of, write_results

from mixgf.classify import FinetuneConfig, finetune
from mixgf.io import atomic_dir
from mixgf.tokens import load_tokens

KEEP = ("best_epoch", "val_accuracy", "test_accuracy_best_on_test", "test_selection_gain", "n_train", "n_val",
        "n_labels", "total_steps")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--species", required=True, choices=["mouse", "human"])
    parser.add_argument("--organs", default="all", help="all, or a comma-separated list")
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--tokens", required=True, type=Path, help="folder of <species>_<Organ> token datasets")
    for option in ("out", "metrics", "predictions"):
        parser.add_argument(f"--{option}", required=True, type=Path)
    parser.add_argument("--label", default="cell_type")
    args = parser.parse_args(argv)
    params = load_params()
    cfg = FinetuneConfig(**params["finetune"], seed=params["seed"])
    with atomic_dir(args.out) as out, atomic_dir(args.metrics) as metrics, atomic_dir(args.predictions) as predictions:
        for organ in organs_of(args.species, args.organs):
            tokens = args.tokens / f"{args.species}_{organ}"
            dataset, meta = load_tokens(tokens)
            result = finetune(args.pretrained, dataset, meta, args.label, cfg, out_dir=out / organ, source=str(tokens))
            test = result.split.test
            obs = dataset.select_columns(["cell_id", args.label]).to_pandas().iloc[test]
            scores = write_results(metrics / f"{organ}.json", predictions / organ, test, obs["cell_id"], obs[args.label],
                                   result.test_predictions, n_boot=params["controls"]["n_boot"],
                                   extra={k: result.metrics[k] for k in KEEP})
            print(f"{tokens} with {args.pretrained}: test accuracy {scores['accuracy']:.3f} "
                  f"[{scores['accuracy_low']:.3f}, {scores['accuracy_high']:.3f}] on {scores['n_cells']} cells "
                  f"(epoch {scores['best_epoch']} by validation)", flush=True)


if __name__ == "__main__":
    main()
