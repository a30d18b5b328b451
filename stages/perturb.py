"""Stage perturb: one in silico perturbation experiment of the paper (SPEC §7, Table 3, Figure 4).

Heart disease cells are perturbed gene by gene (every gene of ``perturb.max_cells`` sampled disease cells), with a
disease-vs-normal classifier, toward the mean embedding of the normal cells: per (cell, gene) the cosine shift and
per gene its mean, Wilcoxon p-value and FDR (mixgf.perturb). On the demo atlas the disease drivers are planted
(data/atlas/drivers.tsv), so the ranking is scored: recall@20 / recall@50 of the drivers a perturbation of this mode
should find (delete: the genes disease raises; overexpress: the genes it lowers), each driver's rank and their median rank beside
the (n_genes + 1) / 2 a blind ranking would give. For
Figure 4 the embeddings of the perturbed cells before and after their top gene's perturbation, and of the goal
cells, go to <out>/embeddings.npz.
"""

import argparse
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from common import load_params

from mixgf.embed import embed_cells
from mixgf.io import atomic_dir, write_json_atomic, write_text_atomic
from mixgf.perturb import gene_stats, perturb_to_goal
from mixgf.tokens import load_tokens
from mixgf.vocab import GeneVocab, symbol_map

WANTED = {"delete": "up", "overexpress": "down"}  # the drivers whose perturbation moves disease toward normal


def driver_scores(stats: pd.DataFrame, drivers: pd.DataFrame, ks=(20, 50)) -> dict:
    """Recall@k of ``drivers`` (ensembl_id) among the genes of ``stats`` ranked by mean shift, the same among the
    genes significant at FDR < 0.05, and each driver's 1-based rank (None: never perturbed, absent from the cells)."""
    rank = {g: i + 1 for i, g in enumerate(stats["ensembl_id"])}
    significant = stats.loc[stats["fdr"] < 0.05, "ensembl_id"].tolist()
    ids = drivers["ensembl_id"].tolist()
    out = {"n_drivers": len(ids), "n_perturbed": sum(g in rank for g in ids)}
    for k in ks:
        out[f"recall_at_{k}"] = sum(rank.get(g, k + 1) <= k for g in ids) / len(ids) if ids else None
        out[f"recall_at_{k}_significant"] = len(set(significant[:k]) & set(ids)) / len(ids) if ids else None
    ranks = [rank[g] for g in ids if g in rank]
    out["median_rank"] = float(np.median(ranks)) if ranks else None
    out["median_rank_if_random"] = (len(stats) + 1) / 2  # what a ranking blind to the drivers gives
    out["ranks"] = {s: rank.get(g) for s, g in zip(drivers["symbol"], ids)}
    return out


def perturbed(cells: list[np.ndarray], gene: int, mode: str, limit: int) -> list[np.ndarray]:
    """The cells with ``gene`` deleted, or moved (inserted) to the front and cut to ``limit``."""
    if mode == "delete":
        return [c[c != gene] for c in cells]
    return [np.concatenate([[gene], c[c != gene]])[:limit] for c in cells]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--classifier", required=True)
    parser.add_argument("--tokens", required=True, help="heart cells with obs disease = disease / normal")
    parser.add_argument("--mode", required=True, choices=sorted(WANTED))
    parser.add_argument("--drivers", required=True, type=Path, help="drivers.tsv (demo); skipped if missing")
    parser.add_argument("--shifts", required=True, help="per (cell, gene) shifts, parquet")
    parser.add_argument("--out", required=True, type=Path, help="folder: stats.csv, embeddings.npz")
    parser.add_argument("--metrics", required=True)
    args = parser.parse_args(argv)
    p = load_params()["perturb"]
    dataset, meta = load_tokens(args.tokens)
    (species,) = set(dataset["species"])
    shifts = perturb_to_goal(args.classifier, dataset, meta, state_key="disease", start="disease", goal="normal",
                             mode=args.mode, emb_layer=p["emb_layer"], max_cells=p["max_cells"],
                             batch_size=p["batch_size"], source=args.tokens)
    symbols = {e: s for s, e in symbol_map(species).items()}
    stats = gene_stats(shifts, symbols=symbols, alternative=p["alternative"])
    metrics = {"species": species, "mode": args.mode, "n_cells": int(shifts["cell_index"].nunique()),
               "n_perturbations": len(shifts), "n_genes": len(stats),
               "n_significant": int((stats["fdr"] < 0.05).sum()), "mean_shift": float(shifts["cosine_shift"].mean()),
               "top_gene": stats["symbol"].iloc[0] or stats["ensembl_id"].iloc[0]}
    if args.drivers.exists():
        drivers = pd.read_csv(args.drivers, sep="\t")
        drivers = drivers[(drivers["species"] == species) & (drivers["direction"] == WANTED[args.mode])]
        metrics["drivers"] = driver_scores(stats, drivers)
        stats["is_driver"] = stats["ensembl_id"].isin(drivers["ensembl_id"])
    else:
        metrics["drivers"] = "no planted drivers (real data): recall not computed"

    vocab = GeneVocab.read(Path(args.classifier) / "vocab.tsv")
    states = np.asarray(dataset["disease"]).astype(str)
    start = np.unique(shifts["cell_index"].to_numpy())
    goal = np.flatnonzero(states == "normal")
    ids = [np.asarray(c, np.int64) for c in dataset.select(start)["input_ids"]]
    top = vocab.ids([stats["ensembl_id"].iloc[0]])[0]
    after = perturbed(ids, top, args.mode, meta["max_len"])
    after_cells = datasets.Dataset.from_dict({"input_ids": after, "length": [len(c) for c in after]})
    embed = dict(dtype="float32", source=args.tokens)
    with atomic_dir(args.out) as out:
        write_text_atomic(out / "stats.csv", stats.to_csv(index=False))
        np.savez_compressed(out / "embeddings.npz", before=embed_cells(args.classifier, dataset.select(start), meta, **embed),
                            after=embed_cells(args.classifier, after_cells, meta, **embed),
                            goal=embed_cells(args.classifier, dataset.select(goal), meta, **embed),
                            top_gene=np.array(metrics["top_gene"]))
    Path(args.shifts).parent.mkdir(parents=True, exist_ok=True)
    shifts.to_parquet(args.shifts, index=False)
    write_json_atomic(args.metrics, metrics)
    d = metrics["drivers"]
    print(f"{args.tokens}, {args.mode}: {metrics['n_perturbations']:,} perturbations of {metrics['n_cells']} cells, "
          f"{metrics['n_significant']} genes at FDR < 0.05, top {metrics['top_gene']}"
          + (f"; driver recall@20 {d['recall_at_20']:.2f}, @50 {d['recall_at_50']:.2f}" if isinstance(d, dict) else ""))


if __name__ == "__main__":
    main()
