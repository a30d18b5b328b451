"""Stage eval_pretrain: did a pretrained model learn context? Its MLM loss on held-out cells (the fine-tuning cells,
never pretrained on) beside a unigram predictor's (gene frequencies of that species' pretraining corpus), on the
same masked genes, with a bootstrap interval of the gain (mixgf.mlm_eval)."""

import argparse
from pathlib import Path

import torch

from common import load_params

from mixgf.checkpoint import check_token_dataset
from mixgf.io import write_json_atomic
from mixgf.mlm_eval import evaluate_mlm, gene_frequencies
from mixgf.model import MixGFForPretraining
from mixgf.tokens import load_tokens
from mixgf.vocab import GeneVocab


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--species", required=True, help="comma-separated: the species the model was pretrained on")
    parser.add_argument("--corpora", required=True, type=Path, help="folder of the per-species pretraining corpora")
    parser.add_argument("--held-out", required=True, type=Path, help="folder of the <species>_finetune token datasets")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    params = load_params()
    p = params["eval_pretrain"]
    torch.manual_seed(params["seed"])
    model = MixGFForPretraining.from_pretrained(args.model).eval()
    vocab = GeneVocab.read(args.model / "vocab.tsv")
    results = {}
    for species in args.species.split(","):
        corpus, _ = load_tokens(args.corpora / species)
        held_out, meta = load_tokens(args.held_out / f"{species}_finetune")
        check_token_dataset(model.config, meta, str(args.held_out / f"{species}_finetune"))
        frequencies = gene_frequencies(corpus, len(vocab), max_cells=p["frequency_cells"])
        r = results[species] = evaluate_mlm(model, held_out, vocab, frequencies, species=species,
                                            max_cells=p["max_cells"], seed=params["seed"],
                                            n_boot=params["controls"]["n_boot"])
        print(f"{args.model} on {r['cells']:,} held-out {species} cells: MLM loss {r['mlm_loss']:.3f}, unigram "
              f"{r['unigram_loss']:.3f}, gain {r['gain']:+.3f} [{r['gain_low']:+.3f}, {r['gain_high']:+.3f}] nats")
    write_json_atomic(args.out, results)


if __name__ == "__main__":
    main()
