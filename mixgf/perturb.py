"""In silico perturbation (SPEC §7, Table 3, Figure 4): delete or overexpress genes in cells, measure the shift.

Two measures, as Geneformer's ``InSilicoPerturber(emb_mode="cell")`` (geneformer/in_silico_perturber.py,
``isp_perturb_all`` / ``isp_perturb_set``; geneformer/perturber_utils.py, upstream ff551ee, mirrored at
zyj1729/Geneformer b466b7b):

- :func:`perturb`, goal-free: for a cell and a perturbed gene at rank position ``i``, the mean over the other genes
  ``j != i`` of ``cos(h_perturbed[j], h_original[j])`` at the chosen layer (``cos_sim``). It is not the cosine of
  mean-pooled cell embeddings.
- :func:`perturb_to_goal`, the paper's: ``cosine_shift = cos(perturbed, goal) - cos(original, goal)`` with cell
  embeddings (gene means) over the same genes, and ``goal`` the mean embedding of the goal-state cells;
  :func:`gene_stats` turns the per-(cell, gene) shifts into a per-gene table with Wilcoxon p-values and BH FDR.

Perturbations, as Geneformer's ``delete_indices`` / ``overexpress_indices`` / ``overexpress_tokens``:

- ``delete``: remove the gene's token; the cell gets one gene shorter.
- ``overexpress``: move the gene to the front (rank 1). The gene already at the front is never perturbed, and the
  moved gene's own embedding is left out of the comparison. A gene absent from the cell (only with a gene list) is
  inserted at the front; a cell at the maximum length then drops its last gene, and the original it is compared
  with is the cell without that gene, recomputed, so the shift measures only the insertion (Geneformer's
  ``truncate_by_n_overflow``).

Speed: every perturbed variant of every cell is one row of a batch; rows are packed longest first (the variants of a
cell have equal lengths, so batches hardly need padding, and where they do it is masked), only the encoder layers up
to the chosen one run (no MLM or classifier head, no pooler), and each cell's original hidden states are computed
once and gathered by index for every comparison. The Python loop runs over batches, never over genes; on a CPU,
batches run side by side in worker threads (:func:`mixgf.encoder.map_batches`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mixgf.checkpoint import default_device, length_limit, model_vocab, read_config, token_column, warn_truncation
from mixgf.encoder import Encoder, load_encoder, map_batches
from mixgf.padding import pad_batch
from mixgf.pooling import mean_pool
from mixgf.tokens import cells_species
from mixgf.vocab import GeneVocab

MODES = ("delete", "overexpress")
NULLS = ("pooled", "random")
ALTERNATIVES = ("two-sided", "greater", "less")
PERTURB_COLUMNS = ["cell_index", "perturbed_position", "perturbed_token", "ensembl_id", "cos_sim"]
SHIFT_COLUMNS = ["cell_index", "ensembl_id", "cosine_shift"]
STATS_COLUMNS = ["ensembl_id", "symbol", "n_cells", "mean_shift", "p_value", "fdr"]
ABSENT = -1  # perturbed_position of a gene inserted into a cell that lacked it


# ---------------------------------------------------------------------------------------------------------------
# token datasets
# ---------------------------------------------------------------------------------------------------------------

def load_cells(path, vocab: GeneVocab | None = None):
    """A token dataset and its metadata: a mixgf one (:func:`mixgf.tokens.load_tokens`), or a Geneformer-format one
    (a ``save_to_disk`` folder with ``input_ids`` and ``length``, as Geneformer's tokenizer writes it) when ``vocab``
    names the vocabulary that made it. Such a folder records no medians or maximum length: its metadata holds
    ``vocab.identity()``, ``medians=None`` and ``max_len=None`` (trusted to fit the model; longer cells are cut)."""
    from datasets import load_from_disk

    from mixgf.tokens import METADATA_FILE, load_tokens

    path = Path(path)
    if (path / METADATA_FILE).exists():
        return load_tokens(path)
    if vocab is None:
        raise FileNotFoundError(f"{path}: not a mixgf token dataset (no {METADATA_FILE}); for a Geneformer-format "
                                "dataset name its vocabulary (--vocab geneformer-v1 or a vocabulary file)")
    dataset = load_from_disk(str(path))
    missing = [c for c in ("input_ids", "length") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{path}: a Geneformer-format dataset needs columns input_ids and length; it lacks {missing}")
    return dataset, {"vocab": vocab.identity(), "medians": None, "max_len": None}


# ---------------------------------------------------------------------------------------------------------------
# perturbed variants
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _Block:
    """Perturbed variants of one cell, all of one length.

    ``tokens`` (V, L): the perturbed sequences. Row v is compared on positions ``offset .. offset + M - 1`` of its
    sequence against positions ``reference[v]`` (V, M) of the original cell (``truncated``: of the cell without its
    last gene). ``positions``: the perturbed gene's rank in the cell (``ABSENT`` for an inserted gene); ``genes``:
    its token.
    """

    cell: int
    tokens: np.ndarray
    offset: int
    reference: np.ndarray
    positions: np.ndarray
    genes: np.ndarray
    truncated: bool = False


def _others(n: int, positions: np.ndarray) -> np.ndarray:
    """(len(positions), n - 1): for each position i, the indices 0..n-1 without i, in order."""
    j = np.arange(n - 1)[None, :]
    return j + (j >= positions[:, None])


def perturbed_blocks(cell: int, ids: np.ndarray, mode: str, genes: np.ndarray | None, limit: int) -> list[_Block]:
    """The variants of one cell (token ids ``ids``, at most ``limit``) for ``genes`` (token ids; ``None``: every gene
    of the cell). Delete: every position; overexpress: every position but the first, plus, for listed genes the
    cell lacks, the gene inserted at the front of the cell's first ``limit - 1`` genes."""
    n = len(ids)
    present = np.arange(n) if genes is None else np.flatnonzero(np.isin(ids, genes))
    if mode == "overexpress":
        present = present[present > 0]
    blocks = []
    if len(present) and n > 1:
        rest = _others(n, present)
        moved = ids[present][:, None]
        tokens = ids[rest] if mode == "delete" else np.concatenate([moved, ids[rest]], axis=1)
        blocks.append(_Block(cell, tokens, int(mode == "overexpress"), rest, present, ids[present]))
    if mode == "overexpress" and genes is not None:
        absent = np.setdiff1d(genes, ids)
        if len(absent):
            kept = min(n, limit - 1)
            tokens = np.concatenate([absent[:, None], np.broadcast_to(ids[:kept], (len(absent), kept))], axis=1)
            blocks.append(_Block(cell, tokens, 1, np.broadcast_to(np.arange(kept), (len(absent), kept)),
                                 np.full(len(absent), ABSENT), absent, truncated=kept < n))
    return blocks


# ---------------------------------------------------------------------------------------------------------------
# the batched computation
# ---------------------------------------------------------------------------------------------------------------

def _padded(sequences, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, mask = pad_batch(sequences)
    return input_ids.to(device), mask.to(device)


def _hidden_states(encoder: Encoder, sequences: list[np.ndarray], batch_size: int) -> list[torch.Tensor]:
    """Hidden states (n_i, hidden) of each sequence, batched longest first."""
    out = [None] * len(sequences)
    order = np.argsort([-len(s) for s in sequences], kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = _padded([sequences[r] for r in rows], encoder.device)
        h = encoder(ids, mask)
        for r, row in enumerate(rows):
            out[row] = h[r, : len(sequences[row])]
    return out


def _batches(blocks: list[_Block], batch_size: int):
    """Slices (block, first row, last row) of length-sorted blocks, packed ``batch_size`` rows per batch."""
    batch, free = [], batch_size
    for block in sorted(blocks, key=lambda b: -b.tokens.shape[1]):
        start = 0
        while start < len(block.tokens):
            stop = min(len(block.tokens), start + free)
            batch.append((block, start, stop))
            free -= stop - start
            start = stop
            if free == 0:
                yield batch
                batch, free = [], batch_size
    if batch:
        yield batch


def _measure(encoder: Encoder, reference: dict, goal: torch.Tensor | None, batch) -> tuple[list, list[np.ndarray]]:
    """One packed batch of :func:`_batches`: the batch and, per slice of a block, its cos_sim (or cosine_shift)."""
    input_ids, mask = _padded([s for b, i, j in batch for s in b.tokens[i:j]], encoder.device)
    h = encoder(input_ids, mask)
    values, first = [], 0
    for block, i, j in batch:
        m = block.reference.shape[1]
        perturbed = h[first : first + j - i, block.offset : block.offset + m]
        original = reference[(block.cell, block.truncated)][torch.from_numpy(block.reference[i:j]).to(h.device)]
        if goal is None:
            value = F.cosine_similarity(perturbed, original, dim=-1, eps=1e-8).mean(-1)
        else:
            value = (F.cosine_similarity(perturbed.mean(1), goal[None], dim=-1)
                     - F.cosine_similarity(original.mean(1), goal[None], dim=-1))
        values.append(value.float().cpu().numpy())
        first += j - i
    return batch, values


def _run(encoder: Encoder, cells, rows: np.ndarray, mode: str, genes: np.ndarray | None, limit: int,
         batch_size: int, goal: torch.Tensor | None, chunk_tokens: int = 2**23) -> dict[str, np.ndarray]:
    """Perturb the cells ``rows``; per variant: cell, position, token and the cos_sim (or, with ``goal``, the
    cosine_shift). Cells go longest first in chunks of about ``chunk_tokens`` perturbed tokens, so memory stays
    bounded on any number of cells."""
    tokens = cells.select_columns(["input_ids"]).with_format("numpy")
    lengths = np.minimum(token_column(cells, "length")[rows], limit)
    rows = rows[np.argsort(-lengths, kind="stable")]
    lengths = np.sort(lengths)[::-1]
    out = {"cell": [], "position": [], "gene": [], "value": []}
    start = 0
    while start < len(rows):
        stop = start + max(1, int(np.searchsorted(np.cumsum(lengths[start:].astype(np.int64) ** 2), chunk_tokens)))
        chunk = rows[start:stop]
        ids = [np.asarray(c[:limit], np.int64) for c in tokens[chunk.tolist()]["input_ids"]]
        blocks = [b for cell, c in zip(chunk, ids) for b in perturbed_blocks(int(cell), c, mode, genes, limit)]
        truncated = {b.cell for b in blocks if b.truncated}
        extra = [ids[int(np.flatnonzero(chunk == cell)[0])][: limit - 1] for cell in sorted(truncated)]
        states = _hidden_states(encoder, ids + extra, batch_size)
        reference = {(int(cell), False): h for cell, h in zip(chunk, states)}
        reference.update({(cell, True): h for cell, h in zip(sorted(truncated), states[len(ids) :])})

        batches = map_batches(partial(_measure, encoder, reference, goal), _batches(blocks, batch_size), encoder.device)
        for batch, values in batches:
            for (block, i, j), value in zip(batch, values):
                out["value"].append(value)
                out["cell"].append(np.full(j - i, block.cell))
                out["position"].append(block.positions[i:j])
                out["gene"].append(block.genes[i:j])
        start = stop
    return {k: np.concatenate(v) if v else np.empty(0) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# the public functions
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _Setup:
    encoder: Encoder
    gene_names: np.ndarray  # per token id, the Ensembl id it stands for in these cells
    limit: int
    genes: np.ndarray | None


def _gene_names(vocab: GeneVocab, meta: dict) -> np.ndarray:
    """Per token id, its Ensembl id in the cells' species (a token shared by orthologs reads as the mouse gene in
    mouse cells), else the token itself (cells of several or unknown species)."""
    species = cells_species(meta)
    tokens = np.asarray(vocab.tokens, dtype=object)
    if species is None:
        return tokens
    names = vocab.gene_ids(species)
    return np.where(names != "", names, tokens)


def _setup(model_dir, dataset, meta: dict, *, mode: str, genes, emb_layer: int, vocab, device, source) -> _Setup:
    """Check everything before any work: mode, the tokens against the model, the genes; then load the encoder."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model_dir = Path(model_dir)
    config = read_config(model_dir, vocab)
    positions = config.max_len or config.max_position_embeddings
    limit = length_limit(config, {**meta, "max_len": meta["max_len"] or positions}, source)
    warn_truncation(token_column(dataset, "length"), limit)
    gene_vocab = model_vocab(model_dir, config, vocab)
    if isinstance(genes, str):
        if genes != "all":
            raise ValueError(f"genes must be 'all' or a list of Ensembl ids, got {genes!r}")
        wanted = None
    else:
        wanted = gene_vocab.ids(list(genes))
        unknown = [g for g, t in zip(genes, wanted) if t < 2]
        if unknown:
            raise ValueError(f"genes {unknown[:5]} are not genes of the model's vocabulary {gene_vocab.name!r}")
        wanted = np.unique(wanted)
    device = torch.device(device) if device is not None else default_device()
    return _Setup(load_encoder(model_dir, config, emb_layer, device), _gene_names(gene_vocab, meta), limit, wanted)


def _sample(rows: np.ndarray, max_cells: int | None) -> np.ndarray:
    """At most ``max_cells`` of ``rows``: Geneformer's ``downsample_and_sort`` (a seed-42 shuffle, the first
    ``max_cells``; datasets' ``shuffle(seed=42)`` is ``default_rng(42).permutation``), returned in dataset order."""
    if max_cells is None or len(rows) <= max_cells:
        return rows
    return np.sort(rows[np.random.default_rng(42).permutation(len(rows))[:max_cells]])


def perturb(model_dir, dataset, meta: dict, *, mode: str = "delete", genes="all", emb_layer: int = 0,
            max_cells: int | None = None, batch_size: int = 64, vocab: GeneVocab | None = None, device=None,
            source: str = "the token dataset") -> pd.DataFrame:
    """Goal-free in silico perturbation: one row per (cell, perturbed gene), as Geneformer's
    ``InSilicoPerturber(emb_mode="cell", cell_states_to_model=None)``.

    ``model_dir``: any ``BertForMaskedLM`` or ``BertForSequenceClassification`` folder; ``vocab`` stands in for one
    whose config records no vocabulary (Geneformer's). ``dataset``, ``meta``: a token dataset (:func:`load_cells`),
    checked against the model first; cells longer than the model's length are cut to their top genes.
    ``genes``: ``"all"`` (every gene of every cell) or Ensembl ids, each perturbed alone (Geneformer perturbs a list
    as one group; here each gene gets its own row). ``emb_layer``: 0 the last layer, -1 the one before, down to
    ``-num_hidden_layers`` (the embeddings); Geneformer's ``hidden_states[num_layers + emb_layer]``.
    ``max_cells``: a seed-42 sample of the cells, as Geneformer's ``max_ncells``. ``batch_size``: perturbed cells
    per forward pass. ``device``: default the GPU if there is one; float32 throughout.

    Returns ``cell_index`` (row in ``dataset``), ``perturbed_position`` (0-based rank in the cell, ``-1`` for an
    absent gene inserted by overexpression), ``perturbed_token``, ``ensembl_id`` and ``cos_sim`` (mean over the
    compared genes of the cosine similarity, eps 1e-8, of their hidden states in the perturbed and original cell),
    sorted by cell and position.
    """
    s = _setup(model_dir, dataset, meta, mode=mode, genes=genes, emb_layer=emb_layer, vocab=vocab, device=device,
               source=source)
    rows = _sample(np.arange(len(dataset)), max_cells)
    r = _run(s.encoder, dataset, rows, mode, s.genes, s.limit, batch_size, goal=None)
    frame = pd.DataFrame({"cell_index": r["cell"].astype(np.int64), "perturbed_position": r["position"].astype(np.int64),
                          "perturbed_token": r["gene"].astype(np.int64),
                          "ensembl_id": s.gene_names[r["gene"].astype(np.int64)],
                          "cos_sim": r["value"].astype(np.float64)}, columns=PERTURB_COLUMNS)
    return frame.sort_values(["cell_index", "perturbed_position", "perturbed_token"], ignore_index=True)


def perturb_to_goal(model_dir, dataset, meta: dict, *, state_key: str, start, goal, mode: str = "delete",
                    genes="all", emb_layer: int = 0, max_cells: int | None = None, batch_size: int = 64,
                    vocab: GeneVocab | None = None, device=None, source: str = "the token dataset") -> pd.DataFrame:
    """The paper's perturbation toward a goal state (SPEC §7): perturb the cells whose ``state_key`` column equals
    ``start`` (values compared as strings) and measure how far each perturbation moves them toward ``goal``.

    A cell embedding is the mean of its genes' hidden states at ``emb_layer``; the goal is the mean embedding of
    all cells whose ``state_key`` is ``goal``. Per (cell, gene): ``cosine_shift = cos(perturbed, goal) -
    cos(original, goal)``, where both embeddings average the same genes: the original leaves out the perturbed gene's
    position, and an overexpressed gene's own embedding is left out of the perturbed one. (Geneformer compares the
    full-cell means instead.) Other arguments as :func:`perturb`; ``max_cells`` samples the start cells.

    Returns ``cell_index``, ``ensembl_id``, ``cosine_shift``, sorted by cell; feed it to :func:`gene_stats`.
    """
    states = token_column(dataset, state_key).astype(str)
    start_rows, goal_rows = np.flatnonzero(states == str(start)), np.flatnonzero(states == str(goal))
    for name, value, found in (("start", start, start_rows), ("goal", goal, goal_rows)):
        if len(found) == 0:
            raise ValueError(f"{source}: no cell has {state_key} == {value!r} ({name} state); its values are "
                             f"{sorted(set(states))[:10]}")
    if str(start) == str(goal):
        raise ValueError(f"start and goal state are both {start!r}")
    s = _setup(model_dir, dataset, meta, mode=mode, genes=genes, emb_layer=emb_layer, vocab=vocab, device=device,
               source=source)
    r = _run(s.encoder, dataset, _sample(start_rows, max_cells), mode, s.genes, s.limit, batch_size,
             goal=goal_embedding(s.encoder, dataset, goal_rows, s.limit, batch_size))
    frame = pd.DataFrame({"cell_index": r["cell"].astype(np.int64),
                          "ensembl_id": s.gene_names[r["gene"].astype(np.int64)],
                          "cosine_shift": r["value"].astype(np.float64)}, columns=SHIFT_COLUMNS)
    return frame.iloc[np.lexsort((r["position"], r["cell"]))].reset_index(drop=True)


def goal_embedding(encoder: Encoder, dataset, rows: np.ndarray, limit: int, batch_size: int) -> torch.Tensor:
    """The mean over the cells ``rows`` of their embeddings (gene means at the encoder's layer)."""
    tokens = dataset.select_columns(["input_ids"]).with_format("numpy")
    total = torch.zeros(encoder.width, dtype=torch.float64, device=encoder.device)
    for start in range(0, len(rows), batch_size):
        ids, mask = _padded([np.asarray(c[:limit], np.int64) for c in
                             tokens[rows[start : start + batch_size].tolist()]["input_ids"]], encoder.device)
        total += mean_pool(encoder(ids, mask), mask).double().sum(0)
    return (total / len(rows)).float()


# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------

def gene_stats(shifts: pd.DataFrame, *, symbols: dict | None = None, n_null: int = 100_000, seed: int = 42,
               alternative: str = "two-sided", null: str = "pooled") -> pd.DataFrame:
    """Per-gene statistics of :func:`perturb_to_goal` shifts, as Geneformer's ``isp_stats_to_goal_state``
    (geneformer/in_silico_perturber_stats.py, genes_perturbed="all").

    For each gene: ``n_cells`` (its shifts), ``mean_shift`` and ``p_value``, the Wilcoxon rank-sum test
    (``scipy.stats.ranksums``, Geneformer's choice) of its shifts against a null sample; ``fdr``: Benjamini-Hochberg
    over the genes (statsmodels ``multipletests(method="fdr_bh")``). Sorted by ``mean_shift``, largest first.

    ``null="pooled"`` (Geneformer's): all genes' shifts pooled, in the order of ``shifts``, down-sampled to
    ``n_null`` with ``random.seed(seed); random.sample`` when larger. Genes perturbed in many cells dominate it.
    ``null="random"``: a random-gene null, ``n_null`` draws each taking a gene uniformly at random, then one of its
    shifts uniformly at random (numpy ``default_rng(seed)``), so every gene weighs the same whatever its number of
    cells. ``alternative``: ``"two-sided"`` (Geneformer's), ``"greater"`` (the gene's shifts tend to exceed the
    null's: toward the goal) or ``"less"``. ``symbols``: Ensembl id -> gene symbol (``None`` where unknown).
    """
    from scipy.stats import ranksums
    from statsmodels.stats.multitest import multipletests

    if null not in NULLS or alternative not in ALTERNATIVES:
        raise ValueError(f"null must be one of {NULLS} and alternative one of {ALTERNATIVES}; got {null!r}, "
                         f"{alternative!r}")
    missing = {"ensembl_id", "cosine_shift"} - set(shifts.columns)
    if missing or len(shifts) == 0:
        raise ValueError(f"gene_stats needs perturb_to_goal's rows (ensembl_id, cosine_shift); got {len(shifts)} "
                         f"rows, columns {list(shifts.columns)}")
    values = shifts["cosine_shift"].to_numpy(np.float64)
    groups = shifts.groupby("ensembl_id", sort=True).indices
    if null == "pooled":
        pool = values.tolist()
        if len(pool) > n_null:
            random.seed(seed)
            pool = random.sample(pool, k=n_null)
    else:
        rng = np.random.default_rng(seed)
        members = list(groups.values())
        which = rng.integers(len(members), size=n_null)
        pool = [values[members[g][rng.integers(len(members[g]))]] for g in which]
    genes = list(groups)
    p = np.array([ranksums(values[groups[g]], pool, alternative=alternative).pvalue for g in genes])
    frame = pd.DataFrame({"ensembl_id": genes,
                          "symbol": [(symbols or {}).get(g) for g in genes],
                          "n_cells": [len(groups[g]) for g in genes],
                          "mean_shift": [values[groups[g]].mean() for g in genes],
                          "p_value": p,
                          "fdr": multipletests(p, method="fdr_bh")[1]}, columns=STATS_COLUMNS)
    return frame.sort_values("mean_shift", ascending=False, kind="stable", ignore_index=True)
