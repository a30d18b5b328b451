"""Stage corpus: the pretraining corpora and the downstream datasets.

<corpus>/mix (Mix-Genecorpus: human + mouse, remapped, shuffled), <corpus>/human and <corpus>/mouse (the
single-species baselines' corpora); <finetune>/<species>_<Organ> for every organ of Tables 1-2; <perturb>/
<species>_heart (disease and normal heart cells). Paper profile: the pretraining corpora are the published ones, in
their own vocabularies.
"""

import argparse
from pathlib import Path

import numpy as np

from common import load_params, require_inputs

from mixgf.corpus import Source, merge_corpora
from mixgf.demo import ORGANS
from mixgf.io import atomic_dir, write_json_atomic
from mixgf.tokens import load_tokens, write_rows
from mixgf.vocab import GeneVocab, geneformer_v1_vocab, load_pickle_dict


PAPER_INPUTS = ("genecorpus_30m", "mouse_genecorpus_20m", "mouse_token_dictionary")


def pretraining_sources(paths: dict | None, tokens: Path, vocab: GeneVocab) -> dict[str, Source]:
    """Our tokenized pretraining cells (demo), or the published corpora in their own vocabularies (paper)."""
    if paths is None:
        return {s: Source(str(tokens / f"{s}_pretrain"), vocab, s) for s in ("human", "mouse")}
    mouse_vocab = GeneVocab.from_token_dict(load_pickle_dict(paths["mouse_token_dictionary"]), "mouse-geneformer")
    return {"human": Source(str(paths["genecorpus_30m"]), geneformer_v1_vocab(), "human"),
            "mouse": Source(str(paths["mouse_genecorpus_20m"]), mouse_vocab, "mouse")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("vocab", "tokens", "corpus", "finetune", "perturb", "metrics"):
        parser.add_argument(f"--{name}", required=True, type=Path)
    args = parser.parse_args(argv)
    params = load_params()
    paths = require_inputs(params, *PAPER_INPUTS) if params["profile"] == "paper" else None
    vocab = GeneVocab.read(args.vocab)
    sources = pretraining_sources(paths, args.tokens, vocab)
    metrics = {}
    with atomic_dir(args.corpus) as corpus:
        for name, chosen in (("mix", ["human", "mouse"]), ("human", ["human"]), ("mouse", ["mouse"])):
            summaries = merge_corpora([sources[s] for s in chosen], corpus / name, vocab,
                                      seed=params["corpus"]["seed"], rows_per_bucket=params["corpus"]["rows_per_bucket"])
            lengths = np.load(corpus / name / "lengths.npy")
            metrics[name] = {"cells": int(len(lengths)), "mean_length": round(float(lengths.mean()), 2),
                             "tokens_missing": sum(s.tokens_missing for s in summaries)}
            print("\n".join(s.line() for s in summaries))
    with atomic_dir(args.finetune) as tmp:
        for species, organs in ORGANS.items():
            data, meta = load_tokens(args.tokens / f"{species}_finetune")
            organ_of = np.asarray(data["organ"])
            for organ in organs:
                rows = np.flatnonzero(organ_of == organ)
                write_rows(data, rows, tmp / f"{species}_{organ}", meta | {"organ": organ})
                metrics.setdefault("finetune", {})[f"{species}_{organ}"] = int(len(rows))
    with atomic_dir(args.perturb) as tmp:
        for species in ORGANS:
            data, meta = load_tokens(args.tokens / f"{species}_perturb")
            write_rows(data, np.arange(len(data)), tmp / f"{species}_heart", meta | {"organ": "Heart"})
            metrics.setdefault("perturb", {})[f"{species}_heart"] = len(data)
    write_json_atomic(args.metrics, metrics)


if __name__ == "__main__":
    main()
