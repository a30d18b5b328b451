"""The ``mixgf`` command line: thin argument parsing around the library functions."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


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
                                                     pooling=args.pooling, gather_negatives=args.gather_negatives,
                                                     simcse_loss=args.simcse_loss))
    cfg = PretrainConfig(lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                         batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps,
                         save_every=args.save_every, log_every=args.log_every, num_workers=args.num_workers,
                         deterministic=args.deterministic, seed=args.seed)
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
    """Unified vocabulary from the Geneformer V1 ids and a mouse gene list (default: the bundled BioMart genes),
    union or with one-to-one orthologs sharing a token."""
    from mixgf.vocab import GeneVocab, default_vocab, geneformer_v1_vocab, load_pickle_dict, orthologs_vocab, unified_vocab

    if args.mouse is None:
        vocab = default_vocab()
    else:
        path = Path(args.mouse)
        genes = load_pickle_dict(path) if path.suffix == ".pkl" else GeneVocab.read(path).tokens
        vocab = unified_vocab(geneformer_v1_vocab(), genes)
    if args.mode == "orthologs":
        vocab = orthologs_vocab(vocab)
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


def _finetune(args) -> None:
    """Fine-tune a pretrained model on one labelled token dataset (SPEC §5); print the val-selected epoch."""
    from mixgf.classify import FinetuneConfig, finetune
    from mixgf.tokens import load_tokens
    from mixgf.vocab import load_vocab

    dataset, meta = load_tokens(args.tokens)
    cfg = FinetuneConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, warmup_steps=args.warmup_steps,
                         warmup_fraction=args.warmup_fraction, weight_decay=args.weight_decay, seed=args.seed,
                         dtype=args.dtype, max_len=args.max_len, min_fraction=args.min_fraction,
                         test_fraction=args.test_fraction, val_fraction=args.val_fraction)
    result = finetune(args.pretrained, dataset, meta, args.label, cfg, out_dir=args.out, random_init=args.random_init,
                      vocab=load_vocab(args.vocab) if args.vocab else None, source=str(args.tokens))
    m = result.metrics
    val = "n/a" if m["val_accuracy"] is None else f"{m['val_accuracy']:.4f}"
    print(f"epoch {result.best_epoch} (best on validation): val accuracy {val}, test accuracy "
          f"{m['test_accuracy']:.4f}, test macro-F1 {m['test_macro_f1']:.4f}; best test accuracy over epochs "
          f"{m['test_accuracy_best_on_test']:.4f}")
    print(f"{m['n_train']:,} train / {m['n_val']:,} val / {m['n_test']:,} test cells, {m['n_labels']} labels -> "
          f"{result.out_dir}", file=sys.stderr)


def _predict(args) -> None:
    """Predict cell types; with --label also score them (accuracy, macro-F1, 95% bootstrap intervals), and with
    --correspondence score cells of the other species than the classifier's through corresponding types."""
    import pandas as pd
    from transformers import AutoConfig

    from mixgf.classify import predict
    from mixgf.io import write_text_atomic
    from mixgf.tokens import cells_species, load_tokens
    from mixgf.vocab import load_vocab

    dataset, meta = load_tokens(args.tokens)
    if args.label and args.label not in dataset.column_names:
        raise ValueError(f"{args.tokens} has no column {args.label!r}; its columns are {dataset.column_names}")
    frame = predict(args.classifier, dataset, meta, batch_size=args.batch_size, max_tokens=args.max_tokens,
                    source=str(args.tokens), vocab=load_vocab(args.vocab) if args.vocab else None)
    write_text_atomic(args.out, frame.to_csv(index=False))
    print(f"{len(frame):,} cells -> {args.out}", file=sys.stderr)
    if not args.label:
        return
    truth = frame[args.label].astype(str).to_numpy()
    if args.correspondence:
        species = cells_species(meta)
        if species is None:
            raise ValueError(f"{args.tokens}: --correspondence needs cells of one species, the tokens record "
                             f"{meta.get('species')!r}")
        truth = _counterparts(truth, args.correspondence, "human" if species == "mouse" else "mouse", species)
    known = list(AutoConfig.from_pretrained(args.classifier).label2id)  # a cell of another type is always wrong
    unknown = ~pd.Series(truth).isin(known) & pd.Series(truth).notna()
    _score(truth, frame["predicted"].to_numpy(), args.out, label=args.label,
           n_cells_label_unknown_to_classifier=int(unknown.sum()))


