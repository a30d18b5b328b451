"""mixgf.pretrain and the length-grouped batches: schedule, optimizer, training, exact resume, DDP on CPU."""

import json
import math
import os
import socket
import time

import datasets
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import BertForMaskedLM, get_cosine_schedule_with_warmup

import mixgf.pretrain
from mixgf.collate import LengthGroupedBatches, length_grouped_batches
from mixgf.model import MixGFForPretraining, demo_config, nt_xent
from mixgf.pretrain import CHECKPOINT, PretrainConfig, configure_optimizer, lr_at, pretrain
from mixgf.vocab import GeneVocab, default_vocab

VOCAB = GeneVocab(default_vocab().tokens[:120], name="tiny")  # <pad>, <mask> and 118 real ENSG ids
META = {"vocab": VOCAB.identity(), "medians": {"human": {"name": "m", "hash": "0123", "size": 118}}, "max_len": 32}
CFG = PretrainConfig(lr=3e-3, warmup_steps=3, batch_size=8, max_steps=12, save_every=4, log_every=4, seed=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and threads fighting other jobs for 2 cores slow these tests tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def token_dataset(n_cells: int = 96) -> datasets.Dataset:
    """Cells of four 'cell types', each a fixed gene ranking cut at a random length: learnable in a few steps."""
    rng = np.random.default_rng(0)
    programs = [rng.permutation(np.arange(2, len(VOCAB)))[:32] for _ in range(4)]
    cells = [programs[i % 4][: rng.integers(8, 33)].tolist() for i in range(n_cells)]
    return datasets.Dataset.from_dict({"input_ids": cells, "length": [len(c) for c in cells]})


def tiny_model(seed: int = 0, **overrides) -> MixGFForPretraining:
    torch.manual_seed(seed)
    return MixGFForPretraining(demo_config(META, max_position_embeddings=32, **overrides))


def test_lr_is_transformers_cosine_schedule_with_warmup():
    cfg = PretrainConfig(lr=1e-3, warmup_steps=10)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=50)
    for step in range(55):
        assert lr_at(step, cfg, 50) == pytest.approx(schedule.get_last_lr()[0], abs=1e-12)
        optimizer.step()
        schedule.step()


def test_weight_decay_only_on_matrices_and_embeddings():
    model = tiny_model()
    decay, no_decay = configure_optimizer(model, CFG).param_groups
    assert decay["weight_decay"] == CFG.weight_decay and no_decay["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_length_grouped_batches_cover_the_epoch_and_group_lengths():
    lengths = np.random.default_rng(0).integers(10, 2049, 1000)
    batches = length_grouped_batches(lengths, 8, megabatch=10, seed=1)
    assert len(batches) == 125 and sorted(np.concatenate(batches)) == list(range(1000))
    grouped_pad = np.mean([lengths[b].max() - lengths[b].mean() for b in batches])
    random_pad = np.mean([lengths[b].max() - lengths[b].mean() for b in length_grouped_batches(lengths, 8, 1, seed=1)])
    assert grouped_pad < random_pad / 5

    ranks = [LengthGroupedBatches(lengths, 8, megabatch=10, seed=1, rank=r, world_size=3) for r in range(3)]
    assert {len(r) for r in ranks} == {41}
    epoch = [next(r) for _ in range(41) for r in ranks]  # ranks take disjoint batches
    assert len(np.unique(np.concatenate(epoch))) == 41 * 3 * 8
    assert not np.array_equal(next(ranks[0]), ranks[0]._epoch_batches(0)[0])  # epoch 1 is reshuffled


def test_length_grouped_batches_resume_from_their_state():
    lengths = np.arange(100)
    first = LengthGroupedBatches(lengths, 4, megabatch=5, seed=3)
    for _ in range(30):  # past the end of epoch 0 (25 batches)
        next(first)
    second = LengthGroupedBatches(lengths, 4, megabatch=5, seed=3)
    second.load_state_dict(first.state_dict())
    assert all(np.array_equal(next(first), next(second)) for _ in range(30))
    with pytest.raises(ValueError, match="batch_size was 4, now 5"):
        LengthGroupedBatches(lengths, 5, megabatch=5, seed=3).load_state_dict(first.state_dict())


def test_loss_falls_and_the_final_model_loads_as_bert(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # dvclive would otherwise set up DVC in the enclosing git repository
    ds = token_dataset()
    cfg = PretrainConfig(lr=3e-3, warmup_steps=3, batch_size=8, max_steps=30, save_every=100, log_every=5, seed=0)
    result = pretrain(tiny_model(), ds, META, cfg, tmp_path / "out", log_dir=tmp_path / "live")

    log = np.loadtxt(tmp_path / "live/plots/metrics/loss.tsv", skiprows=1)
    assert result.step == 30 and log[:, 0].tolist() == [5, 10, 15, 20, 25, 30]
    assert log[-1, 1] < log[0, 1] - 0.5, log
    summary = json.loads((tmp_path / "live/metrics.json").read_text())
    assert {"loss", "loss_mlm", "loss_simcse", "lr", "tokens_per_s"} <= summary.keys()

    model = result.model.eval()
    bert = BertForMaskedLM.from_pretrained(result.model_dir).eval()
    inputs = {"input_ids": torch.tensor([ds[0]["input_ids"]])}
    with torch.no_grad():
        torch.testing.assert_close(bert(**inputs).logits, model(**inputs).logits)


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    ds = token_dataset()
    straight = pretrain(tiny_model(), ds, META, CFG, tmp_path / "straight").model

    def crash_at_step_10(step, cfg, total_steps):
        if step == 10:
            raise Interrupted
        return lr_at(step, cfg, total_steps)

    monkeypatch.setattr(mixgf.pretrain, "lr_at", crash_at_step_10)
    with pytest.raises(Interrupted):
        pretrain(tiny_model(), ds, META, CFG, tmp_path / "resumed")
    monkeypatch.undo()
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)["step"] == 8
    resumed = pretrain(tiny_model(seed=1), ds, META, CFG, tmp_path / "resumed").model

    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_another_model_config(tmp_path):
    ds = token_dataset()
    pretrain(tiny_model(), ds, META, PretrainConfig(batch_size=8, max_steps=1, seed=0), tmp_path)
    with pytest.raises(ValueError, match="differs in simcse_tau"):
        pretrain(tiny_model(simcse_tau=0.1), ds, META, PretrainConfig(batch_size=8, max_steps=2, seed=0), tmp_path)


RUNS = {"simcse": {"gather_negatives": True}, "baseline": {"simcse_weight": 0.0}}  # the baseline leaves the pooler unused


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2)
    z1, z2 = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(rank))
    torch.save(nt_xent(z1, z2, 0.05, gather=True), f"{out_dir}/gathered{rank}.pt")
    dist.destroy_process_group()

    cfg = PretrainConfig(lr=3e-3, warmup_steps=2, batch_size=4, max_steps=6, save_every=3, seed=0)
    for run, overrides in RUNS.items():  # rank 1's different init is overwritten by rank 0's
        result = pretrain(tiny_model(seed=rank, **overrides), token_dataset(), META, cfg, f"{out_dir}/{run}")
        torch.save(result.model.state_dict(), f"{out_dir}/{run}-rank{rank}.pt")


