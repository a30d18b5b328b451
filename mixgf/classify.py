"""Cell-type classification (SPEC §5, Tables 1-2): the paper's split, fine-tuning, prediction.

Three functions, each usable alone:

- :func:`split_cells`: the authors' split of one organ's cells (rare types dropped, seed-42 shuffle, 80/20 cut,
  unseen test types dropped), plus a stratified validation part of the training cells that picks the best epoch.
- :func:`finetune`: a sequence-classification head on a pretrained encoder (``AutoModelForSequenceClassification``),
  trained with AdamW, warmup + cosine and length-grouped, dynamically padded batches; evaluated on validation and test
  after every epoch; the epoch best on validation is saved as a plain Hugging Face classifier.
- :func:`predict`: one row per cell, with the predicted label and its probability.

The authors (Geneformer's example notebook, which Mix-Geneformer's follows) evaluated on the test cells after every
epoch and kept the best epoch, so their test accuracy is a maximum over epochs of the test accuracy itself. Here the
epoch is chosen on validation cells carved out of the training part, and the test accuracy of every epoch is recorded
too, so the size of that leak (best-on-test minus val-selected) can be reported.

A saved classifier directory holds ``config.json`` (a ``BertConfig`` with ``id2label`` / ``label2id`` and the
pretrained model's extra keys ``vocab``, ``medians``, ``max_len``), ``model.safetensors``
(``BertForSequenceClassification`` weights), ``vocab.tsv``, ``split.json`` and ``history.json``; any Hugging Face
user loads it with ``AutoModelForSequenceClassification.from_pretrained(dir)``, no mixgf needed.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mixgf.checkpoint import (VOCAB_FILE, default_device, length_limit, model_vocab, token_column, warn_truncation,
                              with_identity)
from mixgf.collate import length_grouped_batches
from mixgf.encoder import (ACTIVATIONS, bert_layer, check_architecture, embeddings, key_mask, layer_weights,
                           map_batches)
from mixgf.io import atomic_dir, write_json_atomic
from mixgf.padding import pad_ragged
from mixgf.pretrain import configure_optimizer, lr_at
from mixgf.stats import accuracy, macro_f1
from mixgf.vocab import GeneVocab

SPLIT_FILE = "split.json"
HISTORY_FILE = "history.json"
TOKEN_COLUMNS = ("input_ids", "length")  # every other column of a token dataset is an obs column


# ---------------------------------------------------------------------------------------------------------------
# the split
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """Row indices (into the dataset) of the training, validation and test cells, and the labels kept.

    ``labels`` are the sorted cell types of the 80% training part (train + val): the classes of the classifier.
    ``dropped_types`` maps each rare type removed before the shuffle to its number of cells; ``n_unseen_test`` counts
    test cells removed because their type never appeared in the training part.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    labels: tuple[str, ...]
    dropped_types: dict[str, int] = field(default_factory=dict)
    n_unseen_test: int = 0

    def to_json(self) -> dict:
        return {"train": self.train.tolist(), "val": self.val.tolist(), "test": self.test.tolist(),
                "labels": list(self.labels), "dropped_types": dict(self.dropped_types),
                "n_unseen_test": self.n_unseen_test}


