"""Stage heart_classifier: the disease-vs-normal heart classifier that in silico perturbation measures with
(SPEC §7): Mix-Geneformer fine-tuned on one species' heart cells (obs ``disease``: disease / normal), with the
paper's split and recipe (mixgf.classify); its test scores go beside it."""

import argparse
from pathlib import Path

from common import load_params
from evaluation import write_results

from mixgf.classify import FinetuneConfig, finetune
from mixgf.tokens import load_tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--tokens", required=True, help="heart cells (data/perturb/<species>_heart)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--metrics", required=True, type=Path, help="JSON of the test scores")
    parser.add_argument("--predictions", required=True, type=Path)
    args = parser.parse_args(argv)
    params = load_params()
    dataset, meta = load_tokens(args.tokens)
    result = finetune(args.pretrained, dataset, meta, "disease", FinetuneConfig(**params["finetune"], seed=params["seed"]),
                      out_dir=args.out, source=args.tokens)
    test = result.split.test
    obs = dataset.select_columns(["cell_id", "disease"]).to_pandas().iloc[test]
    scores = write_results(args.metrics, args.predictions, test, obs["cell_id"], obs["disease"],
                           result.test_predictions, n_boot=params["controls"]["n_boot"],
                           extra={"best_epoch": result.best_epoch, "n_train": result.metrics["n_train"]})
    print(f"{args.tokens}: disease vs normal, test accuracy {scores['accuracy']:.3f} "
          f"[{scores['accuracy_low']:.3f}, {scores['accuracy_high']:.3f}] on {scores['n_cells']} cells")


if __name__ == "__main__":
    main()
