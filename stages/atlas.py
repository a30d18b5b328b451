"""Stage atlas: the cells of the study, in raw counts, split by use.

Writes <out>/<species>_finetune.h5ad (the organs of Tables 1-2; obs organ, cell_type, disease) and
<out>/<species>_perturb.h5ad (heart cells; obs disease = disease / normal), and for the demo also
<out>/<species>_pretrain.h5ad and <out>/drivers.tsv (the planted heart-disease genes).
demo: the embedded atlas; each organ's cells are split at random (seeded) into pretraining cells and the rest, so
no cell is both pretrained on and used downstream. paper: the real files under inputs.organs and inputs.heart
(the published pretraining corpora are tokenized already; stage corpus reads them).
"""

import argparse
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from common import load_params, require_inputs

from mixgf.demo import ORGANS, heart_disease_drivers, simulate_atlas
from mixgf.io import atomic_dir


def demo_atlas(p: dict, out: Path) -> None:
    settings = dict(seed=p["seed"], n_genes=p["n_genes"], cells_per_organ=p["cells_per_organ"],
                    heart_cells=p["heart_cells"])
    rng = np.random.default_rng(p["seed"])
    for species, adata in simulate_atlas(**settings).items():
        pretrain = np.zeros(adata.n_obs, dtype=bool)
        for cells in adata.obs.groupby("organ", observed=True).indices.values():
            pretrain[rng.permutation(cells)[: int(round(p["pretrain_fraction"] * len(cells)))]] = True
        heart = (adata.obs["organ"] == "Heart").to_numpy()
        for split, mask in (("pretrain", pretrain), ("finetune", ~pretrain), ("perturb", ~pretrain & heart)):
            adata[mask].copy().write_h5ad(out / f"{species}_{split}.h5ad")
            print(f"{species} {split}: {mask.sum():,} cells")
    heart_disease_drivers(**settings).to_csv(out / "drivers.tsv", sep="\t", index=False)


def paper_atlas(organs: Path, heart: Path, out: Path) -> None:
    files = {species: {o: organs / f"{species}_{o}.h5ad" for o in ORGANS[species]} for species in ORGANS}
    hearts = {species: heart / f"{species}_heart.h5ad" for species in ORGANS}
    missing = [str(f) for group in files.values() for f in group.values() if not f.exists()]
    missing += [str(f) for f in hearts.values() if not f.exists()]
    if missing:
        sys.exit("stage atlas: the paper profile needs these raw-count files (obs 'cell_type'; heart files also obs "
                 "'disease' = disease / normal), which are missing:\n  " + "\n  ".join(missing))
    for species in ORGANS:
        parts = {o: _cells(f, organ=o, needs="cell_type") for o, f in files[species].items()}
        ad.concat(parts, join="outer", merge="first", index_unique=":").write_h5ad(out / f"{species}_finetune.h5ad")
        _cells(hearts[species], organ="Heart", needs="disease").write_h5ad(out / f"{species}_perturb.h5ad")


def _cells(path: Path, *, organ: str, needs: str) -> ad.AnnData:
    adata = ad.read_h5ad(path)
    if needs not in adata.obs.columns:
        sys.exit(f"stage atlas: {path} has no obs column '{needs}'; columns are {', '.join(adata.obs.columns)}")
    if needs == "disease" and "normal" not in set(adata.obs["disease"].astype(str)):
        sys.exit(f"stage atlas: {path}: obs 'disease' must label the goal state 'normal'")
    obs = {"organ": organ, "cell_type": adata.obs.get("cell_type", pd.Series("", index=adata.obs_names)).astype(str),
           "disease": adata.obs.get("disease", pd.Series("normal", index=adata.obs_names)).astype(str)}
    if "n_counts" in adata.obs.columns:
        obs["n_counts"] = adata.obs["n_counts"]
    adata.obs = pd.DataFrame(obs, index=adata.obs_names)
    return adata


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    args = parser.parse_args(argv)
    params = load_params()
    paths = require_inputs(params, "organs", "heart") if params["profile"] == "paper" else None
    with atomic_dir(args.out) as tmp:
        if paths:
            paper_atlas(paths["organs"], paths["heart"], tmp)
        else:
            demo_atlas(params["atlas"], tmp)


if __name__ == "__main__":
    main()
