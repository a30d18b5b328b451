import pickle
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from mixgf.medians import MAX_PASSES, MedianAccumulator, compute_medians, error_bound
from mixgf.vocab import default_vocab

GENES = pd.Index(default_vocab().tokens[2:302])  # 300 real ENSG ids


def negative_binomial_chunks(seed: int = 0, n_chunks: int = 4, cells: int = 600) -> list[tuple]:
    """UMI-like chunks, each holding its own shuffled subset of GENES; n_counts also counts genes outside the chunk."""
    rng = np.random.default_rng(seed)
    mean = rng.lognormal(-1.5, 1.8, len(GENES))
    mean[:5] = 1e-3  # a few genes seen in very few cells
    chunks = []
    for _ in range(n_chunks):
        size = rng.lognormal(0, 0.5, (cells, 1))
        full = rng.negative_binomial(2, 2 / (2 + mean * size))
        columns = rng.permutation(len(GENES))[: rng.integers(180, 260)]
        n_counts = full.sum(axis=1) + rng.integers(1, 5_000, cells)
        counts = sp.csr_matrix(full[:, columns].astype(rng.choice([np.int32, np.float32, np.float64])))
        chunks.append((counts, n_counts.astype(np.float64), GENES[columns]))
    return chunks


def exact_medians(chunks) -> pd.Series:
    """np.median of count / n_counts * 10,000 over the non-zero counts of each gene."""
    frames = []
    for counts, n_counts, gene_ids in chunks:
        coo = sp.coo_matrix(counts)
        frames.append(pd.DataFrame({"gene": np.asarray(gene_ids)[coo.col], "value": coo.data / n_counts[coo.row] * 1e4}))
    frame = pd.concat(frames)
    return frame[frame.value > 0].groupby("gene").value.median().sort_index()


def assert_within_bound(medians: pd.Series, exact: pd.Series, bound: float) -> None:
    assert medians.index.equals(exact.index)
    error = (medians / exact - 1).abs()
    assert error.max() <= bound * (1 + 1e-9), f"relative error {error.max():.3g} above the bound {bound:.3g}"


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_matches_exact_medians_within_bound(passes):
    chunks = negative_binomial_chunks()
    exact = exact_medians(chunks)
    medians = compute_medians(lambda: chunks, passes=passes, name="test")
    assert medians.name == "test" and len(exact) > 250
    assert_within_bound(medians.values, exact, error_bound(passes))


def test_even_count_averages_the_two_middle_values():
    counts = sp.csr_matrix(np.array([[1], [2], [50], [100], [0]]))
    medians = compute_medians(lambda: [(counts, np.full(5, 1e4), GENES[:1])], passes=3).values
    assert abs(medians.iloc[0] / 26 - 1) <= error_bound(3)


def test_error_bounds_as_documented():
    assert [f"{error_bound(p):.1e}" for p in (1, 2, 3)] == ["3.1e-02", "1.2e-04", "4.8e-07"]


def test_min_cells_drops_rare_genes():
    chunks = negative_binomial_chunks()
    exact = exact_medians(chunks)
    cells_seen = pd.concat([pd.Series(np.diff(sp.csc_matrix(c).indptr), index=g) for c, _, g in chunks]).groupby(level=0).sum()
    medians = compute_medians(lambda: chunks, min_cells=10)
    assert set(medians.values.index) == set(cells_seen.index[cells_seen >= 10]) and len(medians.values) < len(exact)


def test_merge_equals_one_accumulator_over_every_pass():
    chunks = negative_binomial_chunks()
    single, left, right = MedianAccumulator(), MedianAccumulator(), MedianAccumulator()
    for done in range(3):
        if done:
            single, left = single.refine(), left.refine()
            right = pickle.loads(pickle.dumps(left))  # what a worker process receives
        for chunk in chunks:
            single.update(*chunk)
        for chunk in chunks[::-1][:1]:
            left.update(*chunk)
        for chunk in chunks[::-1][1:]:
            right.update(*chunk)
        left.merge(right)
        assert left.result().hash == single.result().hash
        pd.testing.assert_series_equal(left.result().values, single.result().values)


def test_explicit_zeros_and_duplicate_entries():
    counts, n_counts, gene_ids = negative_binomial_chunks(n_chunks=1)[0]
    expected = compute_medians(lambda: [(counts, n_counts, gene_ids)]).values
    coo = sp.coo_matrix(counts)
    half = np.floor(coo.data / 2)  # each count split into two entries of the same cell and gene, plus stored zeros
    rows, data = np.r_[coo.row, coo.row, coo.row[:50]], np.r_[half, coo.data - half, np.zeros(50)]
    order = np.argsort(rows, kind="stable")
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=counts.shape[0]))]
    split = sp.csr_matrix((data[order], np.r_[coo.col, coo.col, coo.col[:50]][order], indptr), shape=counts.shape)
    assert not split.has_canonical_format
    pd.testing.assert_series_equal(compute_medians(lambda: [(split, n_counts, gene_ids)]).values, expected)


def sparse_chunk(cells: int = 4000, density: float = 0.05, seed: int = 0) -> tuple:
    """A chunk of sparse counts over GENES (a 10x-like 5% of entries non-zero)."""
    rng = np.random.default_rng(seed)
    counts = sp.random(cells, len(GENES), density=density, format="csr", random_state=rng,
                       data_rvs=lambda n: rng.integers(1, 50, n)).astype(np.float32)
    n_counts = np.asarray(counts.sum(axis=1)).ravel() + rng.integers(1, 5_000, cells)
    return counts, n_counts.astype(np.float64), GENES


