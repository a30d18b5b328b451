"""Pooling a cell's gene hidden states into one cell embedding."""

from __future__ import annotations

import torch


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (N, L, H) over the positions where ``attention_mask`` (N, L) is 1: a cell's gene average."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(1)  # (N, 1, L): one matrix product per cell, one pass
    return torch.bmm(mask, hidden).squeeze(1) / mask.sum(-1).clamp(min=1)
