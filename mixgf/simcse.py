"""The contrastive term of Mix-Geneformer (SPEC §4): two SimCSE losses and the diagnostics to watch them.

The paper and the authors' code disagree, so both are here, selected by name in ``LOSSES``:

- ``nt_xent``, what the authors' code computes: SimCLR's NT-Xent over the 2N views, both directions, each view's
  positive the other view of its cell and the other 2N - 2 views its negatives;
- ``eq3``, the paper's Eq. (3), the original SimCSE loss: one direction, each first view against the N second views,
  ``L = -(1/N) sum_i log(exp(sim(h_i1, h_i2) / tau) / sum_j exp(sim(h_i1, h_j2) / tau))``.

Similarity is cosine. Both are computed in float32 even under autocast, since bf16 cosines divided by a small tau
would lose the differences the loss is about, and both can take their negatives from every DDP rank (``gather``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _AllGather(torch.autograd.Function):
    """All ranks' ``z`` concatenated in rank order; the backward sums, across ranks, the gradients every rank's loss
    sends to this rank's rows, so the gradients DDP averages are exactly those of the loss over the global batch
    (a detached gather, as in SimCLR-style code, drops the terms where this rank's views are other ranks' negatives)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def _gather(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's ``z`` concatenated in rank order (differentiable), and where this rank's rows start."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    return _AllGather.apply(z), dist.get_rank() * len(z)


def at_least_float32(z: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16 cosines divided by a small tau would lose the differences the loss is about."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float, *, gather: bool = False) -> torch.Tensor:
    """NT-Xent (SimCLR) loss over the 2N views ``z1``, ``z2`` (N, H) of N cells: the authors' code.

    Each view's positive is the other view of its cell and every other view is a negative; similarity is cosine / tau.
    With ``gather`` the views of all DDP ranks serve as negatives.
    """
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(at_least_float32(torch.cat([z1, z2])), dim=-1)  # (2N, H)
        keys, offset = _gather(z) if gather else (z, 0)
        sim = z @ keys.T / tau  # (2N, 2N x world)
        rows = torch.arange(len(z), device=z.device)
        is_self = torch.zeros_like(sim, dtype=torch.bool)
        is_self[rows, offset + rows] = True
        positives = offset + (rows + len(z1)) % len(z)
        return F.cross_entropy(sim.masked_fill(is_self, float("-inf")), positives)


def eq3(z1: torch.Tensor, z2: torch.Tensor, tau: float, *, gather: bool = False) -> torch.Tensor:
    """The paper's Eq. (3): each first view ``z1[i]`` must pick its own second view among the N rows of ``z2``.

    One direction, N x N: a view is never compared with its own kind, so there is no self-similarity to mask. With
    ``gather`` the candidates are every DDP rank's second views and local row i's positive sits at offset + i.
    """
    with torch.autocast(z1.device.type, enabled=False):
        queries, keys = F.normalize(at_least_float32(z1), dim=-1), F.normalize(at_least_float32(z2), dim=-1)
        keys, offset = _gather(keys) if gather else (keys, 0)
        sim = queries @ keys.T / tau  # (N, N x world)
        return F.cross_entropy(sim, offset + torch.arange(len(z1), device=z1.device))


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"nt_xent": nt_xent, "eq3": eq3}


def simcse_loss(name: str, z1: torch.Tensor, z2: torch.Tensor, tau: float, *, gather: bool = False) -> torch.Tensor:
    """The SimCSE loss called ``name`` (a key of ``LOSSES``) of the two views ``z1``, ``z2`` (N, H)."""
    if name not in LOSSES:
        raise ValueError(f"unknown SimCSE loss {name!r}; choose one of {', '.join(sorted(LOSSES))}")
    return LOSSES[name](z1, z2, tau, gather=gather)


@torch.no_grad()
def diagnostics(z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
    """Whether the contrastive term still teaches anything, from this device's two views ``z1``, ``z2`` (N, H).

    All over the N x N cosines sim(z1[i], z2[j]) that ``eq3`` scores, in float32:

    - ``pos_cos``: mean over the N positive pairs (i, i);
    - ``neg_cos``: mean over the N(N - 1) negative pairs (i, j), i != j (NaN for N = 1);
    - ``accuracy``: share of rows i whose positive is strictly more similar than every negative; a tie counts as a
      failure, so a collapsed batch scores 0 rather than whatever an argmax picks first.

    Saturated: accuracy 1 and pos_cos near 1, the loss only pushes negatives further apart. Collapsed: pos_cos and
    neg_cos both near 1, every cell has the same embedding.
    """
    with torch.autocast(z1.device.type, enabled=False):
        sim = F.normalize(z1.float(), dim=-1) @ F.normalize(z2.float(), dim=-1).T  # (N, N)
        is_pos = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
        positives = sim.diagonal()
        best_negative = sim.masked_fill(is_pos, float("-inf")).amax(dim=1)
        return {
            "pos_cos": positives.mean(),
            "neg_cos": sim[~is_pos].mean(),
            "accuracy": (positives > best_negative).float().mean(),
        }
