"""Stage pretrain: one pretrained model (Mix-Geneformer, or an MLM-only single-species baseline).

The checkpoint folder persists across `dvc repro` (declared `persist: true`), so a killed run resumes where it
stopped — but only if the checkpoint belongs to exactly this run (same model, settings and corpus); otherwise the
stage says what differs and starts over. Logging, saving and worker settings do not count: changing them reruns the
stage, which finds its checkpoint complete and only writes the model again. A baseline can instead be taken from an
existing checkpoint (params baselines.<name>.checkpoint).
"""

import argparse
import shutil

import torch

from common import ROOT, load_params

from mixgf.model import PRESETS, MixGFForPretraining, import_bert_checkpoint
from mixgf.pretrain import PretrainConfig, checkpoint_differences, pretrain, save_model
from mixgf.tokens import load_tokens
from mixgf.vocab import GeneVocab, load_vocab


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True, help="mixgf, or a key of params baselines")
    for option in ("corpus", "vocab", "out", "state", "logs"):
        parser.add_argument(f"--{option}", required=True)
    args = parser.parse_args(argv)
    params = load_params()
    dataset, meta = load_tokens(args.corpus)
    vocab = GeneVocab.read(args.vocab)
    baseline = params["baselines"].get(args.name)
    if baseline and baseline.get("checkpoint"):
        source_vocab = load_vocab(baseline["checkpoint_vocab"] if baseline["checkpoint_vocab"] == "geneformer-v1"
                                  else ROOT / baseline["checkpoint_vocab"])
        model = import_bert_checkpoint(ROOT / baseline["checkpoint"], source_vocab, vocab, meta)
        save_model(model, args.out, vocab)
        print(f"{args.name}: imported {baseline['checkpoint']} -> {args.out}")
        return
    simcse = params["simcse"] if baseline is None else {"weight": 0.0}
    overrides = {f"simcse_{k}": v for k, v in simcse.items() if k in ("loss", "tau", "weight")}
    overrides |= {k: v for k, v in simcse.items() if k in ("pooling", "gather_negatives")}
    if baseline is None:
        overrides |= {f"ortholog_{k}": v for k, v in params["ortholog_contrast"].items()}
    torch.manual_seed(params["seed"])
    model = MixGFForPretraining(PRESETS[params["model"]["preset"]](meta, **overrides, **params["model"]["overrides"]))
    cfg = PretrainConfig(**params["pretrain"], seed=params["seed"])
    differences = checkpoint_differences(args.state, model.config, cfg, dataset)
    if differences == []:
        print(f"{args.name}: resuming from the checkpoint in {args.state}")
    elif differences:
        print(f"{args.name}: the checkpoint in {args.state} is of another run, so training starts over; it differs in:\n  "
              + "\n  ".join(differences))
        shutil.rmtree(args.state)
    result = pretrain(model, dataset, meta, cfg, args.state, vocab=vocab, resume=differences == [], log_dir=args.logs,
                      model_dir=args.out)
    trained = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()) or "the checkpoint was already complete"
    print(f"{args.name}: {result.step} steps; {trained}")


if __name__ == "__main__":
    main()