def test_ddp_on_cpu_keeps_ranks_identical(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not workers.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the 2 DDP workers did not finish within 180 s")

    initial = tiny_model().state_dict()["bert.encoder.layer.0.attention.self.query.weight"]
    for run in RUNS:
        weights = [torch.load(tmp_path / f"{run}-rank{r}.pt", weights_only=True) for r in range(2)]
        for name, value in weights[0].items():
            assert torch.equal(value, weights[1][name]), (run, name)
        assert not torch.equal(weights[0]["bert.encoder.layer.0.attention.self.query.weight"], initial)
        assert (tmp_path / run / "model" / "config.json").exists()
        assert torch.load(tmp_path / run / CHECKPOINT, weights_only=True)["step"] == 6

    # all-gathered NT-Xent: each rank's 8 views against all 16, as one loss over both ranks' views would score them
    views = [torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    z = torch.nn.functional.normalize(torch.cat([torch.cat([z1, z2]) for z1, z2 in views]), dim=-1)
    sim = (z @ z.T / 0.05).fill_diagonal_(-math.inf)
    positives = torch.tensor([(i // 8) * 8 + (i % 8 + 4) % 8 for i in range(16)])
    per_view = torch.nn.functional.cross_entropy(sim, positives, reduction="none")
    for r in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"gathered{r}.pt"), per_view[8 * r : 8 * r + 8].mean())


def test_cli_pretrain_trains_and_resumes(shared_data, tmp_path):
    """`mixgf pretrain` on a real token dataset: trains, saves a self-describing model, and a rerun resumes."""
    import subprocess
    import sys

    from mixgf.tokenize import tokenize_files

    tokenize_files([shared_data / "scanpy-10x-3.0.0"], tmp_path / "tokens", species="human", max_len=64,
                   progress=False)
    cmd = [sys.executable, "-m", "mixgf", "pretrain", str(tmp_path / "tokens"), "--out", str(tmp_path / "run"),
           "--preset", "demo", "--max-steps", "4", "--warmup-steps", "1", "--save-every", "2", "--batch-size", "4"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "4 steps" in first.stderr
    assert (tmp_path / "run" / "model" / "vocab.tsv").exists()
    assert BertForMaskedLM.from_pretrained(tmp_path / "run" / "model").config.vocab_size == len(default_vocab())
    again = subprocess.run(cmd, capture_output=True, text=True)  # the checkpoint is complete: nothing to train
    assert again.returncode == 0 and "4 steps" in again.stderr
    wrong = subprocess.run(cmd[:5] + ["--vocab", "geneformer-v1"] + cmd[5:], capture_output=True, text=True)
    assert wrong.returncode == 2 and "was tokenized with vocabulary" in wrong.stderr