def _counterparts(labels, path, source: str, target: str):
    """``target``-species labels in ``source`` names through the correspondence CSV at ``path``."""
    import pandas as pd

    from mixgf.baseline import counterparts

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        return counterparts(labels, table, source, target)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _score(truth, predicted, out, **extra) -> None:
    """Accuracy and macro-F1 with 95% bootstrap intervals over the cells with a true label (None: no counterpart
    in the predicted species), on stdout and in OUT.json beside the CSV."""
    import numpy as np

    from mixgf.io import write_json_atomic
    from mixgf.stats import bootstrap_ci

    known = np.array([t is not None for t in truth])
    if not known.any():
        raise ValueError("no cell has a true label that the predictions can be compared with (check --correspondence)")
    y, pred = np.asarray(truth)[known].astype(str), np.asarray(predicted)[known].astype(str)
    scores = {"n_cells": int(known.sum()), "n_cells_without_counterpart": int((~known).sum()), **extra}
    for name in ("accuracy", "macro_f1"):
        estimate, low, high = bootstrap_ci(y, pred, name, n_boot=2000, seed=0)
        scores[name] = {"estimate": estimate, "ci95": [low, high]}
    path = Path(out).with_suffix(".json")
    write_json_atomic(path, scores)
    print(f"accuracy {scores['accuracy']['estimate']:.4f} (95% CI {scores['accuracy']['ci95'][0]:.4f}-"
          f"{scores['accuracy']['ci95'][1]:.4f}), macro-F1 {scores['macro_f1']['estimate']:.4f} (95% CI "
          f"{scores['macro_f1']['ci95'][0]:.4f}-{scores['macro_f1']['ci95'][1]:.4f}) over {scores['n_cells']:,} cells")
    print(f"scores -> {path}", file=sys.stderr)


def _baseline(args) -> None:
    """The bar for cross-species transfer: a logistic regression on one species' one-to-one orthologs (log1p CP10k),
    trained on every SOURCE cell and tested on every TARGET cell."""
    import anndata as ad
    import pandas as pd

    from mixgf.baseline import ortholog_transfer, with_ensembl_ids
    from mixgf.io import write_text_atomic
    from mixgf.readers import count_matrix

    data = {}
    for role, path, species, column in (("source", args.source, args.source_species, args.source_gene_column),
                                        ("target", args.target, args.target_species, args.target_gene_column)):
        adata = ad.read_h5ad(path)
        matrix, var = count_matrix(adata, args.counts, str(path))
        adata = ad.AnnData(matrix, obs=adata.obs, var=var)
        data[role] = with_ensembl_ids(adata, species, gene_column=column, name=str(path))
    if args.label not in data["source"].obs:
        raise ValueError(f"{args.source}: obs has no column {args.label!r}; columns: {', '.join(data['source'].obs)}")
    transfer = ortholog_transfer(data["source"], data["target"], args.label, C=args.C)
    target = data["target"].obs
    frame = pd.DataFrame({"cell_index": range(len(target)), "cell_id": target.index.astype(str),
                          "predicted": transfer.predicted})
    if args.target_label:
        if args.target_label not in target:
            raise ValueError(f"{args.target}: obs has no column {args.target_label!r}; columns: {', '.join(target)}")
        frame[args.target_label] = target[args.target_label].astype(str).to_numpy()
    write_text_atomic(args.out, frame.to_csv(index=False))
    print(f"{len(frame):,} {transfer.target_species} cells predicted through {transfer.n_orthologs:,} one-to-one "
          f"orthologs -> {args.out}", file=sys.stderr)
    if args.target_label:
        truth = frame[args.target_label].to_numpy(dtype=object)
        if args.correspondence:
            truth = _counterparts(truth, args.correspondence, transfer.source_species, transfer.target_species)
        _score(truth, transfer.predicted, args.out, label=args.target_label, n_orthologs=transfer.n_orthologs)


