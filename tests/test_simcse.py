"""mixgf.simcse: both losses against hand computations and double loops; autocast, DDP negatives, diagnostics."""

import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mixgf.simcse import LOSSES, diagnostics, eq3, nt_xent, simcse_loss

S = math.sqrt(3) / 2
TAU = 0.5
# 3 cells, 2-D views at chosen angles (lengths vary: the losses must use cosines). First views at 0, 90 and 180
# degrees, second views at 0, 60 and 90 degrees.
Z1 = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-3.0, 0.0]])
Z2 = torch.tensor([[1.0, 0.0], [0.5, S], [0.0, 2.0]])
# cos(z1_i, z2_j) read off the angles: rows i, columns j
CROSS = [[1.0, 0.5, 0.0],
         [0.0, S, 1.0],
         [-1.0, -0.5, 0.0]]


def test_eq3_on_a_hand_computed_batch():
    terms = [-math.log(math.exp(CROSS[i][i] / TAU) / sum(math.exp(c / TAU) for c in CROSS[i])) for i in range(3)]
    expected = sum(terms) / 3
    assert eq3(Z1, Z2, TAU).item() == pytest.approx(expected, abs=1e-6)


def test_nt_xent_on_a_hand_computed_batch():
    # the 6 views at 0, 90, 180 (first views) and 0, 60, 90 degrees (second views): cosines of all pairs, by hand
    cos = [[1.0, 0.0, -1.0, 1.0, 0.5, 0.0],
           [0.0, 1.0, 0.0, 0.0, S, 1.0],
           [-1.0, 0.0, 1.0, -1.0, -0.5, 0.0],
           [1.0, 0.0, -1.0, 1.0, 0.5, 0.0],
           [0.5, S, -0.5, 0.5, 1.0, S],
           [0.0, 1.0, 0.0, 0.0, S, 1.0]]
    positive = [3, 4, 5, 0, 1, 2]
    terms = []
    for a in range(6):
        denominator = sum(math.exp(cos[a][b] / TAU) for b in range(6) if b != a)
        terms.append(-math.log(math.exp(cos[a][positive[a]] / TAU) / denominator))
    expected = sum(terms) / 6
    assert nt_xent(Z1, Z2, TAU).item() == pytest.approx(expected, abs=1e-6)


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def _eq3_rows(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> list[float]:
    """Eq. (3)'s term of each first view, by a double loop in float64."""
    q, k = z1.tolist(), z2.tolist()
    rows = []
    for i in range(len(q)):
        denominator = sum(math.exp(_cos(q[i], k[j]) / tau) for j in range(len(k)))
        rows.append(-math.log(math.exp(_cos(q[i], k[i]) / tau) / denominator))
    return rows


def _nt_xent_rows(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> list[float]:
    """NT-Xent's term of each of the 2N views (first views, then second views), by a double loop in float64."""
    views, n = z1.tolist() + z2.tolist(), len(z1)
    rows = []
    for a in range(2 * n):
        positive = (a + n) % (2 * n)
        denominator = sum(math.exp(_cos(views[a], views[b]) / tau) for b in range(2 * n) if b != a)
        rows.append(-math.log(math.exp(_cos(views[a], views[positive]) / tau) / denominator))
    return rows


REFERENCES = {"eq3": _eq3_rows, "nt_xent": _nt_xent_rows}


def _eq3_rows_autograd(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    sim = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T / tau
    return -sim.log_softmax(dim=1).diagonal()


def _nt_xent_rows_autograd(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    views = torch.arange(len(z))
    log_p = (z @ z.T / tau).fill_diagonal_(-math.inf).log_softmax(dim=1)
    return -log_p[views, (views + len(z1)) % len(z)]


AUTOGRAD_ROWS = {"eq3": _eq3_rows_autograd, "nt_xent": _nt_xent_rows_autograd}  # the same, differentiable


@pytest.mark.parametrize("name", LOSSES)
def test_losses_match_a_double_loop(name):
    z1, z2 = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    rows = REFERENCES[name](z1, z2, 0.2)
    assert LOSSES[name](z1, z2, 0.2).item() == pytest.approx(sum(rows) / len(rows), abs=1e-6)
    assert simcse_loss(name, z1, z2, 0.2).item() == LOSSES[name](z1, z2, 0.2).item()


def test_unknown_loss_names_the_valid_ones():
    with pytest.raises(ValueError, match="eq3, nt_xent"):
        simcse_loss("infonce", Z1, Z2, TAU)


def test_the_two_losses_are_different_formulas():
    z1, z2 = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    assert abs(eq3(z1, z2, 0.2).item() - nt_xent(z1, z2, 0.2).item()) > 1e-3


@pytest.mark.parametrize("n", [3, 6])
def test_identical_orthogonal_views_give_the_closed_forms(n):
    # sim(i, i) = 1, sim(i, j) = 0: a view's own copy is scored once in eq3 and must be left out in nt_xent
    z = 3 * torch.eye(n)
    e = math.exp(1 / TAU)
    assert eq3(z, z.clone(), TAU).item() == pytest.approx(-math.log(e / (e + n - 1)), abs=1e-6)
    assert nt_xent(z, z.clone(), TAU).item() == pytest.approx(-math.log(e / (e + 2 * n - 2)), abs=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_gradients_reach_both_views(name):
    z1, z2 = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2)).unbind()
    z1.requires_grad_()
    z2.requires_grad_()
    LOSSES[name](z1, z2, 0.05).backward()
    for grad in (z1.grad, z2.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES)
def test_autocast_bf16_is_computed_in_float32(name):
    z1, z2 = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LOSSES[name](z1, z2, 0.05)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, LOSSES[name](z1.float(), z2.float(), 0.05), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_gather_without_ddp_is_the_local_loss(name):
    z1, z2 = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4))
    assert LOSSES[name](z1, z2, 0.1, gather=True).item() == LOSSES[name](z1, z2, 0.1).item()


def _views(rank: int) -> torch.Tensor:
    return torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(10 + rank))


