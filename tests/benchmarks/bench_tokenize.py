"""Tokenizer throughput and peak memory, end to end (read h5ad, encode, write the dataset).

    python tests/benchmarks/bench_tokenize.py --cells 200000 [--workers 2] [--shared ../shared/data]

Cells are 10x-like: each synthetic cell takes the non-zero counts of a real PBMC cell (scconvert pbmc_demo,
raw counts) and repeats them to about 2,000 detected genes, placed on random genes of 20,000 human genes of the
Geneformer V1 vocabulary. The h5ad is written in chunks, so any number of cells fits in memory.
Prints cells/s and the peak resident memory of the largest tokenizing process (a fresh one; workers included).
"""

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from anndata.io import write_elem

from mixgf.vocab import default_medians


def write_cells(path: Path, n_cells: int, shared: Path, *, n_genes=20_000, detected=2_000, seed=0) -> None:
    rng = np.random.default_rng(seed)
    real = ad.read_h5ad(shared / "scconvert" / "pbmc_demo.h5ad").raw.X.tocsr()
    profiles = [real[i].data for i in range(real.shape[0])]
    genes = np.array(default_medians("human").values.index[:n_genes])
    with h5py.File(path, "w") as f:
        write_elem(f, "obs", pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]))
        write_elem(f, "var", pd.DataFrame(index=genes))
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)})
        data = x.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=(1 << 16,))
        indices = x.create_dataset("indices", (0,), np.int32, maxshape=(None,), chunks=(1 << 16,))
        indptr = [0]
        for start in range(0, n_cells, 10_000):
            block_data, block_idx = [], []
            for _ in range(min(10_000, n_cells - start)):
                counts = np.resize(profiles[rng.integers(len(profiles))], rng.integers(1_500, 2_500))
                block_data.append(counts)
                block_idx.append(np.sort(rng.choice(n_genes, len(counts), replace=False)))
                indptr.append(indptr[-1] + len(counts))
            for dset, parts in ((data, block_data), (indices, block_idx)):
                values = np.concatenate(parts)
                dset.resize((dset.shape[0] + len(values),))
                dset[-len(values):] = values
        x.create_dataset("indptr", data=np.array(indptr, dtype=np.int64))


TOKENIZE = """
import sys, time
from mixgf.tokenize import tokenize_files
from mixgf.vocab import default_medians
default_medians("human")
t0 = time.perf_counter()
result = tokenize_files([sys.argv[1]], sys.argv[2], species="human", workers=int(sys.argv[3]), progress=False)
seconds = time.perf_counter() - t0
print(result.n_cells, seconds)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    parser.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: system temp)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(dir=args.tmp))
    try:
        t0 = time.perf_counter()
        write_cells(tmp / "cells.h5ad", args.cells, args.shared)
        size = (tmp / "cells.h5ad").stat().st_size
        print(f"wrote {args.cells:,} cells ({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
        # a fresh process, so its peak memory is the tokenizer's alone (workers included)
        run = subprocess.run([sys.executable, "-c", TOKENIZE, str(tmp / "cells.h5ad"), str(tmp / "tokens"),
                              str(args.workers)], capture_output=True, text=True, check=True)
        n_cells, seconds = run.stdout.split()
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        print(f"tokenized {int(n_cells):,} cells in {float(seconds):.1f} s: {int(n_cells) / float(seconds):,.0f} cells/s, "
              f"workers={args.workers}, peak RSS of the largest process {peak:.2f} GiB")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
