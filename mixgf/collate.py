"""Batches for pretraining: length-grouped batches of cells, padded per batch and masked for MLM (SPEC §4).

Cells hold from a few hundred to 2,048 genes. Padding every batch to 2,048 would spend most of a step on padding, so
batches are drawn from length-sorted mega-batches and padded only to their longest cell.

Everything random here is a pure function of the seed and the step (batch order) or of the seed, the epoch and the
cell (masking). So a resumed run needs only its step, DataLoader workers can build batches in any order, and
2 processes of 8 cells mask exactly as one process of 16 does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mixgf.model import IGNORE_INDEX
from mixgf.padding import pad_batch
from mixgf.vocab import GeneVocab, ortholog_targets


def cell_seed(seed: int, epoch: int, cell: int) -> int:
    """The seed of one cell's masking in one epoch: independent streams for every (seed, epoch, cell)."""
    return int(np.random.SeedSequence([seed, epoch, cell]).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class MLMCollator:
    """Pads token sequences into a batch and masks genes for masked-language modelling (BERT's 80/10/10 recipe).

    Each gene is chosen with probability ``mlm_probability``, and a cell where none was chosen gets one chosen gene
    (a cell without a target would give an undefined loss); a chosen gene becomes ``<mask>`` (80%), a random gene
    (10%) or stays as it is (10%), and only chosen genes carry a label (-100 elsewhere). Random replacements are
    drawn from ``replacements[species]``, the genes of the cell's own species: with the unified vocabulary a human
    cell must not be taught that mouse genes appear in it. Each cell draws from its own generator (``seeds``), so a
    cell's masks do not depend on the batch it is in.

    With ``orthologs`` (per species code, a table from token id to the token of its one-to-one ortholog in the other
    species, -1 for none; :func:`mixgf.vocab.ortholog_targets`) the batch also holds every cell rendered in the other
    species' tokens, unmasked: its genes that have an ortholog, in their rank order (``ortholog_input_ids``,
    ``ortholog_attention_mask``), for the cross-species contrastive term.
    """

    replacements: Sequence[torch.Tensor]  # per species code: the token ids a random replacement draws from
    mlm_probability: float = 0.15
    pad_to_multiple_of: int = 1  # 8 keeps GPU matmuls on tensor-core shapes
    max_length: int | None = None  # the model's positions: padding never goes past them
    orthologs: Sequence[torch.Tensor] | None = None  # per species code: token id -> ortholog's token id, -1 none

    @classmethod
    def for_vocab(cls, vocab: GeneVocab, species: Sequence[str], *, orthologs: bool = False, **kwargs) -> MLMCollator:
        """A collator whose species code ``k`` draws replacements from the genes of ``species[k]`` in ``vocab``
        (and, with ``orthologs``, renders its cells in the other species' tokens through the bundled table)."""
        tables = tuple(torch.from_numpy(ortholog_targets(vocab, s)) for s in species) if orthologs else None
        return cls(tuple(torch.from_numpy(vocab.species_ids(s)) for s in species), orthologs=tables, **kwargs)

    def __call__(self, sequences: Sequence[Sequence[int] | torch.Tensor], species: Sequence[int],
                 seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask", "labels"}``, each (N, L); ``species`` are codes into ``replacements``,
        ``seeds`` one per cell (:func:`cell_seed`)."""
        input_ids, attention_mask = pad_batch(sequences, self.pad_to_multiple_of, self.max_length)
        uniform = torch.ones(4, *input_ids.shape)  # chosen?, which action, which replacement, fallback position
        for row, (sequence, seed) in enumerate(zip(sequences, seeds)):
            uniform[:, row, : len(sequence)] = torch.rand(4, len(sequence), generator=torch.Generator().manual_seed(seed))
        is_gene = attention_mask.bool()
        chosen = (uniform[0] < self.mlm_probability) & is_gene
        lengths = attention_mask.sum(1)
        fallback = (uniform[3, :, 0] * lengths).long().clamp(max=lengths - 1)  # one position for a cell with none
        none = ~chosen.any(1) & (lengths > 0)
        chosen[none.nonzero()[:, 0], fallback[none]] = True

        labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
        input_ids[chosen & (uniform[1] < 0.8)] = GeneVocab.mask_id
        to_random = chosen & (uniform[1] >= 0.8) & (uniform[1] < 0.9)
        rows, cols = to_random.nonzero(as_tuple=True)
        codes = torch.as_tensor(species, dtype=torch.long)[rows]
        for code, pool in enumerate(self.replacements):
            here = codes == code
            picks = (uniform[2, rows[here], cols[here]] * len(pool)).long().clamp(max=len(pool) - 1)
            input_ids[rows[here], cols[here]] = pool[picks]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.orthologs is not None:
            rendered = [self.orthologs[code][torch.as_tensor(s, dtype=torch.long)] for s, code in zip(sequences, species)]
            batch["ortholog_input_ids"], batch["ortholog_attention_mask"] = pad_batch(
                [r[r >= 0] for r in rendered], self.pad_to_multiple_of, self.max_length)
        return batch


def length_grouped_batches(lengths: np.ndarray, batch_size: int, megabatch: int,
                           seed: int | Sequence[int]) -> np.ndarray:
    """One epoch of batches, a (n_batches, batch_size) array of row indices (a last partial batch is dropped).

    The rows are shuffled (seeded by ``seed``), cut into mega-batches of ``megabatch`` batches, each mega-batch is
    sorted by length (longest first) and cut into batches, and the batch order is shuffled. ``megabatch=1`` gives
    plain random batches. One array, not a Python object per batch: 50 M cells make 6 M batches an epoch.
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    size = megabatch * batch_size
    full, rest = order[: len(order) // size * size].reshape(-1, size), order[len(order) // size * size:]
    full = np.take_along_axis(full, np.argsort(-lengths[full], axis=1, kind="stable"), axis=1)
    rest = rest[np.argsort(-lengths[rest], kind="stable")][: len(rest) // batch_size * batch_size]
    batches = np.concatenate([full.reshape(-1), rest]).reshape(-1, batch_size)
    return batches[rng.permutation(len(batches))]


def balanced_rows(species: np.ndarray, seed: int | Sequence[int]) -> np.ndarray:
    """One epoch's rows when every species counts as much as the largest: each smaller species' rows are all taken
    as often as they fit, and the remainder is a seeded sample of them without replacement (sorted row indices)."""
    groups = [np.flatnonzero(species == code) for code in np.unique(species)]
    n = max(len(g) for g in groups)
    rng = np.random.default_rng(seed)
    parts = [np.concatenate([np.tile(g, n // len(g)), rng.choice(g, n % len(g), replace=False)]) for g in groups]
    return np.sort(np.concatenate(parts))


class PretrainBatches(torch.utils.data.Dataset):
    """Step ``k`` of this process's training: a masked batch of ``batch_size`` cells, as a map-style dataset.

    The cells of a step are global: epoch batches hold ``batch_size x world_size`` cells (length-grouped, see
    :func:`length_grouped_batches`, seeded by the seed and the epoch) and process ``rank`` takes its slice of
    them, so a run on 2 processes sees the same cells per step as one process with twice the batch. Item ``k`` is a
    pure function of ``k``: a DataLoader over ``range(step, total_steps)`` resumes a run exactly and may load
    batches in worker processes. With ``balance_species`` an epoch holds as many cells of each species as the largest
    species has (:func:`balanced_rows`, seeded by the seed and the epoch); a cell drawn twice in an epoch is masked
    differently each time (the mask is seeded by its place in the epoch).
    """

    def __init__(self, tokens, lengths: np.ndarray, species: np.ndarray, collate: MLMCollator, batch_size: int, *,
                 megabatch: int = 50, seed: int = 0, rank: int = 0, world_size: int = 1, balance_species: bool = False):
        self.tokens, self.lengths, self.species, self.collate = tokens, np.asarray(lengths), np.asarray(species), collate
        self.batch_size, self.megabatch, self.seed, self.rank, self.world_size = batch_size, megabatch, seed, rank, world_size
        self.balance_species = balance_species
        counts = np.unique(self.species, return_counts=True)[1]
        self.epoch_size = len(counts) * int(counts.max()) if balance_species else len(self.lengths)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.lengths)} cells make no batch of {batch_size} for each of {world_size} "
                             "processes; lower the batch size or use more cells")
        self._epoch: tuple = (-1, None, None)

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch_size // (self.batch_size * self.world_size)

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        if not self.balance_species:
            return np.arange(len(self.lengths))
        return balanced_rows(self.species, seed=[self.seed, epoch, 1])

    def __len__(self) -> int:
        """Steps of one epoch (items past it are later epochs)."""
        return self.steps_per_epoch

    def cells(self, step: int) -> tuple[int, np.ndarray, np.ndarray]:
        """The epoch of ``step``, the row indices of this process's cells at that step and their places in the
        epoch's rows (the same as the rows unless species are balanced)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch[0] != epoch:
            rows = self._epoch_rows(epoch)
            self._epoch = (epoch, rows, length_grouped_batches(self.lengths[rows], self.batch_size * self.world_size,
                                                               self.megabatch, seed=[self.seed, epoch]))
        _, rows, batches = self._epoch
        start = self.rank * self.batch_size
        places = batches[position, start : start + self.batch_size]
        return epoch, rows[places], places

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        epoch, rows, places = self.cells(step)
        seeds = [cell_seed(self.seed, epoch, int(place)) for place in places]
        return self.collate(self.tokens[rows]["input_ids"], self.species[rows], seeds)