def _ddp_worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2)
    z1, z2 = _views(rank).requires_grad_().unbind()
    results = {}
    for name, loss_fn in LOSSES.items():
        loss = loss_fn(z1, z2, 0.1, gather=True)
        results[name] = (loss.detach(), *torch.autograd.grad(loss, (z1, z2)))
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_gathered_negatives_score_each_rank_like_the_global_batch(tmp_path):
    workers = mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=2, join=False)
    deadline = time.monotonic() + 60
    while not workers.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the 2 gloo workers did not finish within 60 s")

    z1, z2 = (torch.cat(parts) for parts in zip(*(_views(r) for r in range(2))))  # the global batch, (8, 6) each
    def owned(name, r):  # the loss rows of rank r; nt_xent: 8 first views, then 8 second views
        mine = list(range(4 * r, 4 * r + 4))
        return mine if name == "eq3" else mine + [8 + i for i in mine]

    for r in range(2):
        mine = list(range(4 * r, 4 * r + 4))
        for name, (loss, grad1, grad2) in torch.load(tmp_path / f"rank{r}.pt", weights_only=True).items():
            rows = REFERENCES[name](z1, z2, 0.1)
            own = owned(name, r)
            assert loss.item() == pytest.approx(sum(rows[i] for i in own) / len(own), rel=1e-6), (name, r)
            # exact gradients: those of the sum of both ranks' losses (DDP then averages them over the 2 ranks),
            # including the terms where this rank's views are the other rank's negatives
            g1, g2 = (z.double().requires_grad_() for z in (z1, z2))
            per_row = AUTOGRAD_ROWS[name](g1, g2, 0.1)
            sum(per_row[owned(name, s)].mean() for s in range(2)).backward()
            torch.testing.assert_close(grad1.double(), g1.grad[mine], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad2.double(), g2.grad[mine], rtol=1e-5, atol=1e-6)


def test_diagnostics_on_the_hand_computed_batch():
    stats = diagnostics(Z1, Z2)
    assert stats["pos_cos"].item() == pytest.approx((1.0 + S + 0.0) / 3, abs=1e-6)
    assert stats["neg_cos"].item() == pytest.approx((0.5 + 0.0 + 0.0 + 1.0 - 1.0 - 0.5) / 6, abs=1e-6)
    # cell 0: 1 beats 0.5 and 0; cell 1: sqrt(3)/2 loses to 1; cell 2: 0 beats -1 and -0.5
    assert stats["accuracy"].item() == pytest.approx(2 / 3, abs=1e-6)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in stats.values())


def test_diagnostics_tell_saturated_from_collapsed():
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(5), requires_grad=True)
    saturated = diagnostics(z, z.detach().clone())
    assert saturated["pos_cos"].item() == pytest.approx(1.0, abs=1e-6)
    assert saturated["accuracy"].item() == 1.0
    assert saturated["neg_cos"].item() < 0.9

    # every cell on the same ray (lengths powers of 2, so every cosine is exactly 1 and the ties are exact)
    row = torch.zeros(8)
    row[0] = 1.0
    collapsed = diagnostics(row * torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])[:, None], row.expand(5, 8) * 2)
    assert collapsed["pos_cos"].item() == pytest.approx(1.0, abs=1e-6)
    assert collapsed["neg_cos"].item() == pytest.approx(1.0, abs=1e-6)
    assert collapsed["accuracy"].item() == 0.0  # every negative ties with the positive: ties are failures
