"""Pretraining throughput: length grouping + dynamic padding vs fixed padding, and the cost of SimCSE's second pass.

Not a test (pytest does not collect ``bench_*.py``). Run from the repository root, e.g.::

    python tests/benchmarks/bench_pretrain.py --cells 2000 --steps 20 --rounds 3 --max-len 256
    python tests/benchmarks/bench_pretrain.py --corpus data/corpus/mix --fixed-len 2048   # the demo corpus
    python tests/benchmarks/bench_pretrain.py --corpus data/corpus/mix --num-workers 1    # batches built in a worker

Each row trains a model of the ``--preset`` size (demo: 2 x 64) on the full ~82.6k-gene vocabulary with
:func:`mixgf.pretrain.pretrain` and reports non-pad tokens per second over the second half of the run, the best of
``rounds`` interleaved runs (on a shared machine the best is the least disturbed). Cell lengths follow a log-normal
with its median at 45% of ``max_len``, cut to [5%, 100%] of it, so about a tenth of the cells sit at the cap, as in
Genecorpus-30M where many cells keep all 2,048 genes; absolute numbers depend on the machine, the ratios are the point.
A second table times one training step with MLM logits at the masked positions only vs at every position.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from mixgf.collate import MLMCollator
from mixgf.model import IGNORE_INDEX, PRESETS, MixGFForPretraining
from mixgf.pretrain import PretrainConfig, pretrain
from mixgf.tokens import load_tokens
from mixgf.vocab import default_vocab


def synthetic_corpus(n_cells: int, max_len: int, vocab_size: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(0.45 * max_len), 0.6, n_cells), 0.05 * max_len, max_len).astype(int)
    cells = [rng.choice(np.arange(2, vocab_size), size=n, replace=False).astype(np.int32) for n in lengths]
    return datasets.Dataset.from_dict({"input_ids": cells, "length": lengths, "species": ["human"] * n_cells})


def tokens_per_s(dataset, meta, vocab, preset: str, *, steps: int, batch_size: int, grouped: bool, fixed_padding: bool,
                 simcse: bool, fixed_len: int, num_workers: int) -> float:
    torch.manual_seed(0)
    model = MixGFForPretraining(PRESETS[preset](meta, simcse_weight=1.0 if simcse else 0.0,
                                                max_position_embeddings=max(fixed_len, meta["max_len"])))
    cfg = PretrainConfig(
        lr=1e-3, warmup_steps=steps // 4, batch_size=batch_size, max_steps=steps, log_every=steps // 2, save_every=steps,
        megabatch=50 if grouped else 1,  # one batch per mega-batch = plain random batches
        pad_to_multiple_of=fixed_len if fixed_padding else 8,  # rounding up to fixed_len = fixed padding
        num_workers=num_workers,
    )
    with tempfile.TemporaryDirectory() as out_dir:
        result = pretrain(model, dataset, meta, cfg, out_dir, vocab=vocab, resume=False)
    return result.metrics["tokens_per_s"]


def step_seconds(model, batch, *, full_logits: bool, repeats: int = 5) -> float:
    """Fastest of ``repeats`` forward + backward passes of the MLM loss, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if full_logits:
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        else:
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing shared cores)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="model size (paper: 6 x 256)")
    parser.add_argument("--corpus", help="a token dataset (e.g. data/corpus/mix) instead of synthetic cells")
    parser.add_argument("--fixed-len", type=int, help="length of fixed padding (default: max_len; the paper: 2048)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader processes building the batches")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    vocab = default_vocab()
    if args.corpus:
        corpus, meta = load_tokens(args.corpus)
        dataset = corpus.select(range(min(args.cells, len(corpus)))).select_columns(["input_ids", "length", "species"])
    else:
        meta = {"vocab": vocab.identity(), "medians": None, "max_len": args.max_len}
        dataset = synthetic_corpus(args.cells, args.max_len, len(vocab))
    fixed_len = args.fixed_len or meta["max_len"]
    lengths = np.asarray(dataset["length"])
    print(f"{len(dataset)} cells ({args.corpus or 'synthetic'}), length median {np.median(lengths):.0f}, mean "
          f"{lengths.mean():.0f}, {(lengths == meta['max_len']).mean():.0%} at max_len {meta['max_len']}; fixed padding "
          f"to {fixed_len}; batch {args.batch_size}; "
          f"{args.steps} steps x {args.rounds} rounds; {args.preset} model; vocab {len(vocab)}; "
          f"torch threads {torch.get_num_threads()}; DataLoader workers {args.num_workers}\n")

    rows = [
        (f"fixed padding to {fixed_len}, random batches", False, True, False),
        ("dynamic padding, random batches", False, False, False),
        ("dynamic padding, length-grouped", True, False, False),
        (f"fixed padding to {fixed_len}, random batches + SimCSE", False, True, True),
        ("dynamic padding, length-grouped + SimCSE", True, False, True),
    ]
    best = np.zeros(len(rows))
    for _ in range(args.rounds):
        for i, (_, grouped, fixed_padding, simcse) in enumerate(rows):
            best[i] = max(best[i], tokens_per_s(dataset, meta, vocab, args.preset, steps=args.steps,
                                                batch_size=args.batch_size, grouped=grouped,
                                                fixed_padding=fixed_padding, simcse=simcse, fixed_len=fixed_len,
                                                num_workers=args.num_workers))
    print("| batches | real tokens/s | vs fixed padding |\n|---|---:|---:|")
    for (name, *_), value in zip(rows, best):
        print(f"| {name} | {value:,.0f} | {value / best[0]:.2f}x |")
    print(f"\nSimCSE's second pass (length-grouped): a step costs {best[2] / best[4]:.2f}x the time of MLM alone\n")

    torch.manual_seed(0)
    model = MixGFForPretraining(PRESETS[args.preset](meta, simcse_weight=0.0)).train()
    cells = dataset.select(range(args.batch_size)).with_format("torch")["input_ids"]
    batch = MLMCollator.for_vocab(vocab, ["human"])(list(cells), [0] * len(cells), range(len(cells)))
    masked, full = step_seconds(model, batch, full_logits=False), step_seconds(model, batch, full_logits=True)
    print("| MLM logits | s per forward + backward |\n|---|---:|")
    print(f"| masked positions only | {masked:.3f} |\n| every position | {full:.3f} ({full / masked:.1f}x) |")


if __name__ == "__main__":
    main()
