"""The ``mixgf`` command line: thin argument parsing around the library functions."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mixgf.readers import InputError


def _tokenize(args) -> None:
    from mixgf.tokenize import tokenize_files
    from mixgf.vocab import load_medians, load_vocab

    result = tokenize_files(
        args.inputs, args.out, species=args.species, vocab=load_vocab(args.vocab),
        medians=load_medians(args.species, args.medians), max_len=args.max_len,
        obs_keys=[k for k in args.obs_keys.split(",") if k], counts=args.counts, gene_column=args.gene_column,
        normalized=args.normalized, sum_duplicates=args.sum_duplicates, min_mapped=args.min_mapped,
        chunk_size=args.chunk_size, workers=args.workers)
    for summary in result.files:
        print(summary.line(), file=sys.stderr)
    print(f"{result.n_cells:,} cells -> {result.out_dir}", file=sys.stderr)


def _medians(args) -> None:
    from mixgf.medians import error_bound, file_medians

    medians = file_medians(args.inputs, args.species, counts=args.counts, gene_column=args.gene_column,
                           passes=args.passes, min_cells=args.min_cells, chunk_size=args.chunk_size,
                           name=Path(args.out).name.split(".")[0])
    medians.write(args.out)
    print(f"{medians.values.size:,} gene medians (relative error <= {error_bound(args.passes):.1e}) -> {args.out}",
          file=sys.stderr)


def _pretrain(args) -> None:
    """Pretrain Mix-Geneformer (or, with --simcse-weight 0, an MLM-only baseline); torchrun runs it data-parallel."""
    import torch

    from mixgf.model import PRESETS, MixGFForPretraining
    from mixgf.pretrain import PretrainConfig, pretrain
    from mixgf.tokens import load_tokens
    from mixgf.vocab import load_vocab

    dataset, meta = load_tokens(args.corpus)
    vocab = load_vocab(args.vocab)
    if vocab.hash != meta["vocab"]["hash"]:
        raise ValueError(f"{args.corpus} was tokenized with vocabulary {meta['vocab']['name']}, not {vocab.name}; "
                         "pass the vocabulary that made it with --vocab")
    torch.manual_seed(args.seed)
    model = MixGFForPretraining(PRESETS[args.preset](meta, simcse_weight=args.simcse_weight, simcse_tau=args.tau,
                                                     pooling=args.pooling, gather_negatives=args.gather_negatives))
    cfg = PretrainConfig(lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                         batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps,
                         save_every=args.save_every, seed=args.seed)
    result = pretrain(model, dataset, meta, cfg, args.out, log_dir=args.logs, vocab=vocab)
    print(f"{result.step} steps -> {result.model_dir}", file=sys.stderr)


def _import_dict(args) -> None:
    """Geneformer / Mouse-Geneformer pickles -> the plain-text formats this package reads."""
    import pandas as pd

    from mixgf.vocab import GeneVocab, Medians, load_pickle_dict

    d = load_pickle_dict(args.pickle)
    if args.kind == "tokens":
        GeneVocab.from_token_dict(d, name=Path(args.pickle).stem).write(args.out)
    elif args.kind == "medians":
        Medians(pd.Series(d, dtype="float64")).write(args.out)
    else:
        pd.DataFrame({"symbol": list(d), "ensembl_id": list(d.values())}).to_csv(args.out, sep="\t", index=False)
    print(f"{len(d):,} entries -> {args.out}", file=sys.stderr)


def _vocab(args) -> None:
    """Unified vocabulary from the Geneformer V1 ids and another mouse gene list (e.g. Mouse-Geneformer's)."""
    from mixgf.vocab import GeneVocab, geneformer_v1_vocab, load_pickle_dict, unified_vocab

    path = Path(args.mouse)
    genes = load_pickle_dict(path) if path.suffix == ".pkl" else GeneVocab.read(path).tokens
    vocab = unified_vocab(geneformer_v1_vocab(), genes)
    vocab.write(args.out)
    print(f"{len(vocab):,} tokens (hash {vocab.hash}) -> {args.out}", file=sys.stderr)


def _merge(args) -> None:
    from mixgf.corpus import Source, merge_corpora
    from mixgf.vocab import load_vocab

    sources = [Source(path, load_vocab(vocab), species) for path, species, vocab in args.source]
    for summary in merge_corpora(sources, args.out, load_vocab(args.vocab), seed=args.seed,
                                 rows_per_bucket=args.rows_per_bucket):
        print(summary.line(), file=sys.stderr)
    print(f"merged corpus -> {args.out}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixgf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokenize", help="rank-value encode raw-count files into a token dataset")
    p.add_argument("inputs", nargs="+", help=".h5ad, .loom, 10x matrix folders or 10x .h5 files")
    p.add_argument("--species", required=True, help="human or mouse")
    p.add_argument("--out", required=True, type=Path, help="output dataset directory (replaced atomically)")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--medians", help="gene median TSV (default: Geneformer V1's for human)")
    p.add_argument("--vocab", help="vocabulary TSV (default: the bundled unified vocabulary)")
    p.add_argument("--obs-keys", default="", help="comma-separated obs columns to carry over")
    p.add_argument("--counts", default="X", help="count matrix: X, raw, or a layer name")
    p.add_argument("--gene-column", help="var column holding gene ids (Ensembl or symbols); 'index' for the index")
    p.add_argument("--normalized", action="store_true", help="accept non-integer values (not raw counts)")
    p.add_argument("--sum-duplicates", action="store_true", help="sum columns that map to the same Ensembl id")
    p.add_argument("--min-mapped", type=float, default=0.25, help="fail if fewer genes map to the vocabulary")
    p.add_argument("--chunk-size", type=int, default=1024, help="cells per chunk")
    p.add_argument("--workers", type=int, default=1, help="worker processes (chunks and files in parallel)")
    p.set_defaults(func=_tokenize)

    corpus = sub.add_parser("corpus", help="token corpora").add_subparsers(dest="corpus_command", required=True)
    p = corpus.add_parser("merge", help="merge token datasets from different vocabularies into one shuffled corpus")
    p.add_argument("--source", nargs=3, action="append", required=True, metavar=("DATASET", "SPECIES", "VOCAB"),
                   help="a token dataset, its species and its vocabulary: mixgf, geneformer-v1, a .pkl token "
                        "dictionary or a vocabulary .tsv (repeat for every source)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--vocab", default="mixgf", help="target vocabulary (default: the bundled unified one)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rows-per-bucket", type=int, default=100_000, help="rows shuffled in memory at a time")
    p.set_defaults(func=_merge)

    p = sub.add_parser("medians", help="per-gene non-zero medians of count / n_counts * 10,000 over many files")
    p.add_argument("inputs", nargs="+", help=".h5ad, .loom, 10x matrix folders or 10x .h5 files")
    p.add_argument("--species", required=True, help="human or mouse")
    p.add_argument("--out", required=True, help="output TSV (ensembl_id, median); .gz to compress")
    p.add_argument("--counts", default="X", help="count matrix: X, raw, or a layer name")
    p.add_argument("--gene-column", help="var column holding gene ids (Ensembl or symbols)")
    p.add_argument("--passes", type=int, default=2, help="passes over the data; each one shrinks the error 256x")
    p.add_argument("--min-cells", type=int, default=1, help="genes seen in fewer cells get no median")
    p.add_argument("--chunk-size", type=int, default=2048, help="cells per chunk")
    p.set_defaults(func=_medians)

    p = sub.add_parser("pretrain", help="pretrain on a token corpus (MLM + SimCSE); run under torchrun for DDP")
    p.add_argument("corpus", help="token dataset (e.g. from `mixgf corpus merge`)")
    p.add_argument("--out", required=True, help="checkpoint folder; the model goes to OUT/model")
    p.add_argument("--vocab", default="mixgf", help="the corpus's vocabulary (saved with the model)")
    p.add_argument("--preset", default="paper", choices=["paper", "demo"], help="architecture")
    p.add_argument("--simcse-weight", type=float, default=1.0, help="0: MLM only (the baselines)")
    p.add_argument("--tau", type=float, default=0.05, help="NT-Xent temperature")
    p.add_argument("--pooling", default="first", choices=["first", "mean"])
    p.add_argument("--gather-negatives", action="store_true", help="all-gather SimCSE negatives across processes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=10_000)
    p.add_argument("--weight-decay", type=float, default=0.001)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, help="a fixed number of steps instead of --epochs")
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (a rerun resumes)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--logs", help="dvclive folder for the loss curves")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("import-dict", help="convert a Geneformer-style pickle to TSV (safely)")
    p.add_argument("pickle")
    p.add_argument("--kind", required=True, choices=["tokens", "medians", "symbols"])
    p.add_argument("--out", required=True)
    p.set_defaults(func=_import_dict)

    p = sub.add_parser("vocab", help="build a unified vocabulary with another mouse gene list")
    p.add_argument("mouse", help="Mouse-Geneformer token dictionary (.pkl) or a vocabulary TSV")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_vocab)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except (InputError, FileNotFoundError, ValueError) as err:
        print(f"mixgf {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
