"""Stage tokenize: rank-value encode one species' cells of one split into a token dataset.

Under the paper profile the pretraining cells are the published corpora, already tokenized (stage corpus reads
them), so the pretrain split is written as an empty dataset that says so.
"""

import argparse

import pyarrow as pa

from common import load_params

from mixgf.io import atomic_dir
from mixgf.tokenize import tokenize_files
from mixgf.tokens import TokenDatasetWriter
from mixgf.vocab import GeneVocab, Medians

OBS_KEYS = ["organ", "cell_type", "disease"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--species", required=True)
    parser.add_argument("--split", required=True, choices=["pretrain", "finetune", "perturb"])
    parser.add_argument("--vocab", required=True)
    parser.add_argument("--medians", required=True)
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    params = load_params()
    vocab, medians = GeneVocab.read(args.vocab), Medians.read(args.medians)
    if params["profile"] == "paper" and args.split == "pretrain":
        with atomic_dir(args.out) as tmp:
            writer = TokenDatasetWriter(tmp)
            writer.write(pa.RecordBatch.from_pydict(
                {"input_ids": pa.array([], pa.list_(pa.int32())), "length": pa.array([], pa.int32())}))
            writer.close({"species": args.species, "vocab": vocab.identity(), "medians": {}, "max_len": 0,
                          "note": "paper profile: the pretraining cells are the published, tokenized corpora"})
        return
    result = tokenize_files(args.inputs, args.out, species=args.species, vocab=vocab, medians=medians,
                            max_len=params["tokenize"]["max_len"], obs_keys=OBS_KEYS)
    for summary in result.files:
        print(summary.line())


if __name__ == "__main__":
    main()
