"""Batches for pretraining: length-grouped batches of cells, padded per batch and masked for MLM (SPEC §4).

Cells hold from a few hundred to 2,048 genes. Padding every batch to 2,048 would spend most of a step on padding, so
batches are drawn from length-sorted mega-batches and padded only to their longest cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from mixgf.model import IGNORE_INDEX
from mixgf.vocab import GeneVocab

FIRST_GENE_ID = 2  # ids below are <pad> and <mask>


@dataclass(frozen=True)
class MLMCollator:
    """Pads token sequences into a batch and masks genes for masked-language modelling.

    Each non-pad token is chosen with probability ``mlm_probability``; a chosen token becomes ``<mask>`` (80%), a
    random gene (10%) or stays as it is (10%), and only chosen tokens carry a label (-100 elsewhere). Random
    replacements are drawn from the genes only, never ``<pad>`` or ``<mask>``.
    """

    vocab_size: int
    mlm_probability: float = 0.15
    pad_to_multiple_of: int = 1  # 8 keeps GPU matmuls on tensor-core shapes

    def __call__(self, sequences: Sequence[Sequence[int] | torch.Tensor],
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask", "labels"}``, each (N, L) with L the longest sequence rounded up."""
        input_ids = pad_sequence([torch.as_tensor(s, dtype=torch.long) for s in sequences], batch_first=True,
                                 padding_value=GeneVocab.pad_id)
        input_ids = F.pad(input_ids, (0, -input_ids.shape[1] % self.pad_to_multiple_of), value=GeneVocab.pad_id)
        attention_mask = input_ids != GeneVocab.pad_id

        chosen = (torch.rand(input_ids.shape, generator=generator) < self.mlm_probability) & attention_mask
        labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
        action = torch.rand(input_ids.shape, generator=generator)  # < 0.8: <mask>, < 0.9: random gene, else unchanged
        input_ids[chosen & (action < 0.8)] = GeneVocab.mask_id
        to_random = chosen & (action >= 0.8) & (action < 0.9)
        input_ids[to_random] = torch.randint(FIRST_GENE_ID, self.vocab_size, (int(to_random.sum()),), generator=generator)
        return {"input_ids": input_ids, "attention_mask": attention_mask.long(), "labels": labels}


def length_grouped_batches(lengths: np.ndarray, batch_size: int, megabatch: int,
                           seed: int | Sequence[int]) -> list[np.ndarray]:
    """One epoch of batches of row indices, all of ``batch_size`` (a last partial batch is dropped).

    The rows are shuffled (seeded by ``seed``), cut into mega-batches of ``megabatch`` batches, each mega-batch is
    sorted by length (longest first) and cut into batches, and the batch order is shuffled. ``megabatch=1`` gives
    plain random batches.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    size = megabatch * batch_size
    batches = []
    for start in range(0, len(order), size):
        group = order[start : start + size]
        group = group[np.argsort(-lengths[group], kind="stable")]
        batches += [group[i : i + batch_size] for i in range(0, len(group) - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class LengthGroupedBatches:
    """An endless iterator over this rank's length-grouped batches, epoch after epoch; its state is (epoch, position).

    Every rank computes the same epoch (a pure function of ``seed`` and the epoch number) and takes every
    ``world_size``-th batch from its ``rank``; the epoch is cut to a multiple of ``world_size`` batches so that all
    ranks take the same number of steps.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, megabatch: int = 50, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.megabatch, self.seed = batch_size, megabatch, seed
        self.rank, self.world_size = rank, world_size
        if len(self) == 0:
            raise ValueError(f"{len(self.lengths)} cells make no batch of {batch_size} for each of {world_size} processes; "
                             "lower the batch size or use more cells")
        self.epoch, self.position = 0, 0
        self._batches: tuple[int, list[np.ndarray]] = (-1, [])

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.lengths) // self.batch_size // self.world_size

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self._batches[0] != epoch:
            batches = length_grouped_batches(self.lengths, self.batch_size, self.megabatch, seed=[self.seed, epoch])
            self._batches = (epoch, batches[: len(self) * self.world_size][self.rank :: self.world_size])
        return self._batches[1]

    def __iter__(self) -> LengthGroupedBatches:
        return self

    def __next__(self) -> np.ndarray:
        if self.position == len(self):
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._epoch_batches(self.epoch)[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "megabatch": self.megabatch, "world_size": self.world_size, "n_cells": len(self.lengths)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off; refuses a state of another dataset, batch size, mega-batch, seed or world."""
        ours = self.state_dict()
        changed = [k for k in ("seed", "batch_size", "megabatch", "world_size", "n_cells") if state[k] != ours[k]]
        if changed:
            raise ValueError("cannot resume the batch order: "
                             + ", ".join(f"{k} was {state[k]}, now {ours[k]}" for k in changed))
        self.epoch, self.position = state["epoch"], state["position"]
