"""Did pretraining learn context? A model's masked-gene loss on held-out cells beside a unigram predictor's.

A model that learned only how often each gene occurs reaches the loss of the unigram predictor, ``-log p(gene)``
with ``p`` the gene's frequency in the pretraining corpus; what the model gains below it, it learned from the other
genes of the cell. Both are scored on the same masked positions (BERT's 80/10/10 recipe of
:class:`~mixgf.collate.MLMCollator`, seeded per cell), and the gain's interval comes from a bootstrap over cells,
so a model "at the unigram loss" is a statement with an error bar.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mixgf.collate import MLMCollator, cell_seed
from mixgf.model import IGNORE_INDEX
from mixgf.stats import _interval, bootstrap_indices
from mixgf.vocab import GeneVocab


def gene_frequencies(dataset, vocab_size: int, *, max_cells: int | None = None, chunk: int = 10_000) -> np.ndarray:
    """p(gene) over the token ids of ``dataset`` (streamed in chunks of cells), with add-one smoothing so that a gene
    the corpus never shows keeps a finite loss; 0 for <pad> and <mask>. ``max_cells``: an evenly spaced sample."""
    rows = np.arange(len(dataset))
    if max_cells is not None and len(rows) > max_cells:
        rows = np.linspace(0, len(rows) - 1, max_cells).astype(np.int64)
    tokens = dataset.select_columns(["input_ids"]).with_format("numpy")
    counts = np.zeros(vocab_size, np.float64)
    for start in range(0, len(rows), chunk):
        cells = tokens[rows[start : start + chunk].tolist()]["input_ids"]
        counts += np.bincount(np.concatenate(list(cells)).astype(np.int64), minlength=vocab_size)[:vocab_size]
    counts[2:] += 1.0
    counts[:2] = 0.0
    return counts / counts.sum()


@torch.inference_mode()
def evaluate_mlm(model, dataset, vocab: GeneVocab, frequencies: np.ndarray, *, species: str, batch_size: int = 32,
                 max_cells: int | None = None, seed: int = 0, n_boot: int = 2000, level: float = 0.95) -> dict:
    """MLM loss (nats per masked gene) of ``model`` (a :class:`~mixgf.model.MixGFForPretraining`, eval mode) on
    the cells of ``dataset`` (one species, ``species``; at most ``max_cells``, a seeded sample), beside the unigram
    predictor ``frequencies`` (:func:`gene_frequencies`) on the same masked genes.

    Returns ``cells``, ``masked_genes``, ``mlm_loss``, ``unigram_loss``, ``gain`` (unigram minus model loss; > 0:
    the model uses context) with ``gain_low``/``gain_high`` (percentile bootstrap over cells, ``n_boot``
    resamples), and top-1 ``accuracy`` and ``unigram_accuracy`` (the most frequent gene) on the masked genes.
    """
    rng = np.random.default_rng(seed)
    rows = np.arange(len(dataset))
    if max_cells is not None and len(rows) > max_cells:
        rows = np.sort(rng.choice(rows, max_cells, replace=False))
    tokens = dataset.select_columns(["input_ids"]).with_format("numpy")
    lengths = np.asarray(dataset.select_columns(["length"]).to_pandas()["length"])[rows]
    collate = MLMCollator.for_vocab(vocab, [species], max_length=model.config.max_position_embeddings)
    device = next(model.parameters()).device
    log_p = torch.from_numpy(np.log(np.where(frequencies > 0, frequencies, 1.0))).to(device)
    top_gene = int(np.argmax(frequencies))
    per_cell = np.zeros((len(rows), 5))  # model loss, unigram loss, masked genes, model hits, unigram hits
    model.eval()
    order = np.argsort(-lengths, kind="stable")  # longest first: batches hardly need padding
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        cells = rows[batch]
        inputs = collate(tokens[cells.tolist()]["input_ids"], [0] * len(cells), [cell_seed(seed, 0, c) for c in cells])
        inputs = {k: v.to(device) for k, v in inputs.items()}
        masked = inputs["labels"] != IGNORE_INDEX
        hidden = model.bert(inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        logits = model.cls(hidden[masked]).float()
        target = inputs["labels"][masked]
        which = masked.nonzero()[:, 0]
        values = torch.stack([F.cross_entropy(logits, target, reduction="none"), -log_p[target],
                              torch.ones_like(target, dtype=torch.float64), (logits.argmax(-1) == target).double(),
                              (target == top_gene).double()], 1).double()
        per_cell[batch] += torch.zeros(len(cells), 5, dtype=torch.float64, device=device).index_add_(0, which, values).cpu().numpy()
    model_loss, unigram_loss, n, hits, unigram_hits = per_cell.T
    gain = (unigram_loss.sum() - model_loss.sum()) / n.sum()
    idx = bootstrap_indices(len(rows), n_boot, seed)
    draws = (unigram_loss[idx].sum(1) - model_loss[idx].sum(1)) / n[idx].sum(1)
    low, high = _interval(draws, level)
    return {"cells": int(len(rows)), "masked_genes": int(n.sum()), "mlm_loss": float(model_loss.sum() / n.sum()),
            "unigram_loss": float(unigram_loss.sum() / n.sum()), "gain": float(gain), "gain_low": low,
            "gain_high": high, "accuracy": float(hits.sum() / n.sum()),
            "unigram_accuracy": float(unigram_hits.sum() / n.sum())}
