"""Embedding throughput: :func:`mixgf.embed.embed_cells` vs the plain padded forward loop a user would write.

Not a test (pytest does not collect ``bench_*.py``). Run from the repository root, e.g.::

    python tests/benchmarks/bench_embed.py --cells 2000 --max-len 256 --rounds 5 --threads 1   # CPU, a minute
    python tests/benchmarks/bench_embed.py --cells 2000 --max-len 256 --rounds 5 --threads 1 --layer -1
    python tests/benchmarks/bench_embed.py --cells 2000 --max-len 256 --rounds 3 --threads 2 --layer -1 --masked-lm
    python tests/benchmarks/bench_embed.py --cells 50000 --preset paper --max-len 2048          # a GPU
    python tests/benchmarks/bench_embed.py --tokens data/finetune/human_Immune --vocab data/vocab.tsv

Every row embeds the same cells with the same model (a ``BertForMaskedLM`` checkpoint of the ``--preset`` size on
the 82,606-gene vocabulary, as in bench_finetune.py), batch ``--batch-size``, and takes the same embedding: the mean
over a cell's genes of ``hidden_states[num_hidden_layers + layer]`` (``--layer``, Geneformer's ``emb_layer``: 0, the
last layer, by default as in ``mixgf embed``; -1, the one before, is Geneformer's default). The plain loops take the
cells in dataset order, ``--batch-size`` at a time, pad each batch to its longest cell with
``torch.nn.utils.rnn.pad_sequence`` (``<pad>``, attention mask 0: what ``DataCollatorWithPadding`` does, and
Geneformer's ``EmbExtractor``), run the model under ``torch.no_grad()`` with ``output_hidden_states=True`` and
average the chosen layer over the unmasked positions. The loop runs ``BertModel``; with ``--masked-lm`` also
``BertForMaskedLM``, how a pretrained checkpoint is loaded (Geneformer's ``EmbExtractor`` too), which computes the
82,606-way MLM logits of every position as well (about 5 GB a batch of 64 x 256: minutes on a CPU). Each row's time
is the whole job, model load included, the best of ``rounds`` interleaved runs, with mixgf's rate over each row's
(of the best rates, and per round: median and range over rounds); the last column is the largest
absolute difference from mixgf's embeddings (the plain loops run in float32; on a GPU mixgf runs in bf16 autocast,
its default, so expect ~1e-2 there).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_finetune import add_cell_arguments, benchmark_cells, checkpoint, ratio_table
from torch.nn.utils.rnn import pad_sequence
from transformers import BertForMaskedLM, BertModel

from mixgf.embed import embed_cells
from mixgf.pooling import mean_pool
from mixgf.vocab import GeneVocab


def run_mixgf(model_dir: Path, dataset, meta, layer: int, batch_size: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return embed_cells(model_dir, dataset, meta, layer=layer, batch_size=batch_size)


def run_plain(model_dir: Path, dataset, layer: int, batch_size: int, model_class) -> np.ndarray:
    """The loop of the docstring: dataset order, each batch padded to its longest cell, every hidden state."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_class.from_pretrained(model_dir).to(device).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            cells = [torch.tensor(ids) for ids in dataset[start : start + batch_size]["input_ids"]]
            input_ids = pad_sequence(cells, batch_first=True, padding_value=GeneVocab.pad_id).to(device)
            mask = (input_ids != GeneVocab.pad_id).long()
            hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
            out.append(mean_pool(hidden[model.config.num_hidden_layers + layer], mask).cpu().numpy())
    return np.concatenate(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layer", type=int, default=0, help="0: the last layer (mixgf embed), -1: the one before")
    parser.add_argument("--batch-size", type=int, default=64)
    add_cell_arguments(parser, label=False)
    parser.add_argument("--masked-lm", action="store_true", help="add the BertForMaskedLM loop (slow)")
    args = parser.parse_args(argv)
    vocab, dataset, meta = benchmark_cells(args)
    lengths = np.asarray(dataset["length"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"{len(dataset)} cells ({args.tokens or 'synthetic'}), length median {np.median(lengths):.0f}, mean "
          f"{lengths.mean():.0f}, max_len {meta['max_len']}; {args.preset} model, vocab {len(vocab)}; layer "
          f"{args.layer}, batch {args.batch_size}; {args.rounds} rounds; {device}\n")

    rows = [("mixgf embed_cells (longest first, layers up to --layer)", None),
            ("plain loop, BertModel, dataset order, padded per batch", BertModel)]
    if args.masked_lm:
        rows.append(("plain loop, BertForMaskedLM, dataset order, padded per batch", BertForMaskedLM))
    rates, embeddings = np.zeros((args.rounds, len(rows))), [None] * len(rows)  # cells/s of the whole job
    with tempfile.TemporaryDirectory() as root:
        model_dir = checkpoint(Path(root) / "model", meta, args.preset, vocab)
        for r in range(args.rounds):
            for i, (_, model_class) in enumerate(rows):
                start = time.perf_counter()
                if model_class is None:
                    embeddings[i] = run_mixgf(model_dir, dataset, meta, args.layer, args.batch_size)
                else:
                    embeddings[i] = run_plain(model_dir, dataset, args.layer, args.batch_size, model_class)
                rates[r, i] = len(dataset) / (time.perf_counter() - start)
    differences = [f"{np.abs(e - embeddings[0]).max():.1e}" for e in embeddings]
    print(ratio_table([name for name, _ in rows], rates, differences))


if __name__ == "__main__":
    main()
