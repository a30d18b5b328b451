"""Stage vocab: the unified gene vocabulary every later stage tokenizes into.

demo: the bundled one (Geneformer V1 ids, then Ensembl BioMart mouse genes). paper: Geneformer V1 ids, then
the genes of Mouse-Geneformer's token dictionary, so Mouse-Genecorpus-20M remaps without losing a gene.
"""

import argparse

from common import load_params, require_inputs

from mixgf.vocab import default_vocab, geneformer_v1_vocab, load_pickle_dict, unified_vocab


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    args = parser.parse_args(argv)
    params = load_params()
    if params["profile"] == "paper":
        mouse_dict = require_inputs(params, "mouse_token_dictionary")["mouse_token_dictionary"]
        vocab = unified_vocab(geneformer_v1_vocab(), load_pickle_dict(mouse_dict))
    else:
        vocab = default_vocab()
    vocab.write(args.out)
    print(f"vocabulary {vocab.name}: {len(vocab):,} tokens, hash {vocab.hash} -> {args.out}")


if __name__ == "__main__":
    main()
