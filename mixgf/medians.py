"""Per-gene non-zero medians of count / n_counts * 10,000, streamed over any number of cells (SPEC §2).

Rank-value encoding divides each gene's normalised expression by the gene's median over the cells that express
it, taken over a whole corpus (tens of millions of cells), so the medians cannot be computed in memory.
Geneformer merges t-digests; mixgf does a *radix selection on the float64 bit pattern* instead, which is
vectorised, mergeable and has a hard error bound. For positive floats the bit pattern orders like the value, and
its top bits (exponent and leading mantissa bits) name a bucket, roughly log-spaced:

- pass 1 counts, per gene, the values in each of 544 buckets: 16 per octave over [2**-20, 2**14);
- every further pass reads the same chunks again, counts only the values inside the bucket that holds the gene's
  median, and splits that bucket by the next 8 mantissa bits (256 sub-buckets);
- the result is the midpoint of the final bucket. A bucket with ``bits`` mantissa bits resolved spans at most
  2**-bits of its lower edge, so against the exact median of the float64 values count / n_counts * 10,000

      |estimate - median| <= 2**-(5 + 8 * (passes - 1)) * median      (plus float64 rounding, ~1e-16)
      1 pass: 3.1e-2   2 passes: 1.2e-4   3 passes: 4.8e-7   (``error_bound(passes)``; the bound is attained).

For an even number of cells the median is the mean of the two middle values, as in ``np.median``; each is
located separately, so the bound holds for their mean too.

Memory grows with the number of genes, never with the number of cells: 4,352 bytes per gene in pass 1 (261 MB for
60,000 genes) and 4,152 in later passes, plus temporaries of 16 (pass 1) to 36 (later passes) bytes per non-zero of
the chunk being added, and about as much again as the accumulator while :meth:`MedianAccumulator.result` or
:meth:`MedianAccumulator.refine` runs. Accumulators fed different chunks merge by adding counts, so the result does
not depend on how the chunks were split between workers or ordered.

Normalised values must lie in [2**-20, 10,000]: counts must not be negative, n_counts must be each cell's total
count (so no count exceeds it) and at most about 1e10. Anything else raises ``ValueError`` before the
accumulator changes.

Across worker processes: give each worker a pickled copy of the pass's (empty) accumulator and a share of the
chunks, merge what they return, call :meth:`~MedianAccumulator.refine` and repeat; :func:`compute_medians` is the
single-process loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from mixgf.vocab import Medians

TARGET_SUM = 10_000  # the library size every cell is scaled to, here and in rank-value encoding
MAX_PASSES = 6  # 44 mantissa bits; a 7th would shrink buckets to one float, whose midpoint rounding breaks the bound

_LOWEST_LOG2, _TOP_LOG2 = -20, 14  # bucket range [2**-20, 2**14) holds every value in [2**-20, TARGET_SUM]
_FIRST_BITS, _REFINE_BITS = 4, 8  # mantissa bits resolved by pass 1 and by each later pass
_MANTISSA_BITS = 52
# A bucket's key is the float64 bit pattern of its values cut to the exponent and the leading mantissa bits.
_FIRST_KEY = int(np.float64(2.0**_LOWEST_LOG2).view(np.uint64)) >> (_MANTISSA_BITS - _FIRST_BITS)  # pass 1's first bucket

Chunk = tuple[sp.spmatrix | sp.sparray | np.ndarray, np.ndarray, Sequence[str]]


def error_bound(passes: int) -> float:
    """Largest relative error of a median computed with ``passes`` passes over the data."""
    return 2.0 ** -(_bits(passes) + 1)


def _bits(passes: int) -> int:
    return _FIRST_BITS + _REFINE_BITS * (passes - 1)


def _edge(key: np.ndarray, bits: int) -> np.ndarray:
    """Lower edge (a float64) of the bucket ``key``."""
    return (key << np.uint64(_MANTISSA_BITS - bits)).view(np.float64)



class _Prior(NamedTuple):
    """What earlier passes found, per gene: cells with a non-zero count, and per middle value (lower, upper)
    the key of the first sub-bucket of the bucket now being split, the value's rank inside it and its count."""

    n_cells: np.ndarray  # (genes,)
    start: np.ndarray  # (genes, 2) uint64
    rank: np.ndarray  # (genes, 2)
    size: np.ndarray  # (genes, 2)