def _embed(args) -> None:
    """Cell embeddings (mean of one layer over genes) of a token dataset or an .h5ad, into .obsm['X_mixgf']."""
    import anndata as ad
    import numpy as np

    from mixgf.embed import embed_anndata, embed_cells
    from mixgf.tokens import load_tokens
    from mixgf.vocab import load_vocab

    path = Path(args.input)
    if path.suffix == ".h5ad":
        if not args.species:
            raise ValueError(f"{path}: name the species of its cells (--species human or mouse) to tokenize them")
        adata = ad.read_h5ad(path)
        embed_anndata(adata, args.model, species=args.species, layer=args.layer, batch_size=args.batch_size,
                      max_tokens=args.max_tokens, medians=args.medians, counts=args.counts,
                      gene_column=args.gene_column)
    else:
        dataset, meta = load_tokens(path)
        embedding = embed_cells(args.model, dataset, meta, layer=args.layer, batch_size=args.batch_size,
                                max_tokens=args.max_tokens, vocab=load_vocab(args.vocab) if args.vocab else None,
                                source=str(path))
        obs = dataset.select_columns([c for c in dataset.column_names if c not in ("input_ids", "length")]).to_pandas()
        obs.index = obs.pop("cell_id").astype(str) if "cell_id" in obs else obs.index.astype(str)
        adata = ad.AnnData(obs=obs, obsm={"X_mixgf": embedding})
        adata.uns["X_mixgf"] = {"model": str(args.model), "layer": args.layer}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.h5ad")  # written whole, then renamed
    adata.write_h5ad(tmp)
    tmp.replace(out)
    n = int(np.isfinite(adata.obsm["X_mixgf"]).all(1).sum())
    print(f"{n:,} of {adata.n_obs:,} cells embedded ({adata.obsm['X_mixgf'].shape[1]} dimensions) -> {out}",
          file=sys.stderr)


def _perturb(args) -> None:
    """In silico perturbation (SPEC §7): per (cell, gene) cos_sim, or with --state-key/--start/--goal the shifts
    toward the goal state, plus their per-gene statistics in OUT.stats.csv."""
    import io

    from mixgf.io import write_bytes_atomic, write_text_atomic
    from mixgf.perturb import gene_stats, load_cells, perturb, perturb_to_goal
    from mixgf.vocab import load_vocab, symbol_map

    states = (args.state_key, args.start, args.goal)
    if any(v is not None for v in states) and None in states:
        raise ValueError("--state-key, --start and --goal go together: name the column, the start and the goal state")
    vocab = load_vocab(args.vocab) if args.vocab else None
    dataset, meta = load_cells(args.tokens, vocab)
    genes = "all" if args.genes == "all" else [g for g in args.genes.split(",") if g]
    options = dict(mode=args.mode, genes=genes, emb_layer=args.emb_layer, max_cells=args.max_cells,
                   batch_size=args.batch_size, vocab=vocab, device=args.device, source=str(args.tokens))
    if args.state_key is None:
        frame = perturb(args.model, dataset, meta, **options)
    else:
        frame = perturb_to_goal(args.model, dataset, meta, state_key=args.state_key, start=args.start,
                                goal=args.goal, **options)
        symbols = {e: s for species in ("mouse", "human") for s, e in symbol_map(species).items()}
        stats = gene_stats(frame, symbols=symbols, alternative=args.alternative, null=args.null)
        stats_path = Path(args.out).with_suffix(".stats.csv")
        write_text_atomic(stats_path, stats.to_csv(index=False))
        print(f"{len(stats):,} genes, {int((stats.fdr < 0.05).sum()):,} at FDR < 0.05 -> {stats_path}", file=sys.stderr)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    write_bytes_atomic(args.out, buffer.getvalue())
    print(f"{len(frame):,} perturbations of {frame.cell_index.nunique():,} cells -> {args.out}", file=sys.stderr)


