"""Stage cross_species: Figure 2 and the numbers behind it (SPEC §6).

For each direction (mouse spleen -> human spleen and the reverse) and each pretrained model: the classifier
fine-tuned on the source species' spleen predicts every target-species spleen cell (cross-species accuracy, labels
matched through a cell-type correspondence: identity for the demo atlas, where homologous types share names; a CSV
with columns source, target for real data); both species' cells are embedded with that classifier (mean of its last
layer, written for the UMAPs of Figure 2); and k-NN label transfer from the source's training cells in that embedding
space scores how well the species' cells mix. Beside them, model-free: a logistic regression trained on the source's
one-to-one-ortholog expression and tested on the target's. Target cells whose type has no counterpart among the
source classifier's classes are left out of every accuracy, and counted.
"""

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from common import ROOT, load_params

from mixgf.baseline import counterparts, knn_transfer, ortholog_transfer
from mixgf.classify import SPLIT_FILE, predict
from mixgf.embed import embed_cells
from mixgf.io import atomic_dir, read_json, write_json_atomic
from mixgf.stats import bootstrap_ci
from mixgf.tokens import load_tokens

MODELS = ("mixgf", "geneformer", "mouse_geneformer")
DIRECTIONS = (("mouse", "human"), ("human", "mouse"))
ORGAN = "Spleen"


def scored(truth: np.ndarray, predicted: np.ndarray, n_boot: int) -> dict:
    """Accuracy with its bootstrap interval over the cells that have a counterpart label (``truth`` not None)."""
    known = np.array([t is not None for t in truth])
    estimate, low, high = bootstrap_ci(truth[known].astype(str), np.asarray(predicted)[known].astype(str),
                                       n_boot=n_boot, seed=0)
    return {"accuracy": estimate, "accuracy_low": low, "accuracy_high": high, "n_cells": int(known.sum()),
            "n_cells_without_counterpart": int((~known).sum())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--finetune", required=True, type=Path, help="token datasets (data/finetune)")
    parser.add_argument("--classifiers", required=True, type=Path, help="fine-tuned models (models/finetune)")
    parser.add_argument("--atlas", required=True, type=Path, help="folder of <species>_finetune.h5ad raw counts")
    parser.add_argument("--embeddings", required=True, help="output folder of <model>_<source>_to_<target>.h5ad")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--label", default="cell_type")
    args = parser.parse_args(argv)
    params = load_params()
    n_boot, k = params["controls"]["n_boot"], params["controls"]["knn_k"]
    correspondence = params["cross_species"]["correspondence"]
    correspondence = None if correspondence is None else pd.read_csv(ROOT / correspondence, dtype=str,
                                                                     keep_default_na=False)
    tokens = {s: load_tokens(args.finetune / f"{s}_{ORGAN}") for s in ("mouse", "human")}
    obs = {s: d.select_columns(["cell_id", args.label]).to_pandas() for s, (d, _) in tokens.items()}
    metrics = {}
    with atomic_dir(args.embeddings) as out:
        for source, target in DIRECTIONS:
            key = f"{source}_to_{target}"
            truth = counterparts(obs[target][args.label].to_numpy(), correspondence, source, target)
            result = {}
            split = None
            for model in MODELS:
                classifier = args.classifiers / f"{source}-{model}" / ORGAN
                split = read_json(classifier / SPLIT_FILE)
                classes = set(split["labels"])
                in_classes = np.array([t if t in classes else None for t in truth], dtype=object)
                predicted = predict(classifier, *tokens[target], source=str(args.finetune / f"{target}_{ORGAN}"))
                emb = {s: embed_cells(classifier, *tokens[s], source=f"{s}_{ORGAN}") for s in (source, target)}
                train = np.asarray(split["train"] + split["val"])
                knn = knn_transfer(emb[source][train], obs[source][args.label].to_numpy()[train], emb[target], k=k)
                result[model] = {"classifier": scored(in_classes, predicted["predicted"].to_numpy(), n_boot),
                                 "knn": scored(in_classes, knn, n_boot)}
                role = np.full(len(obs[source]), "source test", dtype=object)
                role[train] = "source train"
                frame = pd.concat([obs[source].assign(species=source, role=role),
                                   obs[target].assign(species=target, role="target")], ignore_index=True)
                frame.index = frame.index.astype(str)
                cells = ad.AnnData(obs=frame, obsm={"X_mixgf": np.concatenate([emb[source], emb[target]])})
                cells.uns["classifier"] = str(classifier)
                cells.write_h5ad(out / f"{model}_{key}.h5ad")
            atlas = {s: ad.read_h5ad(args.atlas / f"{s}_finetune.h5ad") for s in (source, target)}
            src_cells = obs[source]["cell_id"].to_numpy()[np.asarray(split["train"] + split["val"])]
            transfer = ortholog_transfer(atlas[source][src_cells], atlas[target][obs[target]["cell_id"].to_numpy()],
                                         args.label, C=params["controls"]["logreg_C"], seed=params["seed"])
            in_classes = np.array([t if t in set(split["labels"]) else None for t in truth], dtype=object)
            result["ortholog_logreg"] = {**scored(in_classes, transfer.predicted, n_boot),
                                         "n_orthologs": transfer.n_orthologs}
            metrics[key] = result
            print(f"{key}: " + ", ".join(f"{m} {result[m]['classifier']['accuracy']:.3f} (k-NN "
                                         f"{result[m]['knn']['accuracy']:.3f})" for m in MODELS)
                  + f"; ortholog logistic regression {result['ortholog_logreg']['accuracy']:.3f}")
    write_json_atomic(args.metrics, metrics)


if __name__ == "__main__":
    main()
