"""Rank-value encoding of single cells (Geneformer V1), streamed from files into a token dataset.

Per cell, from raw counts: keep genes that are in the vocabulary and have a median; value =
count / n_counts * 10,000 / median (float64, in that order); drop zeros; sort by value, descending; keep the
first ``max_len`` genes. The token ids are those of Geneformer V1's ``TranscriptomeTokenizer`` for the same
cells, medians and vocabulary.

Tie rule: genes with exactly equal values (same count and same median, e.g. the 11 pairs of gc30M genes that
share a median) are ordered by their column position in the input, i.e. what a stable sort gives. Geneformer's
``np.argsort`` is not stable, so on such ties its order depends on numpy's sort implementation and CPU; our
order is the same everywhere.

Speed: within a cell the factor 10,000 / n_counts is common to all genes, so genes are sorted by count / median.
A gene's sort key packs that ratio (its float64 bits, order-preserving for positive numbers) above the gene's
position in the chunk into one int64: each cell is one in-place integer sort (threads sort blocks of cells in
parallel; numpy releases the GIL) and the gene comes back from the key's low bits. Neighbours whose keys are within
rounding distance (dropped low bits, or the few ulps by which count / median and the value can disagree) are
re-ordered by the exact value; exact ties of identical count and median are already in input order. A background
thread writes the output, so disk I/O overlaps the encoding.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
from tqdm.auto import tqdm

from mixgf.io import atomic_dir
from mixgf.medians import TARGET_SUM
from mixgf.readers import CellFile, InputError, open_cells, resolve_gene_ids, suggest_gene_columns
from mixgf.settings import settings
from mixgf.tokens import TokenDatasetWriter
from mixgf.vocab import GeneVocab, Medians, check_species, default_vocab, load_medians


# ---------------------------------------------------------------------------------------------------------------
# the encoding
# ---------------------------------------------------------------------------------------------------------------

def rank_encode(counts: sp.csr_matrix, n_counts: np.ndarray, gene_tokens: np.ndarray, gene_medians: np.ndarray,
                max_len: int = 2048, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Rank-value encode the rows of ``counts``.

    ``gene_tokens[j]`` is the token id of column ``j`` (-1: not tokenized), ``gene_medians[j]`` its median.
    Returns ``(offsets, tokens)``: the tokens of row ``i`` are ``tokens[offsets[i]:offsets[i + 1]]`` (int32),
    at most ``max_len`` per row. Rows may come back empty. ``threads`` > 1 sorts blocks of rows in parallel.
    """
    counts = counts if counts.has_sorted_indices else counts.sorted_indices()
    ptr, cols, data = counts.indptr.astype(np.int64), counts.indices, counts.data
    tokens = gene_tokens[cols]
    keep = (tokens >= 0) & (data != 0)
    if not keep.all():
        cols, data, tokens = cols[keep], data[keep], tokens[keep]
        ptr = np.concatenate(([0], np.cumsum(keep, dtype=np.int64)))[ptr]
    per_row = np.diff(ptr)

    # Within a cell, count / median orders genes as the value does (the cell's factor 10,000 / n_counts is
    # common), up to rounding: _fix_near_ties re-orders, by the exact value, genes whose keys are within rounding.
    keys, low_bits, shift = _sort_keys(data / gene_medians[cols])
    _sort_rows(keys, ptr, threads)
    element = keys & ((1 << low_bits) - 1)  # a within-row sort leaves every element inside its row
    _fix_near_ties(keys, low_bits, element, ptr, shift,
                   same_input=lambda a, b: (data[a] == data[b]) & (gene_medians[cols[a]] == gene_medians[cols[b]]),
                   exact_value=lambda e, row: data[e] / n_counts[row] * TARGET_SUM / gene_medians[cols[e]])

    lengths = np.minimum(per_row, max_len)
    offsets = np.zeros(len(per_row) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if (lengths < per_row).any():
        top = np.ones(len(element), dtype=bool)
        for a, b in zip(ptr[:-1][per_row > max_len].tolist(), ptr[1:][per_row > max_len].tolist()):
            top[a + max_len:b] = False
        element = element[top]
    return offsets, tokens[element].astype(np.int32, copy=False)  # int32 already for gene_tokens from a plan


def _sort_rows(keys: np.ndarray, ptr: np.ndarray, threads: int) -> None:
    """Sort each row's slice of ``keys`` in place; numpy releases the GIL while sorting, so threads scale."""
    bounds = list(zip(ptr[:-1].tolist(), ptr[1:].tolist()))

    def sort(block):
        for a, b in block:
            keys[a:b].sort()

    if threads == 1 or len(bounds) < 2 * threads:
        sort(bounds)
        return
    step = -(-len(bounds) // threads)
    list(_thread_pool(threads).map(sort, [bounds[i:i + step] for i in range(0, len(bounds), step)]))


@cache
def _thread_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="mixgf-sort")


def _sort_keys(values: np.ndarray) -> tuple[np.ndarray, int, int]:
    """int64 keys that sort by value descending, then element index; the number of index bits; and how many low
    bits of the values' float64 patterns were dropped to make room.

    A row's elements are contiguous and in column order, so the index breaks ties by input position.
    """
    low_bits = max(len(values).bit_length(), 1)
    bits = values.view(np.int64)  # positive finite floats: bit patterns sort like the values
    if len(bits) == 0:
        return bits.copy(), low_bits, 0
    top = int(bits.max())
    shift = max(0, (top - int(bits.min())).bit_length() - (63 - low_bits))
    keys = np.subtract(top, bits)
    keys >>= shift
    keys <<= low_bits
    keys |= np.arange(len(bits))
    return keys, low_bits, shift


_ROUNDING_ULPS = 64  # the exact value and count / median agree in order unless within this many float64 ulps


def _fix_near_ties(keys, low_bits, element, ptr, shift, *, same_input, exact_value) -> None:
    """Re-order by ``exact_value(elements, row)`` (descending, then input position) every run of neighbours in a
    row whose keys are too close for their order to be certain (codes within rounding distance), unless the run is
    only exact ties of identical count and median, which the keys already order by input position."""
    # codes ascend within a row; keys = code << low_bits | index, so codes differ by at most `window` exactly when
    # the keys differ by less than (window + 1) << low_bits
    near = np.diff(keys) < (2 + (_ROUNDING_ULPS >> shift)) << low_bits
    starts = ptr[1:-1]
    near[starts[(starts > 0) & (starts < len(keys))] - 1] = False  # neighbours across a row boundary
    candidates = np.flatnonzero(near)
    suspects = candidates[~same_input(element[candidates], element[candidates + 1])]
    fixed_until = 0
    for i in suspects.tolist():
        if i < fixed_until:
            continue
        start, stop = i, i + 2
        while start > 0 and near[start - 1]:
            start -= 1
        while stop < len(keys) and near[stop - 1]:
            stop += 1
        run = element[start:stop]
        value = exact_value(run, np.searchsorted(ptr, start, side="right") - 1)
        element[start:stop] = run[np.lexsort((run, -value))]
        fixed_until = stop


# ---------------------------------------------------------------------------------------------------------------
# files -> token dataset
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class FileSummary:
    """What happened to one input: share of genes and counts that reached the vocabulary, cells kept/dropped."""

    path: str
    gene_id_source: str
    genes: int
    genes_tokenized: int
    cells: int
    cells_kept: int = 0
    dropped_filter_pass: int = 0
    dropped_zero_counts: int = 0
    dropped_no_vocab_genes: int = 0
    counts_total: float = 0.0
    counts_tokenized: float = 0.0

    @property
    def share_genes(self) -> float:
        return self.genes_tokenized / self.genes if self.genes else 0.0

    @property
    def share_counts(self) -> float:
        return self.counts_tokenized / self.counts_total if self.counts_total else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"share_genes": round(self.share_genes, 4), "share_counts": round(self.share_counts, 4)}

    def line(self) -> str:
        return (f"{self.path}: {self.cells_kept:,}/{self.cells:,} cells kept "
                f"(dropped: {self.dropped_filter_pass:,} filter_pass, {self.dropped_zero_counts:,} zero counts, "
                f"{self.dropped_no_vocab_genes:,} no vocabulary gene); genes {self.genes_tokenized:,}/{self.genes:,} "
                f"({self.share_genes:.1%}) and counts {self.share_counts:.1%} mapped via {self.gene_id_source}")


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs to tokenize chunks of one file (picklable)."""

    path: str
    counts: str
    gene_tokens: np.ndarray
    gene_medians: np.ndarray
    merge: sp.csr_matrix | None  # columns -> unique genes, when duplicates are summed
    normalized: bool
    max_len: int
    threads: int  # sorting threads per process


@dataclass
class TokenizeResult:
    out_dir: Path
    files: list[FileSummary] = field(default_factory=list)

    @property
    def n_cells(self) -> int:
        return sum(f.cells_kept for f in self.files)


def tokenize_files(inputs, out_dir, *, species: str, vocab: GeneVocab | None = None, medians: Medians | None = None,
                   max_len: int = 2048, obs_keys=(), counts: str = "X", gene_column: str | None = None,
                   normalized: bool = False, sum_duplicates: bool = False, min_mapped: float = 0.25,
                   chunk_size: int = 1024, workers: int = 1, progress: bool = True) -> TokenizeResult:
    """Tokenize raw-count files of one species into a Hugging Face dataset saved at ``out_dir``.

    Columns: ``input_ids`` (list of int32), ``length``, ``species``, ``cell_id`` and the ``obs_keys`` columns,
    rows in input order minus the cells dropped (``filter_pass`` != 1, zero counts, no vocabulary gene).
    ``out_dir/mixgf_tokens.json`` records the vocabulary, medians, max length and a per-file summary.
    Every input is checked before any output is written; the dataset appears whole or not at all.
    """
    check_species(species)
    vocab = vocab or default_vocab()
    medians = medians or load_medians(species)
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise InputError("no input files given")
    plans, summaries, metadata = [], [], []
    for path in inputs:
        plan, summary, obs = _plan_file(path, species, vocab, medians, max_len=max_len, obs_keys=tuple(obs_keys),
                                        counts=counts, gene_column=gene_column, normalized=normalized,
                                        sum_duplicates=sum_duplicates, min_mapped=min_mapped,
                                        threads=max(1, settings.n_threads // max(1, workers)))
        plans.append(plan), summaries.append(summary), metadata.append(obs)

    tasks = [(i, start, min(start + chunk_size, s.cells)) for i, s in enumerate(summaries)
             for start in range(0, s.cells, chunk_size)]
    with atomic_dir(out_dir) as tmp:
        writer = TokenDatasetWriter(tmp)
        with _chunk_results(plans, tasks, workers) as results, \
                tqdm(total=sum(s.cells for s in summaries), unit="cell",
                     disable=not (progress and settings.progress) or None) as bar:
            for (i, start, stop), (kept, offsets, tokens, stats) in zip(tasks, results):
                s = summaries[i]
                for key, value in stats.items():
                    setattr(s, key, getattr(s, key) + value)
                writer.write(_record_batch(kept, offsets, tokens, metadata[i].iloc[start:stop], species))
                bar.update(stop - start)
        if writer.rows == 0:
            raise InputError(f"{', '.join(inputs)}: no cell has counts on a vocabulary gene; nothing to tokenize")
        writer.close({"format": 1, "species": species, "vocab": vocab.identity(), "medians": {species: medians.identity()},
                      "max_len": max_len, "normalized": normalized, "files": [s.to_dict() for s in summaries]})
    return TokenizeResult(Path(out_dir), summaries)


def _plan_file(path, species, vocab, medians, *, max_len, obs_keys, counts, gene_column, normalized,
               sum_duplicates, min_mapped, threads):
    cells = open_cells(path, counts=counts)
    try:
        if cells.n_obs == 0 or cells.var.shape[0] == 0:
            raise InputError(f"{path}: is empty ({cells.n_obs} cells x {cells.var.shape[0]} genes)")
        missing = [k for k in obs_keys if k not in cells.obs.columns]
        if missing:
            raise InputError(f"{path}: obs has no column(s) {', '.join(missing)}; columns are: "
                             f"{', '.join(cells.obs.columns) or 'none'}")
        ids = resolve_gene_ids(cells.var, species, gene_column=gene_column, name=path)
        genes = np.where(pd.isna(ids.ensembl), None, ids.ensembl)
        tokens, medians_of = _gene_lookup(genes, vocab, medians)
        tokenized = tokens >= 0
        if tokenized.mean() < min_mapped:
            hint = suggest_gene_columns(cells.var, species)
            raise InputError(
                f"{path}: only {tokenized.sum():,} of {len(tokens):,} genes ({tokenized.mean():.1%}) in {ids.source} "
                f"map to the {species} vocabulary (needs {min_mapped:.0%}); "
                + (f"try --gene-column {hint[0]}" if hint else
                   "give Ensembl ids in var['ensembl_id'] or name the column holding them with --gene-column"))
        merge = None
        dup = pd.Series(genes[tokenized]).duplicated(keep=False)
        if dup.any():
            if not sum_duplicates:
                examples = ", ".join(sorted(set(pd.Series(genes[tokenized])[dup]))[:3])
                raise InputError(f"{path}: {int(dup.sum())} columns share an Ensembl id (e.g. {examples}); "
                                 "sum them into one column first, or pass --sum-duplicates")
            merge, tokens, medians_of = _duplicate_merge(genes, tokens, medians_of)
        _check_values(cells.chunk(0, min(cells.n_obs, 256)).data, path, normalized)  # fail fast; every chunk is checked
        obs = pd.DataFrame({"cell_id": cells.obs.index.astype(str)}, index=None)
        for k in obs_keys:
            column = cells.obs[k]
            obs[k] = column.astype(str).to_numpy() if isinstance(column.dtype, pd.CategoricalDtype) else column.to_numpy()
    finally:
        cells.close()
    plan = _Plan(str(path), counts, tokens, medians_of, merge, normalized, max_len, threads)
    summary = FileSummary(str(path), ids.source, len(genes), int((tokens >= 0).sum()), cells.n_obs)
    return plan, summary, obs


def _gene_lookup(genes: np.ndarray, vocab: GeneVocab, medians: Medians) -> tuple[np.ndarray, np.ndarray]:
    """Token id (-1 if none) and median (NaN if none) of each gene; a gene needs both to be tokenized."""
    tokens = vocab.ids([g if g is not None else "" for g in genes])
    medians_of = medians.values.reindex([g if g is not None else "" for g in genes]).to_numpy(dtype=np.float64)
    tokens[np.isnan(medians_of)] = -1
    return tokens.astype(np.int32), medians_of


def _duplicate_merge(genes, tokens, medians_of):
    """A 0/1 matrix summing columns that share an Ensembl id, and the token / median of each merged column."""
    tokenized = np.flatnonzero(tokens >= 0)
    unique, first, code = np.unique(genes[tokenized].astype(str), return_index=True, return_inverse=True)
    merge = sp.csr_matrix((np.ones(len(tokenized)), (tokenized, code)), shape=(len(genes), len(unique)))
    return merge, tokens[tokenized[first]], medians_of[tokenized[first]]


LOG_SCALE_MAX = 20.0  # log1p(CP10k) stays below ~10 and log2(CPM) below ~20; linear-scale values rise far above


def _check_values(data: np.ndarray, path, normalized: bool) -> None:
    if not np.isfinite(data).all():
        raise InputError(f"{path}: counts hold NaN or infinite values; fix or drop those cells before tokenizing")
    if (data < 0).any():
        raise InputError(f"{path}: counts hold negative values (e.g. {data[data < 0][0]}); give raw counts "
                         "(--counts raw or --counts LAYER if the file has them)")
    integers = np.array_equal(data, np.rint(data))
    if not normalized and not integers:
        example = data[data != np.rint(data)][0]
        raise InputError(f"{path}: counts are not integers (e.g. {example:g}), so they look normalised; give raw "
                         "counts (--counts raw or --counts LAYER), or pass --normalized to accept them as they are")
    if normalized and not integers and data.size and data.max() <= LOG_SCALE_MAX:
        raise InputError(f"{path}: every value is <= {data.max():.3g} and not all are integers, so the values look "
                         "log-transformed (e.g. scanpy's log1p); rank-value encoding divides each value by the "
                         "cell's total, which needs counts or linear-scale normalised values: give raw counts "
                         "(--counts raw or --counts LAYER), or undo the log (np.expm1) before tokenizing")


# chunk workers -------------------------------------------------------------------------------------------------

_worker_plans: list[_Plan] = []
_worker_files: dict[int, CellFile] = {}


def _init_worker(plans) -> None:
    global _worker_plans
    _worker_plans = plans
    _worker_files.clear()


def _encode_chunk(task) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Tokenize rows start:stop of one file; returns kept row indices, offsets, tokens and summary counts."""
    i, start, stop = task
    plan = _worker_plans[i]
    if i not in _worker_files:
        _worker_files[i] = open_cells(plan.path, counts=plan.counts)
    cells = _worker_files[i]
    x = cells.chunk(start, stop)
    _check_values(x.data, plan.path, plan.normalized)
    n_counts = cells.n_counts(start, stop, x)
    passes = cells.passes_filter(start, stop)
    if plan.merge is not None:
        x = (x @ plan.merge).tocsr()
    positive = n_counts > 0
    usable = passes & positive
    if not usable.all():
        x = x[usable]
    offsets, tokens = rank_encode(x, n_counts[usable], plan.gene_tokens, plan.gene_medians, plan.max_len, plan.threads)
    nonempty = np.diff(offsets) > 0
    kept = np.flatnonzero(usable)[nonempty]
    lengths = np.diff(offsets)[nonempty]
    new_offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    tokenized_counts = float((x @ (plan.gene_tokens >= 0).astype(np.float64)).sum())
    stats = {"cells_kept": len(kept), "dropped_filter_pass": int((~passes).sum()),
             "dropped_zero_counts": int((passes & ~positive).sum()), "dropped_no_vocab_genes": int((~nonempty).sum()),
             "counts_total": float(n_counts[usable].sum()), "counts_tokenized": tokenized_counts}
    return kept, new_offsets, tokens, stats