def _check_inputs(args) -> None:
    """Check the inputs of a paper-scale run (formats, columns, vocabularies) without training; exit 1 on problems."""
    from mixgf.check import PaperInputs, check_paper_inputs

    inputs = PaperInputs(genecorpus_30m=args.genecorpus, mouse_genecorpus_20m=args.mouse_corpus,
                         mouse_token_dictionary=args.mouse_dictionary, mouse_medians=args.mouse_medians,
                         organs=args.organs, heart=args.heart, human_medians=args.human_medians)
    result = check_paper_inputs(inputs, max_len=args.max_len, sample=args.sample)
    for problem in result.problems:
        print(problem.line(), file=sys.stderr)
    if result.problems:
        raise SystemExit(f"mixgf check-inputs: {len(result.problems)} problem(s)")
    print("inputs OK: " + ", ".join(f"{k} {v:,}" for k, v in result.summary.items()), file=sys.stderr)


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
    p.add_argument("--simcse-loss", default="nt_xent", choices=["nt_xent", "eq3"],
                   help="nt_xent: over the 2N views (the authors' code); eq3: the paper's Eq. 3 (N x N, one way)")
    p.add_argument("--tau", type=float, default=0.05, help="SimCSE temperature")
    p.add_argument("--pooling", default="first", choices=["first", "mean"])
    p.add_argument("--gather-negatives", action="store_true", help="all-gather SimCSE negatives across processes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=10_000)
    p.add_argument("--weight-decay", type=float, default=0.001)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, help="a fixed number of steps instead of --epochs")
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (a rerun resumes)")
    p.add_argument("--log-every", type=int, default=10, help="log the losses every N steps")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader processes building batches")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (CUDA: bit-identical reruns, slower)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--logs", help="dvclive folder for the loss curves")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a pretrained model to classify cells (the paper's split)")
    p.add_argument("pretrained", help="pretrained model folder (config.json, model.safetensors, vocab.tsv)")
    p.add_argument("tokens", help="labelled token dataset (e.g. data/finetune/human_Immune)")
    p.add_argument("--label", required=True, help="obs column holding the labels (e.g. cell_type)")
    p.add_argument("--out", required=True, type=Path, help="classifier folder (replaced atomically)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--warmup-fraction", type=float, default=0.1,
                   help="cap of the warmup as a share of all steps (1: the paper's 500 steps always)")
    p.add_argument("--weight-decay", type=float, default=0.001)
    p.add_argument("--seed", type=int, default=42, help="split shuffle and training")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="autocast dtype on GPUs")
    p.add_argument("--max-len", type=int, help="keep at most this many top-ranked genes per cell")
    p.add_argument("--min-fraction", type=float, default=0.005, help="drop cell types with <= this share of cells")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the training cells that picks the epoch")
    p.add_argument("--random-init", action="store_true", help="same architecture, no pretrained weights (control)")
    p.add_argument("--vocab", help="vocabulary of a checkpoint whose config records none (geneformer-v1 or a file)")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("predict", help="predict cell types with a fine-tuned classifier")
    p.add_argument("classifier", help="classifier folder from `mixgf finetune`")
    p.add_argument("tokens", help="token dataset made with the classifier's vocabulary")
    p.add_argument("--out", required=True, help="CSV: cell_index, the obs columns, predicted, probability")
    p.add_argument("--label", help="obs column of true labels: print accuracy and macro-F1, write OUT.json")
    p.add_argument("--batch-size", type=int, default=64, help="at most this many cells a batch")
    p.add_argument("--max-tokens", type=int, help="at most this many padded tokens a batch (default: 4,096 on a CPU, "
                   "no limit on a GPU)")
    p.add_argument("--vocab", help="vocabulary of a classifier whose config records none")
    p.add_argument("--correspondence", help="CSV with columns mouse, human (corresponding cell types): score cells "
                   "of the other species than the classifier's by their counterpart type")
    p.set_defaults(func=_predict)

    p = sub.add_parser("baseline", help="cross-species control: logistic regression on one-to-one orthologs")
    p.add_argument("source", help=".h5ad of raw counts with labels (e.g. mouse), genes as Ensembl ids or symbols")
    p.add_argument("target", help=".h5ad of raw counts of the other species (e.g. human)")
    p.add_argument("--label", required=True, help="obs column of the source's labels")
    p.add_argument("--out", required=True, help="CSV: cell_index, cell_id, predicted (and --target-label)")
    p.add_argument("--target-label", help="obs column of the target's true labels: print accuracy, write OUT.json")
    p.add_argument("--correspondence", help="CSV with columns mouse, human: the target's labels in source names")
    p.add_argument("--source-species", default="mouse", choices=["mouse", "human"])
    p.add_argument("--target-species", default="human", choices=["mouse", "human"])
    p.add_argument("--source-gene-column", help="var column of the source holding gene ids (Ensembl or symbols)")
    p.add_argument("--target-gene-column", help="var column of the target holding gene ids (Ensembl or symbols)")
    p.add_argument("--counts", default="X", help="count matrix of both files: X, raw, or a layer name")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 penalty of the logistic regression")
    p.set_defaults(func=_baseline)

    p = sub.add_parser("embed", help="cell embeddings: mean of one layer over a cell's genes, in .obsm['X_mixgf']")
    p.add_argument("model", help="model folder (pretrained or fine-tuned)")
    p.add_argument("input", help="token dataset, or an .h5ad of raw counts (tokenized with the model's vocabulary)")
    p.add_argument("--out", required=True, help="output .h5ad (obs of the input, .obsm['X_mixgf'])")
    p.add_argument("--layer", type=int, default=0, help="0: last layer, -1: the one before (Geneformer's emb_layer)")
    p.add_argument("--species", help="species of an .h5ad input")
    p.add_argument("--medians", help="gene median TSV for an .h5ad input (default: the bundled ones)")
    p.add_argument("--counts", default="X", help="count matrix of an .h5ad input: X, raw, or a layer name")
    p.add_argument("--gene-column", help="var column of an .h5ad input holding gene ids")
    p.add_argument("--batch-size", type=int, default=64, help="at most this many cells a batch")
    p.add_argument("--max-tokens", type=int, help="at most this many padded tokens a batch (default: 4,096 on a CPU, "
                   "no limit on a GPU)")
    p.add_argument("--vocab", help="vocabulary of a model whose config records none")
    p.set_defaults(func=_embed)

    p = sub.add_parser("perturb", help="in silico perturbation: delete or overexpress genes, measure the shift")
    p.add_argument("model", help="BertForMaskedLM or BertForSequenceClassification folder (this project's or Geneformer's)")
    p.add_argument("tokens", help="token dataset, or a Geneformer-format dataset folder (then name --vocab)")
    p.add_argument("--mode", required=True, choices=["delete", "overexpress"])
    p.add_argument("--out", required=True, help="OUT.parquet: one row per (cell, perturbed gene)")
    p.add_argument("--genes", default="all", help="'all' (every gene of every cell) or Ensembl ids, comma-separated")
    p.add_argument("--emb-layer", type=int, default=0, help="0: last layer, -1: the one before (Geneformer's emb_layer)")
    p.add_argument("--max-cells", type=int, help="perturb a seed-42 sample of this many cells (Geneformer's max_ncells)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="perturbed cells per forward pass (64 is fastest on CPU; raise it on a GPU)")
    p.add_argument("--vocab", help="vocabulary of a model whose config records none (geneformer-v1 or a file)")
    p.add_argument("--device", help="torch device (default: the GPU if there is one)")
    p.add_argument("--state-key", help="obs column of cell states: perturb --start cells toward --goal cells")
    p.add_argument("--start", help="state of the cells to perturb")
    p.add_argument("--goal", help="state whose mean embedding is the goal; writes OUT.stats.csv too")
    p.add_argument("--alternative", default="two-sided", choices=["two-sided", "greater", "less"],
                   help="Wilcoxon rank-sum alternative for OUT.stats.csv (greater: toward the goal)")
    p.add_argument("--null", default="pooled", choices=["pooled", "random"],
                   help="null shifts: all genes' pooled (Geneformer) or a random-gene draw (genes weighted equally)")
    p.set_defaults(func=_perturb)

    p = sub.add_parser("check-inputs", help="check a paper-scale run's inputs (formats, columns) without training")
    p.add_argument("--genecorpus", required=True, type=Path, help="Genecorpus-30M (save_to_disk folder, V1 ids)")
    p.add_argument("--mouse-corpus", required=True, type=Path, help="Mouse-Genecorpus-20M (save_to_disk folder)")
    p.add_argument("--mouse-dictionary", required=True, type=Path, help="MLM-re_token_dictionary_v1.pkl")
    p.add_argument("--mouse-medians", required=True, type=Path, help="mouse_gene_median_dictionary.pkl (or a TSV)")
    p.add_argument("--human-medians", type=Path, help="human medians (default: Geneformer V1's, bundled)")
    p.add_argument("--organs", required=True, type=Path, help="folder of <species>_<Organ>.h5ad (obs cell_type)")
    p.add_argument("--heart", required=True, type=Path, help="folder of <species>_heart.h5ad (obs disease)")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--sample", type=int, default=1000, help="rows of each corpus checked")
    p.set_defaults(func=_check_inputs)

    p = sub.add_parser("import-dict", help="convert a Geneformer-style pickle to TSV (safely)")
    p.add_argument("pickle")
    p.add_argument("--kind", required=True, choices=["tokens", "medians", "symbols"])
    p.add_argument("--out", required=True)
    p.set_defaults(func=_import_dict)

    p = sub.add_parser("vocab", help="build a unified vocabulary (union, or one-to-one orthologs sharing a token)")
    p.add_argument("mouse", nargs="?", help="Mouse-Geneformer token dictionary (.pkl) or a vocabulary TSV "
                   "(default: the bundled Ensembl BioMart mouse genes)")
    p.add_argument("--mode", choices=("union", "orthologs"), default="union",
                   help="union: every gene its own token (the paper); orthologs: a one-to-one human/mouse pair "
                   "(bundled Ensembl BioMart table) shares the human token")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_vocab)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as err:  # mixgf.readers.InputError is a ValueError
        print(f"mixgf {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
