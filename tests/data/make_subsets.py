"""Rebuild tests/data/cellrank/adata_200_counts.h5ad from cellrank's adata_200.h5ad.

    python tests/data/make_subsets.py PATH/TO/adata_200.h5ad

cellrank's ground-truth file (scverse/cellrank @ 721c59fe3bbbad41450a9b0fd5f34eebe683c08b,
tests/_ground_truth_adatas/adata_200.h5ad, 4.1 MB, sha256
8f551647ef02a1e4ac771fdf058f316d4176101e6a5cd986abb58a7952572af4) holds 200 mouse dentate-gyrus cells x 530 genes
with many fitted layers and graphs. The tests read only its log-normalised ``X``, its integer ``ambiguous`` count
layer, ``obs['clusters']``, ``obs['n_counts']`` (the tokenizer's library size when present) and the gene symbols of
the index, so the subset keeps exactly these, every cell and every gene, values unchanged.
"""

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

OUT = Path(__file__).resolve().parent / "cellrank" / "adata_200_counts.h5ad"


def subset(source: Path, out: Path = OUT) -> ad.AnnData:
    full = ad.read_h5ad(source)
    small = ad.AnnData(full.X.copy(), obs=full.obs[["clusters", "n_counts"]].copy(),
                       var=pd.DataFrame(index=full.var_names.copy()),
                       layers={"ambiguous": full.layers["ambiguous"].copy()})
    assert (small.X != full.X).nnz == 0 and (small.layers["ambiguous"] != full.layers["ambiguous"]).nnz == 0
    assert np.array_equal(small.layers["ambiguous"].data, np.rint(small.layers["ambiguous"].data))
    out.parent.mkdir(parents=True, exist_ok=True)
    small.write_h5ad(out, compression="gzip")
    return small


if __name__ == "__main__":
    print(subset(Path(sys.argv[1])))