def split_cells(labels, *, min_fraction: float = 0.005, test_fraction: float = 0.2, val_fraction: float = 0.1,
                seed: int = 42) -> Split:
    """The paper's split of one organ's cells by their ``labels`` (one per dataset row; compared as strings).

    1. Drop the cell types holding ``<= min_fraction`` of the cells (the authors keep ``count > 0.005 * n``).
    2. Shuffle the remaining rows with ``numpy.random.default_rng(seed).permutation``: exactly what the authors'
       ``datasets.Dataset.shuffle(seed=42)`` does on the filtered dataset, so the same cells land in the same parts.
    3. The first ``round(n_kept * (1 - test_fraction))`` rows (Python's ``round``, as the authors) are the training
       part, the rest the test part; test rows whose type is not in the training part are dropped.
    4. Our addition: ``val_fraction`` of the training part becomes the validation cells, stratified by type
       (``floor(val_fraction * count + 0.5)`` cells of each type, chosen with ``default_rng([seed, 1])``, never a
       type's last cell, so a type with one training cell keeps it in training). ``val_fraction=0`` gives none.
    """
    labels = np.asarray(labels).astype(str)
    if not 0 <= min_fraction < 1 or not 0 < test_fraction < 1 or not 0 <= val_fraction < 1:
        raise ValueError(f"need 0 <= min_fraction < 1, 0 < test_fraction < 1, 0 <= val_fraction < 1; got "
                         f"{min_fraction}, {test_fraction}, {val_fraction}")
    n = len(labels)
    types, counts = np.unique(labels, return_counts=True)
    rare = counts <= min_fraction * n
    kept = np.flatnonzero(~np.isin(labels, types[rare]))
    shuffled = kept[np.random.default_rng(seed).permutation(len(kept))]
    n_train = round(len(kept) * (1 - test_fraction))
    train, test = shuffled[:n_train], shuffled[n_train:]
    classes = np.unique(labels[train])
    seen = np.isin(labels[test], classes)
    if len(train) == 0:
        raise ValueError(f"no training cells: {n} cells, {int((~rare).sum())} types above {min_fraction:.1%}")

    rng = np.random.default_rng([seed, 1])
    val = []
    for c in classes:
        rows = train[labels[train] == c]
        k = min(int(math.floor(val_fraction * len(rows) + 0.5)), len(rows) - 1)
        val.append(rng.permutation(rows)[:k])
    val = np.sort(np.concatenate(val)) if val else np.empty(0, np.int64)
    return Split(train=train[~np.isin(train, val)].astype(np.int64), val=val.astype(np.int64),
                 test=test[seen].astype(np.int64), labels=tuple(classes.tolist()),
                 dropped_types={str(t): int(c) for t, c in zip(types[rare], counts[rare])},
                 n_unseen_test=int((~seen).sum()))


