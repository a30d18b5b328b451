"""Fine-tuning throughput: :func:`mixgf.classify.finetune` vs Hugging Face ``Trainer`` + ``DataCollatorWithPadding``.

Not a test (pytest does not collect ``bench_*.py``). Needs ``accelerate`` for the Trainer (``pip install accelerate``;
mixgf itself does not). Run from the repository root, e.g.::

    python tests/benchmarks/bench_finetune.py --cells 600 --epochs 2 --max-len 256            # CPU, minutes
    python tests/benchmarks/bench_finetune.py --cells 20000 --preset paper --max-len 2048    # a GPU
    python tests/benchmarks/bench_finetune.py --tokens data/finetune/human_Immune --vocab data/vocab.tsv

Every row fine-tunes the same model (a ``BertForMaskedLM`` checkpoint of the ``--preset`` size on the 82,606-gene
vocabulary, saved with the config keys mixgf reads) on the same cells and split, with the same settings (SPEC §5: LR
5e-5, cosine, warmup, weight decay 0.001, batch 12, gradient clipping 1.0, bf16 autocast on a GPU) and the same
work: ``epochs`` epochs, validation and test cells evaluated after each, the model saved at the end. It reports
training cells per second of that whole job (``epochs x training cells / wall time``), the best of ``rounds``
interleaved runs, and mixgf's rate over each row's: of the best rates, and within each round (median and range over
rounds: the machine's speed drifts, and a round's rows run minutes apart at most). The Trainer rows are plain random
batches (its default) and ``group_by_length`` (what the Geneformer and Mix-Geneformer notebooks use). Synthetic
cells have log-normal lengths with the median at 45% of ``max_len`` (a tenth at the cap), as in bench_pretrain.py;
labels are random (throughput only). Synthetic genes are drawn uniformly from all 82,606, so the cells hold most of
them: the worst case for mixgf, which trains only the embedding rows of the cells' genes (a real dataset of one
species holds at most that species' rows); ``--tokens`` measures real cells.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from transformers import BertConfig, BertForMaskedLM

from mixgf.classify import FinetuneConfig, finetune, split_cells
from mixgf.model import PRESETS
from mixgf.tokens import load_tokens
from mixgf.vocab import default_vocab, load_vocab


def synthetic_cells(n_cells: int, max_len: int, vocab_size: int, n_types: int = 10, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(0.45 * max_len), 0.6, n_cells), 0.05 * max_len, max_len).astype(int)
    cells = [rng.choice(np.arange(2, vocab_size), size=n, replace=False).astype(np.int32) for n in lengths]
    types = [f"type {i}" for i in rng.integers(0, n_types, n_cells)]
    return datasets.Dataset.from_dict({"input_ids": cells, "length": lengths, "cell_type": types})


def benchmark_cells(args) -> tuple:
    """Quiet libraries, ``args.threads`` torch threads, and the benchmark's cells: the first ``args.cells`` of
    ``args.tokens``, or synthetic ones of at most ``args.max_len`` genes. Returns (vocab, dataset, meta)."""
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    vocab = load_vocab(args.vocab) if args.vocab else default_vocab()
    if args.tokens:
        dataset, meta = load_tokens(args.tokens)
        if meta["vocab"]["hash"] != vocab.hash:
            raise SystemExit(f"{args.tokens} was tokenized with vocabulary {meta['vocab']['name']!r}; pass its file "
                             "with --vocab (the demo pipeline's: data/vocab.tsv)")
        return vocab, dataset.select(range(min(args.cells, len(dataset)))), meta
    meta = {"vocab": vocab.identity(), "medians": None, "max_len": args.max_len}
    return vocab, synthetic_cells(args.cells, args.max_len, len(vocab)), meta


def checkpoint(out: Path, meta: dict, preset: str, vocab) -> Path:
    """A pretrained-model folder as mixgf writes it: BERT config with vocab / medians / max_len, BERT weights."""
    arch = PRESETS[preset]({**meta, "max_len": None}).to_dict()  # the preset's architecture; positions below
    keep = set(BertConfig().to_dict()) - {"model_type", "architectures", "transformers_version"}
    torch.manual_seed(0)
    config = BertConfig(**{k: v for k, v in arch.items() if k in keep}, vocab=meta["vocab"], medians=meta["medians"],
                        max_len=meta["max_len"])
    config.max_position_embeddings = max(config.max_position_embeddings, meta["max_len"])
    BertForMaskedLM(config).save_pretrained(out)
    vocab.write(out / "vocab.tsv")
    return out


def ratio_table(names: list[str], rates: np.ndarray, extra: list[str] | None = None) -> str:
    """A Markdown table of ``rates`` (rounds x rows, row 0 mixgf's): each row's best rate, mixgf's best over it, and
    mixgf's rate over the row's in the same round (median, min-max over rounds); ``extra``: a last column's cells."""
    best, per_round = rates.max(0), rates[:, :1] / rates
    head = "| | cells/s (best) | mixgf is (best / best) | mixgf is, per round: median (min-max) |"
    lines = [head + (" max abs difference |" if extra else ""), "|---|---:|---:|---:|" + ("---:|" if extra else "")]
    for i, name in enumerate(names):
        cells = [f"{best[i]:,.1f}", f"{best[0] / best[i]:.2f}x",
                 f"{np.median(per_round[:, i]):.2f}x ({per_round[:, i].min():.2f}-{per_round[:, i].max():.2f})"]
        lines.append(f"| {name} | " + " | ".join(cells + ([extra[i]] if extra else [])) + " |")
    return "\n".join(lines)


def run_mixgf(pretrained: Path, dataset, meta, label: str, cfg: FinetuneConfig) -> float:
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        result = finetune(pretrained, dataset, meta, label, cfg, out_dir=Path(out) / "clf")
        seconds = time.perf_counter() - start
    return cfg.epochs * result.metrics["n_train"] / seconds


def gene_tokenizer(vocab):
    """A tokenizer that only pads (DataCollatorWithPadding needs one): the genes as a word-level vocabulary."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tokens = vocab.tokens
    model = WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<mask>")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(model), pad_token="<pad>", mask_token="<mask>")


def accuracy_of(prediction) -> dict:
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


def run_trainer(pretrained: Path, dataset, label: str, cfg: FinetuneConfig, vocab, *, grouped: bool) -> float:
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    split = split_cells(dataset[label], seed=cfg.seed)
    label_of = {name: i for i, name in enumerate(split.labels)}
    data = dataset.select_columns(["input_ids", "length", label])
    data = data.map(lambda e: {"labels": [label_of.get(x, 0) for x in e[label]]}, batched=True,
                    remove_columns=[label], keep_in_memory=True)
    train, val, test = (data.select(rows) for rows in (split.train, split.val, split.test))
    on_gpu = torch.cuda.is_available()
    steps = cfg.epochs * -(-len(train) // cfg.batch_size)
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            pretrained, num_labels=len(split.labels), id2label=dict(enumerate(split.labels)), label2id=label_of)
        args = TrainingArguments(
            output_dir=out, learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=cfg.warmup(steps),
            weight_decay=cfg.weight_decay, per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.eval_batch_size, num_train_epochs=cfg.epochs, eval_strategy="epoch",
            save_strategy="no", logging_strategy="epoch", report_to="none", disable_tqdm=True, seed=cfg.seed,
            bf16=on_gpu and cfg.dtype == "bfloat16", max_grad_norm=cfg.grad_clip,
            train_sampling_strategy="group_by_length" if grouped else "random", length_column_name="length")
        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset={"val": val, "test": test},
                          data_collator=DataCollatorWithPadding(gene_tokenizer(vocab)),
                          compute_metrics=accuracy_of)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        trainer.save_model(str(Path(out) / "clf"))
        seconds = time.perf_counter() - start
    return cfg.epochs * len(train) / seconds


def add_cell_arguments(parser: argparse.ArgumentParser, label: bool = True) -> None:
    """The options :func:`benchmark_cells` and :func:`checkpoint` read (and ``--label``, where cells are classified)."""
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="model size (paper: 6 x 256)")
    parser.add_argument("--tokens", help="a token dataset instead of synthetic cells")
    parser.add_argument("--vocab", help="the vocabulary file of --tokens (default: the bundled 82,606-gene one)")
    if label:
        parser.add_argument("--label", default="cell_type", help="the obs column of --tokens to classify")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    add_cell_arguments(parser)
    args = parser.parse_args(argv)
    vocab, dataset, meta = benchmark_cells(args)
    cfg = FinetuneConfig(epochs=args.epochs)
    lengths = np.asarray(dataset["length"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    genes = len(np.unique(np.concatenate([np.asarray(c)[: meta["max_len"]] for c in dataset["input_ids"]])))
    print(f"{len(dataset)} cells ({args.tokens or 'synthetic'}), length median {np.median(lengths):.0f}, mean "
          f"{lengths.mean():.0f}, max_len {meta['max_len']}, {genes:,} distinct genes (the embedding rows mixgf "
          f"trains); {args.preset} model, vocab {len(vocab)}; batch "
          f"{cfg.batch_size}; {args.epochs} epochs x {args.rounds} rounds; {device}\n")

    rows = [("mixgf finetune (length-grouped, dynamic padding)", "mixgf"),
            ("Trainer + DataCollatorWithPadding, random batches", "random"),
            ("Trainer + DataCollatorWithPadding, group_by_length", "grouped")]
    rates = np.zeros((args.rounds, len(rows)))  # training cells/s of the whole job
    with tempfile.TemporaryDirectory() as root:
        pretrained = checkpoint(Path(root) / "pretrained", meta, args.preset, vocab)
        for r in range(args.rounds):
            for i, (_, kind) in enumerate(rows):
                if kind == "mixgf":
                    rates[r, i] = run_mixgf(pretrained, dataset, meta, args.label, cfg)
                else:
                    rates[r, i] = run_trainer(pretrained, dataset, args.label, cfg, vocab, grouped=kind == "grouped")
    print(ratio_table([name for name, _ in rows], rates))


if __name__ == "__main__":
    main()
