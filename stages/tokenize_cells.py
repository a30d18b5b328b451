"""Stage tokenize: rank-value encode one species' cells of one split into a token dataset."""

import argparse

from common import load_params

from mixgf.tokenize import tokenize_files
from mixgf.vocab import GeneVocab, Medians

OBS_KEYS = ["organ", "cell_type", "disease"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--species", required=True)
    parser.add_argument("--vocab", required=True)
    parser.add_argument("--medians", required=True)
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    params = load_params()
    result = tokenize_files(args.inputs, args.out, species=args.species, vocab=GeneVocab.read(args.vocab),
                            medians=Medians.read(args.medians), max_len=params["tokenize"]["max_len"],
                            obs_keys=OBS_KEYS)
    for summary in result.files:
        print(summary.line())


if __name__ == "__main__":
    main()