class MedianAccumulator:
    """Per-gene bucket counts of normalised non-zero values: one pass of the median search.

    Feed chunks with :meth:`update` and combine accumulators fed different chunks with :meth:`merge`. Then read
    :meth:`result`, or get the next pass's empty accumulator from :meth:`refine` and feed it the same chunks again
    (in any order and split). ``min_cells``: genes with a non-zero count in fewer cells get no median.
    """

    def __init__(self, *, min_cells: int = 1):
        if min_cells < 1:
            raise ValueError(f"min_cells must be at least 1, got {min_cells}")
        self.min_cells = min_cells
        self.passes = 1
        self.genes = pd.Index([], dtype=object)
        n_buckets = (_TOP_LOG2 - _LOWEST_LOG2) << _FIRST_BITS
        self._counts = np.zeros((0, 1, n_buckets), np.int64)  # (genes, 1 or 2 middle values, buckets)
        self._prior: _Prior | None = None  # None in pass 1

    @property
    def bits(self) -> int:
        return _bits(self.passes)

    @property
    def error_bound(self) -> float:
        return error_bound(self.passes)

    @property
    def nbytes(self) -> int:
        """Memory held between chunks."""
        prior = 0 if self._prior is None else sum(a.nbytes for a in self._prior)
        return self._counts.nbytes + prior

    def update(self, counts: sp.spmatrix | sp.sparray | np.ndarray, n_counts: np.ndarray, gene_ids: Sequence[str]) -> None:
        """Add a chunk: raw ``counts`` (cells x genes), each cell's total count, and the Ensembl id of each column."""
        counts, n_counts, gene_ids = _check_chunk(counts, n_counts, gene_ids)
        values, columns = _normalised(counts, n_counts)
        key = values.view(np.uint64)  # in place: the values are not needed any more
        key >>= np.uint64(_MANTISSA_BITS - self.bits)
        row_of_column = self._rows(gene_ids)
        flat = self._counts.reshape(-1)
        n_buckets = self._counts.shape[2]
        if self._prior is None:  # one histogram over the whole range; _normalised checked every value is inside
            index = row_of_column[columns]
            index *= n_buckets
            index += key.view(np.int64)
            index -= _FIRST_KEY
            np.add.at(flat, index, 1)
            return
        for middle in range(2):
            bucket = self._prior.start[row_of_column, middle][columns]
            np.subtract(key, bucket, out=bucket)  # wraps to a huge number below the bucket being split
            hit = np.flatnonzero(bucket < n_buckets)
            index = (row_of_column[columns[hit]] * 2 + middle) * n_buckets + bucket[hit].astype(np.int64)
            np.add.at(flat, index, 1)

    def merge(self, other: MedianAccumulator) -> MedianAccumulator:
        """Add the counts of an accumulator of the same pass fed other chunks; returns ``self``."""
        if other.passes != self.passes:
            raise ValueError(f"cannot merge an accumulator of pass {other.passes} into one of pass {self.passes}")
        if self._prior is None:
            rows = self._rows(other.genes)  # before indexing: it may grow self._counts
            self._counts[rows] += other._counts
            return self
        if not (self.genes.equals(other.genes) and np.array_equal(self._prior.start, other._prior.start)):
            raise ValueError("cannot merge refinement accumulators made from different earlier passes")
        self._counts += other._counts
        return self

    def refine(self) -> MedianAccumulator:
        """Empty accumulator for the next pass, which splits each median's bucket 256-fold; feed it the same chunks."""
        if self.passes == MAX_PASSES:
            raise ValueError(f"at most {MAX_PASSES} passes: the error bound {self.error_bound:.1e} is already reached")
        n_cells, key, rank, size = self._middle()
        nxt = MedianAccumulator(min_cells=self.min_cells)
        nxt.passes = self.passes + 1
        nxt.genes = self.genes
        nxt._counts = np.zeros((len(self.genes), 2, 1 << _REFINE_BITS), np.int64)
        nxt._prior = _Prior(n_cells, key << np.uint64(_REFINE_BITS), rank, size)
        return nxt

    def result(self, name: str = "custom") -> Medians:
        """Medians of the genes seen in at least ``min_cells`` cells, sorted by gene id."""
        n_cells, key, _, _ = self._middle()
        middle = (_edge(key, self.bits) + _edge(key + np.uint64(1), self.bits)) / 2
        keep = n_cells >= self.min_cells
        return Medians(pd.Series(middle[keep].mean(axis=1), index=self.genes[keep]).sort_index(), name)

    def _middle(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per gene: cells seen, and for the lower and upper middle value the key of the bucket holding it,
        its rank inside that bucket and the bucket's count."""
        counted = self._counts.sum(axis=2)
        if self._prior is None:
            n_cells, start = counted[:, 0], np.uint64(_FIRST_KEY)
            rank = np.stack([(n_cells - 1) // 2, n_cells // 2], axis=1)
        else:
            n_cells, start, rank, size = self._prior
            if not np.array_equal(counted, size):
                gene = self.genes[np.flatnonzero((counted != size).any(axis=1))[0]]
                raise ValueError(f"pass {self.passes} saw other data than pass {self.passes - 1} (gene {gene}); "
                                 "feed every pass the same chunks")
        shape = (len(self.genes), 2, self._counts.shape[2])
        cum = np.broadcast_to(self._counts.cumsum(axis=2), shape)
        bucket = (cum <= rank[:, :, None]).sum(axis=2, keepdims=True)
        bucket = np.minimum(bucket, shape[2] - 1)  # genes with no cells; they get no median
        size = np.take_along_axis(np.broadcast_to(self._counts, shape), bucket, axis=2)[:, :, 0]
        before = np.take_along_axis(cum, bucket, axis=2)[:, :, 0] - size
        key = start + bucket[:, :, 0].astype(np.uint64)
        return n_cells, key, rank - before, size

    def _rows(self, gene_ids: pd.Index) -> np.ndarray:
        """Row of each gene; pass 1 adds the genes it has not seen yet."""
        rows = self.genes.get_indexer(gene_ids)
        new = gene_ids[rows < 0]
        if len(new) and self._prior is not None:
            raise ValueError(f"gene {new[0]} was not in pass 1; feed every pass the same chunks")
        if len(new):
            rows[rows < 0] = np.arange(len(self.genes), len(self.genes) + len(new))
            self.genes = self.genes.append(new)
            self._counts = np.concatenate([self._counts, np.zeros((len(new), *self._counts.shape[1:]), np.int64)])
        return rows


def compute_medians(chunks: Callable[[], Iterable[Chunk]], *, passes: int = 2, min_cells: int = 1,
                    name: str = "custom") -> Medians:
    """Medians over all chunks ``(counts, n_counts, gene_ids)`` that ``chunks()`` yields; it is called once per pass.

    The relative error is at most ``error_bound(passes)``: 1.2e-4 for the default 2 passes.
    """
    if not 1 <= passes <= MAX_PASSES:
        raise ValueError(f"passes must be between 1 and {MAX_PASSES}, got {passes}")
    acc = MedianAccumulator(min_cells=min_cells)
    for done in range(passes):
        if done:
            acc = acc.refine()
        for counts, n_counts, gene_ids in chunks():
            acc.update(counts, n_counts, gene_ids)
    return acc.result(name)


def _check_chunk(counts, n_counts, gene_ids) -> tuple[sp.csr_matrix, np.ndarray, pd.Index]:
    """The chunk as CSR with one entry per cell and gene, float64 totals and a unique gene index."""
    counts = sp.csr_matrix(counts)
    if not counts.has_canonical_format:  # duplicate entries of a cell and gene add up
        counts = counts.copy()
        counts.sum_duplicates()
    n_counts = np.asarray(n_counts, dtype=np.float64).reshape(-1)
    gene_ids = pd.Index(gene_ids)
    if counts.shape != (len(n_counts), len(gene_ids)):
        raise ValueError(f"chunk of {counts.shape[0]} cells x {counts.shape[1]} genes comes with "
                         f"{len(n_counts)} n_counts and {len(gene_ids)} gene ids")
    if not gene_ids.is_unique:
        raise ValueError(f"gene id {gene_ids[gene_ids.duplicated()][0]} names more than one column of a chunk")
    return counts, n_counts, gene_ids


def _normalised(counts: sp.csr_matrix, n_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-zero counts as count / n_counts * 10,000 (float64), with their columns; raises if out of range."""
    data, columns = counts.data, counts.indices
    values = np.repeat(n_counts, np.diff(counts.indptr))
    stored = None if data.all() else np.flatnonzero(data)  # drop explicitly stored zeros
    if stored is not None:
        data, columns, values = data[stored], columns[stored], values[stored]
    with np.errstate(divide="ignore", invalid="ignore"):  # n_counts of 0 or NaN are reported below
        np.divide(data, values, out=values)
    values *= TARGET_SUM
    valid = (values >= 2.0**_LOWEST_LOG2) & (values <= TARGET_SUM)  # False for NaN
    if not valid.all():
        first = np.flatnonzero(~valid)[0]
        cell = np.searchsorted(counts.indptr, first if stored is None else stored[first], side="right") - 1
        raise ValueError(_why_invalid(data[first], n_counts[cell], cell))
    return values, columns


def _why_invalid(count: float, total: float, cell: int) -> str:
    if not count > 0:
        return f"counts must be non-negative raw counts; cell {cell} of the chunk has count {count}"
    if not (0 < total < np.inf):
        return f"n_counts must be positive and finite; cell {cell} of the chunk has counts but n_counts {total}"
    if count > total:
        return f"cell {cell} of the chunk has a count of {count} above its n_counts {total}; n_counts must be the cell's total count"
    return (f"cell {cell} of the chunk has count {count:g} and n_counts {total:g}: count / n_counts * 10,000 is below "
            f"2**{_LOWEST_LOG2}, the lowest value supported (n_counts up to about {TARGET_SUM * 2.0**-_LOWEST_LOG2:.0e})")


def file_medians(paths: Sequence[str], species: str, *, counts: str = "X", gene_column: str | None = None,
                 passes: int = 2, min_cells: int = 1, chunk_size: int = 2048, name: str = "custom") -> Medians:
    """Medians over the cells of raw-count files (any format :func:`mixgf.readers.open_cells` reads).

    Genes are identified as the tokenizer does (:func:`mixgf.readers.resolve_gene_ids`); columns without an
    Ensembl id are left out. Cells with ``filter_pass`` != 1 or no counts are skipped.
    """
    from mixgf.readers import InputError, open_cells, resolve_gene_ids

    files = []
    for path in paths:
        cells = open_cells(path, counts=counts)
        ids = resolve_gene_ids(cells.var, species, gene_column=gene_column, name=str(path))
        mapped = np.flatnonzero([g is not None for g in ids.ensembl])
        genes = pd.Index(ids.ensembl[mapped].astype(str))
        if len(genes) == 0:
            raise InputError(f"{path}: no gene in {ids.source} has a {species} Ensembl id; name the column that "
                             "holds them with --gene-column")
        if not genes.is_unique:
            raise InputError(f"{path}: several columns share the Ensembl id {genes[genes.duplicated()][0]}; sum them "
                             "into one column first")
        files.append((cells, mapped, genes))

    def chunks():
        for cells, mapped, genes in files:
            for start in range(0, cells.n_obs, chunk_size):
                stop = min(start + chunk_size, cells.n_obs)
                x = cells.chunk(start, stop)
                n_counts = cells.n_counts(start, stop, x)
                use = cells.passes_filter(start, stop) & (n_counts > 0)
                yield x[use][:, mapped], n_counts[use], genes

    try:
        return compute_medians(chunks, passes=passes, min_cells=min_cells, name=name)
    finally:
        for cells, _, _ in files:
            cells.close()
