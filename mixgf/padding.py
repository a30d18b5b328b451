"""Padded batches of token sequences: ``(input_ids, attention_mask)`` with ``<pad>`` and attention 0 after each cell.

Apart from :mod:`mixgf.collate` (pretraining batches, which imports the model classes for its labels) so that
inference commands such as ``mixgf perturb`` pad with the same code without importing transformers' models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mixgf.vocab import GeneVocab


def pad_batch(sequences: Sequence[Sequence[int] | torch.Tensor], pad_to_multiple_of: int = 1,
              max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (N, L) long, with L the longest sequence rounded up to a multiple of
    ``pad_to_multiple_of`` but never past ``max_length`` (the model's positions); padding is ``<pad>``, attention 0."""
    lengths = np.fromiter((len(s) for s in sequences), np.int64, len(sequences))
    values = np.concatenate([np.asarray(s, np.int64) for s in sequences]) if len(sequences) else np.empty(0, np.int64)
    return pad_ragged(values, np.cumsum(lengths) - lengths, lengths, pad_to_multiple_of, max_length)


def pad_ragged(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, pad_to_multiple_of: int = 1,
               max_length: int | None = None, table: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pad_batch` of the sequences ``values[starts[i] : starts[i] + lengths[i]]``: cells read as an Arrow
    list column's flat values and offsets, with no Python object per cell. ``table``: token id -> id in the batch."""
    width = int(lengths.max(initial=0))
    if max_length is not None and width > max_length:
        raise ValueError(f"a cell holds {width} genes but the model has {max_length} positions")
    target = width + -width % pad_to_multiple_of
    positions = np.arange(min(target, max_length or target))
    mask = positions < lengths[:, None]
    tokens = values[(starts[:, None] + positions)[mask]]
    input_ids = np.full(mask.shape, GeneVocab.pad_id, np.int64)
    input_ids[mask] = tokens if table is None else table[tokens]
    return torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))
