"""Stage vocab: the unified gene vocabulary every later stage tokenizes into.

demo: the bundled one (Geneformer V1 ids, then Ensembl BioMart mouse genes). paper: Geneformer V1 ids, then
the genes of Mouse-Geneformer's token dictionary, so Mouse-Genecorpus-20M remaps without losing a gene.
vocab.genes = atlas (the demo) keeps only the genes of the atlas's files: the output head and its AdamW update were
three quarters of a demo pretraining step with all 82,606 tokens. vocab.mode = orthologs (ours, not the paper's)
merges every one-to-one human/mouse ortholog pair into one token (mixgf.vocab.orthologs_vocab).
"""

import argparse
from pathlib import Path

import anndata as ad

from common import load_params, require_inputs

from mixgf.vocab import (VOCAB_MODES, default_vocab, geneformer_v1_vocab, load_pickle_dict, orthologs_vocab,
                         subset_vocab, unified_vocab)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--atlas", type=Path, required=True, help="the atlas stage's folder of .h5ad files")
    args = parser.parse_args(argv)
    params = load_params()
    if params["profile"] == "paper":
        mouse_dict = require_inputs(params, "mouse_token_dictionary")["mouse_token_dictionary"]
        vocab = unified_vocab(geneformer_v1_vocab(), load_pickle_dict(mouse_dict))
    else:
        vocab = default_vocab()
    mode = params["vocab"]["mode"]
    if mode not in VOCAB_MODES:
        raise SystemExit(f"params.yaml: vocab.mode must be one of {', '.join(VOCAB_MODES)}, got {mode!r}")
    if mode == "orthologs":
        vocab = orthologs_vocab(vocab)
    if params["vocab"]["genes"] == "atlas":
        vocab = subset_vocab(vocab, {g for f in sorted(args.atlas.glob("*.h5ad")) for g in ad.read_h5ad(f, backed="r").var_names})
    elif params["vocab"]["genes"] != "all":
        raise SystemExit(f"params.yaml: vocab.genes must be all or atlas, got {params['vocab']['genes']!r}")
    vocab.write(args.out)
    print(f"vocabulary {vocab.name}: {len(vocab):,} tokens, hash {vocab.hash} -> {args.out}")


if __name__ == "__main__":
    main()