class _chunk_results:
    """Context manager yielding chunk results in task order, in this process or in a worker pool.

    The pool works at most ``prefetch`` chunks per worker ahead of the consumer: ``Pool.imap`` would queue every
    chunk at once and hold all finished results in memory while the writer falls behind.
    """

    def __init__(self, plans, tasks, workers, prefetch: int = 2):
        self.plans, self.tasks, self.workers, self.pool = plans, tasks, max(1, workers), None
        self.prefetch = prefetch

    def __enter__(self):
        if self.workers == 1 or len(self.tasks) == 1:
            _init_worker(self.plans)
            return map(_encode_chunk, self.tasks)
        self.pool = mp.get_context("spawn").Pool(self.workers, initializer=_init_worker, initargs=(self.plans,))
        return self._bounded()

    def _bounded(self):
        pending, tasks = deque(), iter(self.tasks)
        for task in itertools.islice(tasks, self.workers * self.prefetch):
            pending.append(self.pool.apply_async(_encode_chunk, (task,)))
        while pending:
            result = pending.popleft().get()
            for task in itertools.islice(tasks, 1):
                pending.append(self.pool.apply_async(_encode_chunk, (task,)))
            yield result

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
        for f in _worker_files.values():
            f.close()
        _worker_files.clear()
        return False


def _record_batch(kept, offsets, tokens, obs: pd.DataFrame, species: str) -> pa.RecordBatch:
    obs = obs.iloc[kept]
    columns = {
        "input_ids": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(tokens)),
        "length": pa.array(np.diff(offsets).astype(np.int32)),
        "species": pa.array([species] * len(kept), pa.string()),
    }
    for name in obs.columns:
        columns[name] = pa.array(obs[name].to_numpy())
    return pa.RecordBatch.from_pydict(columns)
