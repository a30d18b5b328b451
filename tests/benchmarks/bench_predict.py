"""Prediction throughput of :func:`mixgf.classify.predict` by tokens a batch: why a CPU batch holds 4,096 tokens.

Not a test (pytest does not collect ``bench_*.py``). Run from the repository root, e.g.::

    python tests/benchmarks/bench_predict.py --tokens data/finetune/mouse_Heart --vocab data/vocab.tsv --threads 1
    python tests/benchmarks/bench_predict.py --tokens data/finetune/mouse_Heart --vocab data/vocab.tsv --threads 2

Fine-tunes one epoch on the cells (the classifier's weights do not matter here), then times ``predict`` on the same
cells, at most ``--batch-size`` cells a batch, with each of ``--max-tokens`` (``none``: no token limit, so batches of
``--batch-size`` cells), interleaved over ``rounds``: cells/s of the call (model load included), best and median over
rounds. Evaluation after each fine-tuning epoch and ``embed_cells`` batch the same way.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_finetune import add_cell_arguments, benchmark_cells, checkpoint

from mixgf.classify import FinetuneConfig, finetune, predict


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-tokens", nargs="+", default=["1024", "2048", "4096", "8192", "none"])
    parser.add_argument("--rounds", type=int, default=7)
    add_cell_arguments(parser)
    args = parser.parse_args(argv)
    vocab, dataset, meta = benchmark_cells(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"{len(dataset)} cells ({args.tokens or 'synthetic'}), {args.preset} model; {args.rounds} rounds; {device}\n")

    budgets = [None if m == "none" else int(m) for m in args.max_tokens]
    seconds = np.zeros((args.rounds, len(budgets)))
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pretrained = checkpoint(Path(root) / "pretrained", meta, args.preset, vocab)
        classifier = finetune(pretrained, dataset, meta, args.label, FinetuneConfig(epochs=1),
                              out_dir=Path(root) / "classifier").out_dir
        for r in range(args.rounds):
            for i, budget in enumerate(budgets):
                start = time.perf_counter()
                predict(classifier, dataset, meta, batch_size=args.batch_size, max_tokens=budget or 2**62)
                seconds[r, i] = time.perf_counter() - start
    rates = len(dataset) / seconds
    print(f"| tokens a batch (at most {args.batch_size} cells) | cells/s (best) | cells/s (median) |\n|---|---:|---:|")
    for i, budget in enumerate(args.max_tokens):
        print(f"| {budget} | {rates[:, i].max():,.0f} | {np.median(rates[:, i]):,.0f} |")


if __name__ == "__main__":
    main()