# ---------------------------------------------------------------------------------------------------------------
# fine-tuning
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class FinetuneConfig:
    """Fine-tuning settings; the defaults are the paper's (SPEC §5) unless marked otherwise.

    - ``lr`` 5e-5, ``warmup_steps`` 500, ``epochs`` 10, ``batch_size`` 12, ``weight_decay`` 0.001, ``seed`` 42, a
      cosine schedule after a linear warmup and no frozen layers: SPEC §5.
    - ``warmup_fraction`` 0.1 (ours): the warmup is ``min(warmup_steps, warmup_fraction x total steps)``. On an
      organ of a few thousand cells 500 steps are most of the run, and with fewer steps than that the learning rate
      would never leave its warmup (the authors' Trainer did exactly that on small organs); 1.0 gives the paper's.
    - ``grad_clip`` 1.0: the Hugging Face Trainer's default ``max_grad_norm``, which the authors ran.
    - ``megabatch`` 50: length grouping as the Trainer's ``group_by_length`` (mega-batches of 50 batches sorted by
      length); ``pad_to_multiple_of`` 8 keeps GPU matmuls on tensor-core shapes.
    - ``dtype``: autocast dtype on GPUs ("bfloat16" or "float32"); CPU always runs in float32.
    - ``max_len`` (ours): keep at most this many top-ranked genes per cell, below the model's own length (``None``:
      the model's). The classifier then records it as its ``max_len``.
    - ``min_fraction`` 0.005, ``test_fraction`` 0.2: the paper's split; ``val_fraction`` 0.1 (ours) of the training
      part picks the best epoch (see :func:`split_cells`).
    - ``eval_batch_size`` 64: at most this many cells a batch when evaluating (no gradients, so larger; on a CPU
      also at most :func:`batch_tokens` tokens).
    """

    lr: float = 5e-5
    warmup_steps: int = 500
    warmup_fraction: float = 0.1
    epochs: int = 10
    batch_size: int = 12
    weight_decay: float = 0.001
    grad_clip: float = 1.0
    megabatch: int = 50
    pad_to_multiple_of: int = 8
    seed: int = 42
    dtype: str = "bfloat16"
    max_len: int | None = None
    min_fraction: float = 0.005
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    eval_batch_size: int = 64

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        for name in ("epochs", "batch_size", "megabatch", "pad_to_multiple_of", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or not 0 <= self.warmup_fraction <= 1:
            raise ValueError(f"need warmup_steps >= 0 and 0 <= warmup_fraction <= 1, got {self.warmup_steps}, "
                             f"{self.warmup_fraction}")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len must be >= 1 or None, got {self.max_len}")

    def warmup(self, total_steps: int) -> int:
        """The warmup steps of a run of ``total_steps``: ``min(warmup_steps, warmup_fraction x total_steps)``."""
        return min(self.warmup_steps, int(self.warmup_fraction * total_steps))


@dataclass
class FinetuneResult:
    """The classifier (best epoch by validation accuracy, on CPU), its split and per-epoch history.

    ``history`` has one dict per epoch: ``epoch`` (1-based), ``train_loss``, ``val_accuracy``, ``val_macro_f1``,
    ``test_accuracy``, ``test_macro_f1``. ``metrics`` are those of the selected epoch plus the authors' view,
    ``test_accuracy_best_on_test`` (the best test accuracy over epochs) and ``test_selection_gain`` (it minus the
    val-selected test accuracy). ``test_predictions``: predicted labels of ``split.test`` at the selected epoch.
    """

    model: torch.nn.Module
    split: Split
    history: list[dict]
    best_epoch: int
    metrics: dict
    test_predictions: np.ndarray
    out_dir: Path


def _autocast(device: torch.device, dtype: str):
    if device.type == "cpu" or dtype == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _read_config(model_dir: Path, vocab: GeneVocab | None):
    """The model's transformers config (fine-tuning edits and saves it) with the identity attributes the checks read."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    check_architecture(config)
    return with_identity(config, model_dir, vocab)


class _Cells:
    """Padded batches of a token dataset's rows, each cell cut to its ``limit`` top-ranked genes. Rows are read as
    Arrow lists (flat values and offsets, no Python object per cell: building a batch costs little beside the model)."""

    def __init__(self, dataset, limit: int, positions: int, pad_to_multiple_of: int, device: torch.device):
        self.tokens = dataset.select_columns(["input_ids"]).with_format("arrow")
        self.lengths = np.minimum(token_column(dataset, "length"), limit)
        self.limit, self.positions, self.multiple, self.device = limit, positions, pad_to_multiple_of, device
        self.table: np.ndarray | None = None  # token id -> row of a compact embedding (see _CompactEmbedding)

    def _ragged(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The cells ``rows`` as (values, starts, lengths): cell i is ``values[starts[i] : starts[i] + lengths[i]]``,
        cut to ``limit`` genes."""
        lists = self.tokens[rows.tolist()]["input_ids"].combine_chunks()
        offsets = lists.offsets.to_numpy()  # into lists.values, which ignores a slice's offset as these do
        return lists.values.to_numpy(), offsets[:-1], np.minimum(np.diff(offsets), self.limit)

    def genes(self, rows: np.ndarray, chunk: int = 1_000) -> np.ndarray:
        """The sorted token ids in the cells ``rows`` (each cut to its top ``limit`` genes), ``<pad>`` included."""
        seen = [np.array([GeneVocab.pad_id])]
        for start in range(0, len(rows), chunk):
            values, starts, lengths = self._ragged(rows[start : start + chunk])
            seen.append(np.unique(pad_ragged(values, starts, lengths)[0].numpy()))
        return np.unique(np.concatenate(seen))

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._padded(*self._ragged(rows))

    def _padded(self, values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, mask = pad_ragged(values, starts, lengths, self.multiple, self.positions, self.table)
        return (input_ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True))

    def by_length(self, rows: np.ndarray, batch_size: int, max_tokens: int | None = None, chunk: int = 8192):
        """``rows`` longest first, in batches of at most ``batch_size`` cells and, with ``max_tokens``, at most that
        many tokens, counted as cells x the longest cell's genes (one cell at least): (positions into ``rows``, batch)
        pairs. The tokens are gathered from the Arrow column for whole batches of about ``chunk`` cells at once, not a
        batch at a time: the gather's fixed cost, paid per call, was most of the time spent building batches, on the
        thread that feeds the cores."""
        order = np.argsort(-self.lengths[rows], kind="stable")
        longest, edges = self.lengths[rows][order], [0]
        while edges[-1] < len(order):
            size = batch_size if max_tokens is None else min(batch_size, max(max_tokens // int(longest[edges[-1]]), 1))
            edges.append(min(edges[-1] + size, len(order)))
        edges, first = np.asarray(edges), 0
        while first < len(edges) - 1:
            last = max(int(np.searchsorted(edges, edges[first] + chunk, side="right")) - 1, first + 1)
            part = order[edges[first] : edges[last]]
            values, starts, lengths = self._ragged(rows[part])
            for lo, hi in zip(edges[first:last] - edges[first], edges[first + 1 : last + 1] - edges[first]):
                yield part[lo:hi], self._padded(values, starts[lo:hi], lengths[lo:hi])
            first = last


def parameters_by_name(model) -> dict[str, torch.Tensor]:
    """A ``BertForSequenceClassification``'s parameters by their ``BertModel`` names (what the encoder functions
    read); a training loop takes them once, not every step."""
    return {name.removeprefix("bert."): p for name, p in model.named_parameters()}


def classifier_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The logits of a ``BertForSequenceClassification``, computed from its own parameters (``weights``:
    :func:`parameters_by_name`, taken here if not given) as its forward pass does (dropout in training mode), but the
    last layer only at position 0: the pooler reads nothing else. On a 2-layer model that halves the work of a
    training step; on any, it drops the last layer's other positions."""
    config = model.config
    weights = weights if weights is not None else parameters_by_name(model)
    dropout = config.hidden_dropout_prob if model.training else 0.0
    attention_dropout = config.attention_probs_dropout_prob if model.training else 0.0
    h = embeddings(input_ids, weights, config.layer_norm_eps, padding_idx=model.get_input_embeddings().padding_idx,
                   dropout=dropout)
    keys, act, last = key_mask(attention_mask), ACTIVATIONS[config.hidden_act], config.num_hidden_layers - 1
    for i in range(config.num_hidden_layers):
        h = bert_layer(h, layer_weights(weights, i), config.num_attention_heads, config.layer_norm_eps, act, keys,
                       dropout=dropout, attention_dropout=attention_dropout, first_only=i == last,
                       inplace=not torch.is_grad_enabled())
    pooled = model.bert.pooler.activation(model.bert.pooler.dense(h[:, 0]))
    return model.classifier(model.dropout(pooled))


def batch_tokens(device: torch.device, max_tokens: int | None = None) -> int | None:
    """The most tokens (cells x the longest cell's genes) a batch holds when running a model without gradients:
    ``max_tokens`` if given, else 4,096 on a CPU, where a batch's activations then stay in the caches (on demo cells
    7-29% faster than 64 cells a batch at 1 and 2 threads: 16 cells of 256 genes, 32 of 128; see the README's
    performance section), and no limit on a GPU."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    return max_tokens or (None if device.type == "cuda" else 4096)


def _probabilities(model, cells: _Cells, rows: np.ndarray, batch_size: int, autocast,
                   max_tokens: int | None = None) -> np.ndarray:
    """Class probabilities (len(rows), n_labels), float32, in the order of ``rows``; batches side by side on a
    CPU's cores (:func:`mixgf.encoder.map_batches`), each of at most ``batch_size`` cells and
    :func:`batch_tokens` tokens."""
    model.eval()
    out = np.empty((len(rows), model.config.num_labels), np.float32)
    weights = parameters_by_name(model)

    def probabilities(batch) -> tuple[np.ndarray, np.ndarray]:
        where, (input_ids, mask) = batch
        with torch.no_grad(), autocast:  # no_grad is per thread: here, in the worker's
            logits = classifier_logits(model, input_ids, mask, weights)
        return where, torch.softmax(logits.float(), -1).cpu().numpy()

    batches = cells.by_length(rows, batch_size, batch_tokens(cells.device, max_tokens))
    for where, probs in map_batches(probabilities, batches, cells.device):
        out[where] = probs
    return out


class _CompactEmbedding:
    """Fine-tune only the word-embedding rows of the genes the cells hold: the same weights, less optimizer work.

    A gene absent from every training, validation and test cell gets no gradient, so AdamW never moves its row but
    to decay it (``row *= 1 - lr * weight_decay`` each step, Adam's moments staying 0). The model therefore trains
    with an embedding of only the cells' genes (a few thousand of the 82,606 rows, whose AdamW update otherwise
    dominates a step of a small model) and :meth:`restore` writes them back into the full matrix, the other rows
    decayed by the product of the steps' factors.
    """

    def __init__(self, model, genes: np.ndarray):
        self.full, self.genes = model.get_input_embeddings(), torch.from_numpy(genes)
        self.table = np.zeros(self.full.num_embeddings, np.int64)
        self.table[genes] = np.arange(len(genes))
        padding = None if self.full.padding_idx is None else int(self.table[self.full.padding_idx])
        # from_pretrained draws no random numbers, so dropout sees the same generator as with the full embedding
        model.set_input_embeddings(torch.nn.Embedding.from_pretrained(self.full.weight.data[self.genes], freeze=False,
                                                                      padding_idx=padding))

    def restore(self, model, decay: float) -> None:
        """Put the full embedding back: the trained rows from ``model``, the others times ``decay``."""
        weight = self.full.weight.data
        weight.mul_(decay)
        weight[self.genes] = model.get_input_embeddings().weight.data.to(weight)
        model.set_input_embeddings(self.full)


class _FlatGroups:
    """The optimizer's parameter groups, each held in one flat tensor: every parameter's data and gradient become
    views into its group's tensor and gradient (autograd accumulates into an existing gradient in place), so gradient
    clipping and fused AdamW run on a few tensors instead of dozens, the same arithmetic per element. A parameter
    ``apart`` (the word embedding: thousands of rows, whose fresh gradient autograd hands over without a copy) keeps
    its own tensor, in a group of its own. :meth:`release` gives the parameters storage of their own again."""

    def __init__(self, groups: list[dict], apart: torch.nn.Parameter | None = None):
        self.apart, self.groups, self.params = apart, [], []
        for group in groups:
            params = [p for p in group["params"] if p is not apart]
            if len(params) < len(group["params"]):
                self.groups.append({**group, "params": [apart]})
            if not params:
                continue
            flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
            flat.grad = torch.zeros_like(flat)
            start = 0
            for p in params:
                p.data, p.grad = (t[start : start + p.numel()].view_as(p) for t in (flat.data, flat.grad))
                start += p.numel()
            self.groups.append({**group, "params": [flat]})
            self.params += params

    @property
    def tensors(self) -> list[torch.nn.Parameter]:
        return [g["params"][0] for g in self.groups]

    def zero_grad(self) -> None:
        for tensor in self.tensors:
            if tensor is self.apart:
                tensor.grad = None
            else:
                tensor.grad.zero_()

    def release(self) -> None:
        for p in self.params:
            p.data, p.grad = p.data.clone(), None


def _epoch_batches(lengths: np.ndarray, cfg: FinetuneConfig, epoch: int) -> list[np.ndarray]:
    """Length-grouped batches of one epoch (positions into ``lengths``); the cells the grouping leaves over form one
    last, smaller batch, so every training cell is seen every epoch."""
    batches = list(length_grouped_batches(lengths, cfg.batch_size, cfg.megabatch, seed=[cfg.seed, epoch]))
    rest = np.setdiff1d(np.arange(len(lengths)), np.concatenate(batches) if batches else [])
    return batches + ([rest] if len(rest) else [])


def _load_classifier(model_dir: Path, config, random_init: bool):
    from transformers import AutoModelForSequenceClassification

    if random_init:
        return AutoModelForSequenceClassification.from_config(config)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_dir, config=config, dtype=torch.float32, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not k.startswith("classifier.")]
    if any(not k.startswith("bert.pooler.") for k in missing):
        raise ValueError(f"{model_dir}: the checkpoint lacks encoder weights such as {missing[:3]}; it is not a "
                         "BERT checkpoint this classifier can start from")
    if missing:
        warnings.warn(f"{model_dir} has no BERT pooler weights (a BertForMaskedLM checkpoint): the classifier starts "
                      "from a fresh pooler", stacklevel=3)
    return model


def finetune(pretrained_dir, dataset, meta: dict, label: str, cfg: FinetuneConfig | None = None, *, out_dir,
             random_init: bool = False, vocab: GeneVocab | None = None,
             source: str = "the token dataset") -> FinetuneResult:
    """Fine-tune the pretrained model in ``pretrained_dir`` to predict column ``label`` of a token dataset.

    ``dataset``, ``meta``: a token dataset and its metadata (:func:`mixgf.tokens.load_tokens`), checked against the
    model (vocabulary, medians, length) before any work. The cells are split by :func:`split_cells`; the model is
    ``AutoModelForSequenceClassification`` on the pretrained encoder, or with ``random_init`` the same architecture
    with fresh weights (the "no pretraining" control). ``vocab`` is the checkpoint's vocabulary when its config records
    none (a Geneformer V1 checkpoint): it is then used for the check and saved with the classifier.

    Trains with AdamW (no decay on biases and LayerNorm), warmup + cosine, gradient clipping and length-grouped,
    dynamically padded batches, only the embedding rows of the cells' genes (:class:`_CompactEmbedding`; the same
    weights as training every row), on the GPU in bf16 autocast when there is one; evaluates validation and test cells
    after every epoch and keeps the epoch of best validation accuracy (the first, on ties; the last when there are
    no validation cells). Writes ``out_dir`` atomically: the classifier (``save_pretrained``, with ``id2label`` /
    ``label2id``), ``vocab.tsv``, ``split.json`` (indices, labels, label column, dataset fingerprint) and
    ``history.json`` (per-epoch metrics, settings).
    """
    cfg = cfg or FinetuneConfig()
    pretrained_dir = Path(pretrained_dir)
    config = _read_config(pretrained_dir, vocab)
    limit = length_limit(config, meta, source)
    if cfg.max_len is not None:
        limit = min(limit, cfg.max_len)
    gene_vocab = model_vocab(pretrained_dir, config, vocab)
    labels = token_column(dataset, label)
    split = split_cells(labels, min_fraction=cfg.min_fraction, test_fraction=cfg.test_fraction,
                        val_fraction=cfg.val_fraction, seed=cfg.seed)
    names = labels.astype(str)
    label_of = {name: i for i, name in enumerate(split.labels)}
    targets = np.array([label_of.get(name, -1) for name in names])

    config.id2label = dict(enumerate(split.labels))
    config.label2id = dict(label_of)
    config.problem_type = "single_label_classification"
    config.max_len = limit if cfg.max_len is not None else config.max_len
    torch.manual_seed(cfg.seed)
    model = _load_classifier(pretrained_dir, config, random_init)

    device = default_device()
    cells = _Cells(dataset, limit, config.max_position_embeddings, cfg.pad_to_multiple_of, device)
    used = np.concatenate([split.train, split.val, split.test])
    warn_truncation(token_column(dataset, "length")[used], limit)
    embedding = _CompactEmbedding(model, cells.genes(used))
    cells.table = embedding.table
    model.to(device)
    autocast = _autocast(device, cfg.dtype)

    steps_per_epoch = len(_epoch_batches(cells.lengths[split.train], cfg, 0))
    total = cfg.epochs * steps_per_epoch
    schedule = SimpleNamespace(lr=cfg.lr, warmup_steps=cfg.warmup(total), weight_decay=cfg.weight_decay)
    # the decay groups of pretraining (matrices and embeddings only), each one flat tensor, in fused AdamW (what the
    # Trainer runs too)
    flat = _FlatGroups([{"params": g["params"], "weight_decay": g["weight_decay"]}
                        for g in configure_optimizer(model, schedule).param_groups],
                       apart=model.get_input_embeddings().weight)
    optimizer = torch.optim.AdamW(flat.groups, lr=cfg.lr, fused=True)
    weights = parameters_by_name(model)
    train_targets = torch.as_tensor(targets, dtype=torch.long)

    def evaluate(rows: np.ndarray) -> tuple[np.ndarray, float | None, float | None]:
        if len(rows) == 0:
            return np.empty(0, np.int64), None, None
        pred = _probabilities(model, cells, rows, cfg.eval_batch_size, autocast).argmax(1)
        return pred, accuracy(targets[rows], pred), macro_f1(targets[rows], pred)

    history, best, best_epoch, best_state, best_test, best_decay = [], -1.0, 0, None, None, 1.0
    step, decay = 0, 1.0  # decay: the product of AdamW's weight-decay factors so far
    for epoch in range(cfg.epochs):
        model.train()
        losses = []
        for batch in _epoch_batches(cells.lengths[split.train], cfg, epoch):
            rows = split.train[batch]
            lr = lr_at(step, schedule, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            decay *= 1 - lr * cfg.weight_decay
            input_ids, mask = cells.batch(rows)
            with autocast:
                logits = classifier_logits(model, input_ids, mask, weights)
            loss = F.cross_entropy(logits.float(), train_targets[torch.from_numpy(rows)].to(device, non_blocking=True))
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(flat.tensors, cfg.grad_clip)
            optimizer.step()
            flat.zero_grad()
            losses.append(loss.detach())
            step += 1
        _, val_acc, val_f1 = evaluate(split.val)
        test_pred, test_acc, test_f1 = evaluate(split.test)
        history.append({"epoch": epoch + 1, "train_loss": float(torch.stack(losses).mean()),
                        "val_accuracy": val_acc, "val_macro_f1": val_f1,
                        "test_accuracy": test_acc, "test_macro_f1": test_f1})
        score = val_acc if val_acc is not None else float(epoch)  # no validation cells: keep the last epoch
        if score > best:
            best, best_epoch, best_test, best_decay = score, epoch + 1, test_pred, decay
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    flat.release()
    model.load_state_dict(best_state)
    model.to(torch.device("cpu")).eval()
    embedding.restore(model, best_decay)
    selected = history[best_epoch - 1]
    test_accs = [h["test_accuracy"] for h in history if h["test_accuracy"] is not None]
    metrics = {"best_epoch": best_epoch, **{k: selected[k] for k in selected if k != "epoch"},
               "test_accuracy_best_on_test": max(test_accs) if test_accs else None,
               "test_selection_gain": max(test_accs) - selected["test_accuracy"] if test_accs else None,
               "n_train": len(split.train), "n_val": len(split.val), "n_test": len(split.test),
               "n_labels": len(split.labels), "warmup_steps": schedule.warmup_steps, "total_steps": total}

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        gene_vocab.write(tmp / VOCAB_FILE)
        write_json_atomic(tmp / SPLIT_FILE, {"label": label, "n_rows": len(dataset), "seed": cfg.seed,
                                             "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
                                             **split.to_json()})
        write_json_atomic(tmp / HISTORY_FILE, {"pretrained": str(pretrained_dir), "random_init": random_init,
                                               "config": asdict(cfg), "metrics": metrics, "history": history})
    return FinetuneResult(model=model, split=split, history=history, best_epoch=best_epoch, metrics=metrics,
                          test_predictions=np.asarray(split.labels, dtype=object)[
                              best_test if best_test is not None else np.empty(0, np.int64)], out_dir=out_dir)


# ---------------------------------------------------------------------------------------------------------------
# prediction
# ---------------------------------------------------------------------------------------------------------------

def predict(classifier_dir, dataset, meta: dict, *, batch_size: int = 64, max_tokens: int | None = None,
            dtype: str = "bfloat16", vocab: GeneVocab | None = None, source: str = "the token dataset") -> pd.DataFrame:
    """The classifier's prediction for every cell of a token dataset, in dataset order.

    Columns: ``cell_index`` (row in the dataset), the dataset's obs columns (all but ``input_ids`` and ``length``),
    ``predicted`` (label) and ``probability`` (of that label). The tokens must share the classifier's vocabulary
    (``ValueError`` otherwise); medians are checked only for species the model was trained on, so a classifier
    fine-tuned on mouse cells runs on human cells of the same vocabulary. ``vocab`` stands in for a classifier whose
    config records no vocabulary. Cells are batched longest first (less padding), at most ``batch_size`` cells and
    :func:`batch_tokens` tokens (``max_tokens``) at a time; ``dtype`` is the autocast dtype on GPUs.
    """
    from transformers import AutoModelForSequenceClassification

    classifier_dir = Path(classifier_dir)
    config = _read_config(classifier_dir, vocab)
    limit = length_limit(config, meta, source)
    warn_truncation(token_column(dataset, "length"), limit)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir, config=config, dtype=torch.float32)
    device = default_device()
    model.to(device)
    cells = _Cells(dataset, limit, config.max_position_embeddings, 8, device)
    probs = _probabilities(model, cells, np.arange(len(dataset)), batch_size, _autocast(device, dtype), max_tokens)
    best = probs.argmax(1)
    obs = [c for c in dataset.column_names if c not in TOKEN_COLUMNS]
    frame = dataset.select_columns(obs).to_pandas() if obs else pd.DataFrame(index=range(len(dataset)))
    frame.insert(0, "cell_index", np.arange(len(dataset)))
    frame["predicted"] = [config.id2label[int(i)] for i in best]
    frame["probability"] = probs[np.arange(len(best)), best]
    return frame
