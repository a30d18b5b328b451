"""Throughput and peak memory of the streaming gene-median computation on synthetic 10x-like cells.

Run from the repository root: python tests/benchmarks/bench_medians.py [--cells 200000] [--chunk 10000] [--passes 2]
Not collected by pytest (no test_ prefix). Two chunks are generated and fed in turn, so the data held in memory
stays small and the peak memory is mostly the accumulator's.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import scipy.sparse as sp

from mixgf.medians import MedianAccumulator

POOL = 2  # distinct chunks generated; each is far larger than the CPU caches, so reusing them does not flatter speed


def synthetic_chunk(rng: np.random.Generator, cells: int, genes: int, detected: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """10x-like UMI counts: gene g is detected with probability exp(-g / detected), so about
    ``detected`` genes per cell (the first always), with counts 1 + Poisson(3 * that probability)."""
    p = np.exp(-np.arange(genes) / detected)
    blocks = []
    for start in range(0, cells, 500):
        rows, columns = np.nonzero(rng.random((min(500, cells - start), genes), dtype=np.float32) < p)
        data = 1 + rng.poisson(3 * p[columns]).astype(np.float32)
        blocks.append(sp.csr_matrix((data, (rows, columns)), shape=(min(500, cells - start), genes)))
    counts = sp.vstack(blocks, format="csr")
    return counts, np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--detected", type=int, default=2_000)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    gene_ids = [f"ENSG{i:011d}" for i in range(args.genes)]
    pool = [synthetic_chunk(rng, args.chunk, args.genes, args.detected) for _ in range(POOL)]
    n_chunks = args.cells // args.chunk
    nnz = sum(pool[i % POOL][0].nnz for i in range(n_chunks))
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{n_chunks} chunks of {args.chunk:,} cells x {args.genes:,} genes, {nnz / (n_chunks * args.chunk):,.0f} "
          f"non-zeros per cell")

    acc = MedianAccumulator()
    for done in range(args.passes):
        if done:
            acc = acc.refine()
        start = time.perf_counter()
        for i in range(n_chunks):
            acc.update(*pool[i % POOL], gene_ids)
        seconds = time.perf_counter() - start
        print(f"pass {done + 1}: {nnz / seconds / 1e6:.1f} M non-zeros/s, {n_chunks * args.chunk / seconds:,.0f} cells/s "
              f"({nnz:,} non-zeros in {seconds:.2f} s); accumulator {acc.nbytes / 2**20:.0f} MiB")
    start = time.perf_counter()
    medians = acc.result()
    print(f"result: {len(medians.values):,} genes in {time.perf_counter() - start:.2f} s, "
          f"relative error <= {acc.error_bound:.1e}")
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss_peak:,.0f} MiB ({rss_data:,.0f} MiB before the first update: interpreter and {POOL} chunks)")


if __name__ == "__main__":
    main()
