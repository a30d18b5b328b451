"""Stage finetune: one pretrained model fine-tuned as a cell-type classifier on each organ of one species
(Tables 1-2, SPEC §5).

The paper's split and recipe (mixgf.classify), the epoch chosen on a validation part of the training cells. Per organ:
the classifier to <out>/<Organ>, the test cells' scores to <metrics>/<Organ>.json and their predictions to
<predictions>/<Organ>/ (stages/evaluation.py). One stage per (species, model), so an ablation of Mix-GF's
pretraining re-tunes only Mix-GF. Organs are independent: with params parallel.workers > 1 they are fine-tuned in
that many processes of one torch thread each (on 2 CPU cores, two small models train faster side by side than one
model on two threads).
"""

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import torch

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
    organs = organs_of(args.species, args.organs)
    workers = min(params["parallel"]["workers"], len(organs)) if not torch.cuda.is_available() else 1
    with atomic_dir(args.out) as out, atomic_dir(args.metrics) as metrics, atomic_dir(args.predictions) as predictions:
        job = partial(finetune_organ, args, params, out, metrics, predictions)
        if workers == 1:
            lines = map(job, organs)
        else:
            pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                                       initargs=(max(1, (os.cpu_count() or 1) // workers),))
            lines = pool.map(job, organs)
        for line in lines:
            print(line, flush=True)


def finetune_organ(args, params: dict, out: Path, metrics: Path, predictions: Path, organ: str) -> str:
    """Fine-tune on one organ and write its classifier, scores and predictions; returns a line for the log."""
    tokens = args.tokens / f"{args.species}_{organ}"
    dataset, meta = load_tokens(tokens)
    cfg = FinetuneConfig(**params["finetune"], seed=params["seed"])
    result = finetune(args.pretrained, dataset, meta, args.label, cfg, out_dir=out / organ, source=str(tokens))
    test = result.split.test
    obs = dataset.select_columns(["cell_id", args.label]).to_pandas().iloc[test]
    scores = write_results(metrics / f"{organ}.json", predictions / organ, test, obs["cell_id"], obs[args.label],
                           result.test_predictions, n_boot=params["controls"]["n_boot"],
                           extra={k: result.metrics[k] for k in KEEP})
    return (f"{tokens} with {args.pretrained}: test accuracy {scores['accuracy']:.3f} "
            f"[{scores['accuracy_low']:.3f}, {scores['accuracy_high']:.3f}] on {scores['n_cells']} cells "
            f"(epoch {scores['best_epoch']} by validation)")


if __name__ == "__main__":
    main()
