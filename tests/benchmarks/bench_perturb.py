"""Perturbations/s of `mixgf perturb` (the whole command, model load included) against a plain per-cell, per-gene
loop on the same model and cells, with an agreement check.

    python tests/benchmarks/bench_perturb.py --data ../shared/data/scconvert/pbmc_demo.h5ad --counts raw

The model has Geneformer V1's shape at its smallest (issue 10): BertForMaskedLM, vocabulary 25,426, 2 layers,
64 wide, 2 heads, intermediate 128, relu, torch.manual_seed(0); or --model a folder. The cells are the first
--cells cells of --data (raw counts), tokenized with Geneformer V1's vocabulary and medians. The reference loop
runs one forward pass per perturbation, as Geneformer does, on the first --ref-cells cells (its rate is per
perturbation, so a subset measures it); the agreement is checked on those cells.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, BertModel

from mixgf.tokenize import tokenize_files
from mixgf.tokens import load_tokens
from mixgf.vocab import load_medians, load_vocab


def reference(model_dir, cells, mode: str) -> list[float]:
    """One forward pass per (cell, gene), straight from BertModel; Geneformer's cos_sim at emb_layer 0."""
    bert = BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    out = []
    with torch.no_grad():
        for ids in cells:
            h = bert(torch.tensor([ids])).last_hidden_state[0]
            for i in range(1 if mode == "overexpress" else 0, len(ids)):
                rest = ids[:i] + ids[i + 1 :]
                hp = bert(torch.tensor([rest if mode == "delete" else [ids[i]] + rest])).last_hidden_state[0]
                hp = hp if mode == "delete" else hp[1:]
                out.append(F.cosine_similarity(hp, torch.cat([h[:i], h[i + 1 :]]), dim=-1, eps=1e-8).mean().item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help=".h5ad of raw human counts (gene symbols or Ensembl ids)")
    parser.add_argument("--counts", default="X", help="count matrix: X, raw or a layer")
    parser.add_argument("--model", help="model folder (default: a fresh 2 x 64 model of Geneformer V1's shape)")
    parser.add_argument("--cells", type=int, default=50)
    parser.add_argument("--ref-cells", type=int, default=10)
    parser.add_argument("--mode", default="delete", choices=["delete", "overexpress"])
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adata = ad.read_h5ad(args.data)[: args.cells].copy()
        adata.write_h5ad(tmp / "cells.h5ad")
        tokenize_files([tmp / "cells.h5ad"], tmp / "tokens", species="human", vocab=load_vocab("geneformer-v1"),
                       medians=load_medians("human"), counts=args.counts, progress=False)
        model = args.model
        if model is None:
            torch.manual_seed(0)
            BertForMaskedLM(BertConfig(vocab_size=25_426, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=128, max_position_embeddings=2048, hidden_act="relu",
                                       pad_token_id=0)).save_pretrained(tmp / "model")
            model = tmp / "model"
        dataset, _ = load_tokens(tmp / "tokens")
        cells = [list(map(int, ids)) for ids in dataset["input_ids"]]
        lengths = np.array([len(c) for c in cells])

        command = ["mixgf", "perturb", str(model), str(tmp / "tokens"), "--mode", args.mode, "--out",
                   str(tmp / "isp.parquet"), "--vocab", "geneformer-v1", "--batch-size", str(args.batch_size)]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        fast_s = time.perf_counter() - start
        fast = pd.read_parquet(tmp / "isp.parquet")

        start = time.perf_counter()
        expected = reference(model, cells[: args.ref_cells], args.mode)
        ref_s = time.perf_counter() - start
    got = fast[fast.cell_index < args.ref_cells].cos_sim.to_numpy()
    error = float(np.abs(got - np.array(expected)).max())

    print(f"{len(cells)} cells of {lengths.min()}-{lengths.max()} genes, {args.mode}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'':34} {'perturbations':>13} {'seconds':>8} {'per s':>8}")
    print(f"{'mixgf perturb (whole command)':34} {len(fast):>13,} {fast_s:>8.1f} {len(fast) / fast_s:>8.0f}")
    print(f"{'reference loop (first %d cells)' % args.ref_cells:34} {len(expected):>13,} {ref_s:>8.1f} "
          f"{len(expected) / ref_s:>8.0f}")
    print(f"speed-up {len(fast) / fast_s / (len(expected) / ref_s):.1f}x; max |cos_sim difference| {error:.1e}")
    if error > 1e-5:
        sys.exit("mixgf perturb disagrees with the reference loop")


if __name__ == "__main__":
    main()
