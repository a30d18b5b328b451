"""Stage init_random: the "no pretraining" control, a model of the pretrained models' architecture and vocabulary
with freshly initialised weights (seeded), saved like a pretrained model so that fine-tuning treats it as one.

Fine-tuning from it answers the question the field's critics ask of every foundation model: does pretraining help
at all, or would the same transformer trained only on the labelled cells do as well?
"""

import argparse

import torch

from common import load_params

from mixgf.model import PRESETS, MixGFForPretraining
from mixgf.pretrain import save_model
from mixgf.tokens import load_tokens
from mixgf.vocab import GeneVocab


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", required=True, help="the corpus whose vocabulary, medians and length it records")
    parser.add_argument("--vocab", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    params = load_params()
    _, meta = load_tokens(args.corpus)
    torch.manual_seed(params["seed"])
    model = MixGFForPretraining(PRESETS[params["model"]["preset"]](meta, simcse_weight=0.0, **params["model"]["overrides"]))
    save_model(model, args.out, GeneVocab.read(args.vocab))
    print(f"random initialisation ({sum(p.numel() for p in model.parameters()):,} weights) -> {args.out}")


if __name__ == "__main__":
    main()
