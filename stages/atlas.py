"""Stage atlas: the embedded demo atlas, split into pretraining and fine-tuning cells.

Writes <out>/{human,mouse}_{pretrain,finetune}.h5ad (raw counts; obs organ, cell_type, species, disease) and
<out>/drivers.tsv, the planted heart-disease genes. Each organ's cells are split at random (seeded) so that no
cell is both pretrained on and used to evaluate fine-tuning. The paper profile reads real files instead.
"""

import argparse

import numpy as np

from common import load_params

from mixgf.demo import heart_disease_drivers, simulate_atlas
from mixgf.io import atomic_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    args = parser.parse_args(argv)
    params = load_params()
    if params["profile"] == "paper":
        raise SystemExit("stage atlas: the paper profile uses real inputs (params inputs.*), not the demo atlas")
    p = params["atlas"]
    settings = dict(seed=p["seed"], n_genes=p["n_genes"], cells_per_organ=p["cells_per_organ"],
                    heart_cells=p["heart_cells"])
    atlas = simulate_atlas(**settings)
    rng = np.random.default_rng(p["seed"])
    with atomic_dir(args.out) as tmp:
        for species, adata in atlas.items():
            pretrain = np.zeros(adata.n_obs, dtype=bool)
            for cells in adata.obs.groupby("organ", observed=True).indices.values():
                chosen = rng.permutation(cells)[: int(round(p["pretrain_fraction"] * len(cells)))]
                pretrain[chosen] = True
            for split, mask in (("pretrain", pretrain), ("finetune", ~pretrain)):
                adata[mask].copy().write_h5ad(tmp / f"{species}_{split}.h5ad")
                print(f"{species} {split}: {mask.sum():,} cells")
        heart_disease_drivers(**settings).to_csv(tmp / "drivers.tsv", sep="\t", index=False)


if __name__ == "__main__":
    main()