def peak_memory(fn) -> int:
    """Peak bytes allocated while ``fn`` runs (tracemalloc traces numpy's buffers), beyond what was live before."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_is_set_by_genes_and_one_chunk_not_by_cells():
    """Two passes over 8,000 and 32,000 cells: the same peak, inside the documented budget (accumulator twice, while
    result / refine runs, plus 36 bytes per non-zero of a chunk), and far below one dense chunk."""
    chunk = sparse_chunk()
    counts, _, genes = chunk
    peaks = {n: peak_memory(lambda: compute_medians(lambda: [chunk] * n, passes=2)) for n in (2, 8)}
    budget = 2 * 4352 * len(genes) + 36 * counts.nnz
    assert budget < counts.shape[0] * counts.shape[1] * 8 / 2  # densifying a chunk would not fit
    assert peaks[8] <= budget, f"peak {peaks[8]:,} bytes above the documented {budget:,}"
    assert peaks[8] <= 1.05 * peaks[2], f"4x the cells raised the peak from {peaks[2]:,} to {peaks[8]:,} bytes"
    acc = MedianAccumulator()
    acc.update(*chunk)
    assert acc.nbytes == len(genes) * 4352 and acc.refine().nbytes == len(genes) * 4152  # as documented


@pytest.mark.parametrize("change, message", [
    (lambda c, n: (-c, n), "non-negative"),
    (lambda c, n: (c, np.where(np.arange(len(n)) == 3, 0.0, n)), "n_counts must be positive"),
    (lambda c, n: (c, np.full_like(n, np.nan)), "n_counts must be positive"),
    (lambda c, n: (c, n / 1e4), "n_counts must be the cell's total count"),
    (lambda c, n: (c, n * 1e10), "lowest value supported"),
    (lambda c, n: (c, n[:-1]), "comes with"),
])
def test_bad_input_raises_and_leaves_the_accumulator_unchanged(change, message):
    chunks = negative_binomial_chunks(n_chunks=2)
    acc = MedianAccumulator()
    acc.update(*chunks[0])
    before = acc.result().values
    counts, n_counts, gene_ids = chunks[1]
    with pytest.raises(ValueError, match=message):
        acc.update(*change(counts, n_counts), gene_ids)
    pd.testing.assert_series_equal(acc.result().values, before)


def test_bad_setup_raises():
    counts, n_counts, gene_ids = negative_binomial_chunks(n_chunks=1)[0]
    with pytest.raises(ValueError, match="more than one column"):
        MedianAccumulator().update(counts, n_counts, gene_ids[[0] * len(gene_ids)])
    with pytest.raises(ValueError, match="passes must be between"):
        compute_medians(lambda: [], passes=MAX_PASSES + 1)
    with pytest.raises(ValueError, match="min_cells"):
        MedianAccumulator(min_cells=0)
    first = MedianAccumulator()
    first.update(counts, n_counts, gene_ids)
    with pytest.raises(ValueError, match="cannot merge"):
        first.refine().merge(first)
    refined = first.refine()
    refined.update(counts[:-1], n_counts[:-1], gene_ids)  # a pass that misses a cell
    with pytest.raises(ValueError, match="feed every pass the same chunks"):
        refined.result()
    with pytest.raises(ValueError, match="not in pass 1"):
        first.refine().update(counts[:, :1], n_counts, ["ENSG_NEW"])


def test_real_pbmc_counts():
    """700 real PBMCs (scanpy's bundled pbmc68k_reduced, counts recovered by mixgf.demo; obs n_counts = each cell's
    library size over all its genes, so most of it lies outside the 701 genes kept, as in a chunk of a real file)."""
    from mixgf.demo import pbmc68k_immune

    adata = pbmc68k_immune()
    counts, n_counts, genes = adata.X, adata.obs["n_counts"].to_numpy(), adata.var_names
    chunks = [(counts[i : i + 128], n_counts[i : i + 128], genes) for i in range(0, adata.n_obs, 128)]
    exact = exact_medians(chunks)
    assert len(exact) == adata.n_vars  # every gene is expressed in some cell
    assert_within_bound(compute_medians(lambda: chunks).values, exact, error_bound(2))
    assert_within_bound(compute_medians(lambda: chunks, passes=4).values, exact, error_bound(4))


def test_cli_medians_of_files_match_exact(test_data, tmp_path):
    """`mixgf medians` on two files (the 10x folder twice, Ensembl ids) against exact medians of the pooled cells."""
    import subprocess
    import sys

    import scanpy as sc

    from mixgf.vocab import Medians

    folder = test_data / "scanpy-10x-3.0.0"
    out = tmp_path / "medians.tsv.gz"
    run = subprocess.run([sys.executable, "-m", "mixgf", "medians", str(folder), str(folder), "--species", "human",
                          "--out", str(out), "--chunk-size", "300"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got = Medians.read(out).values
    x = sc.read_10x_mtx(folder, var_names="gene_ids").X.tocsc()
    n = np.asarray(x.sum(axis=1)).ravel()
    exact = {}
    for j, gene in enumerate(sc.read_10x_mtx(folder, var_names="gene_ids").var_names):
        col = x[:, j]
        if col.nnz:
            exact[gene] = np.median(np.tile(col.data / n[col.indices] * 1e4, 2))
    assert set(got.index) == set(exact)
    rel = np.abs(got - pd.Series(exact)[got.index]) / pd.Series(exact)[got.index]
    assert rel.max() <= error_bound(2)
