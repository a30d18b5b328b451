"""mixgf.pretrain: schedule, optimizer, training, exact resume (and what it refuses), non-finite stops, DDP on CPU."""

import json
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
from mixgf.model import MixGFForPretraining, demo_config
from mixgf.pretrain import CHECKPOINT, PretrainConfig, checkpoint_differences, configure_optimizer, lr_at, pretrain
from mixgf.vocab import GeneVocab, default_vocab

VOCAB = GeneVocab(default_vocab().tokens[:120], name="tiny")  # <pad>, <mask> and 118 real ENSG ids
META = {"vocab": VOCAB.identity(), "medians": {"human": {"name": "m", "hash": "0123", "size": 118}}, "max_len": 32}
CFG = PretrainConfig(lr=3e-3, warmup_steps=3, batch_size=8, max_steps=20, save_every=5, log_every=2, seed=0)


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
    return datasets.Dataset.from_dict({"input_ids": cells, "length": [len(c) for c in cells],
                                       "species": ["human"] * n_cells})


def tiny_model(seed: int = 0, **overrides) -> MixGFForPretraining:
    torch.manual_seed(seed)
    return MixGFForPretraining(demo_config(META, max_position_embeddings=32, **overrides))


def run(model, cfg, out_dir, **kwargs):
    return pretrain(model, token_dataset(), META, cfg, out_dir, vocab=VOCAB, **kwargs)


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


def test_loss_falls_and_the_final_model_loads_as_bert(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # dvclive would otherwise set up DVC in the enclosing git repository
    cfg = PretrainConfig(lr=3e-3, warmup_steps=3, batch_size=8, max_steps=30, save_every=100, log_every=5, seed=0)
    result = run(tiny_model(), cfg, tmp_path / "out", log_dir=tmp_path / "live")

    log = np.loadtxt(tmp_path / "live/plots/metrics/loss.tsv", skiprows=1)
    assert result.step == 30 and log[:, 0].tolist() == [5, 10, 15, 20, 25, 30]
    assert log[-1, 1] < log[0, 1] - 0.5, log
    summary = json.loads((tmp_path / "live/metrics.json").read_text())
    assert {"loss", "loss_mlm", "loss_simcse", "simcse_pos_cos", "simcse_neg_cos", "simcse_accuracy", "grad_norm",
            "lr", "tokens_per_s"} <= summary.keys()
    assert 0 <= summary["simcse_accuracy"] <= 1 and summary["simcse_pos_cos"] > summary["simcse_neg_cos"]

    model = result.model.eval()
    bert = BertForMaskedLM.from_pretrained(result.model_dir).eval()
    inputs = {"input_ids": torch.tensor([token_dataset()[0]["input_ids"]])}
    with torch.no_grad():
        torch.testing.assert_close(bert(**inputs).logits, model(**inputs).logits)


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_across_an_epoch_to_identical_weights_and_logs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    straight = run(tiny_model(), CFG, tmp_path / "straight").model  # 12 steps an epoch, 20 steps

    def crash_at_step_17(step, cfg, total_steps):
        if step == 17:
            raise Interrupted
        return lr_at(step, cfg, total_steps)

    monkeypatch.setattr(mixgf.pretrain, "lr_at", crash_at_step_17)
    with pytest.raises(Interrupted):
        run(tiny_model(), CFG, tmp_path / "resumed", log_dir=tmp_path / "live")
    monkeypatch.setattr(mixgf.pretrain, "lr_at", lr_at)
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)["step"] == 15  # in epoch 1
    logged = CFG.__class__(**{**CFG.__dict__, "log_every": 4, "save_every": 7, "num_workers": 1})  # runtime only
    resumed = run(tiny_model(seed=1), logged, tmp_path / "resumed", log_dir=tmp_path / "live").model

    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    steps = np.loadtxt(tmp_path / "live/plots/metrics/loss.tsv", skiprows=1)[:, 0].tolist()
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16, 20]  # 16 logged before the crash, once; then every 4 from 15


def test_resume_refuses_another_run_and_names_what_differs(tmp_path):
    run(tiny_model(), CFG, tmp_path)
    changed = CFG.__class__(**{**CFG.__dict__, "lr": 1.0})
    assert checkpoint_differences(tmp_path, tiny_model().config, changed, token_dataset()) == ["pretrain.lr: 0.003 -> 1.0"]
    with pytest.raises(ValueError, match=r"differs in pretrain.lr: 0.003 -> 1.0"):
        run(tiny_model(), changed, tmp_path)
    with pytest.raises(ValueError, match="model.simcse_tau: 0.05 -> 0.1"):
        run(tiny_model(simcse_tau=0.1), CFG, tmp_path)
    with pytest.raises(ValueError, match="corpus.fingerprint"):
        pretrain(tiny_model(), token_dataset(95), META, CFG, tmp_path, vocab=VOCAB)
    assert checkpoint_differences(tmp_path / "none", tiny_model().config, CFG, token_dataset()) is None


def test_non_finite_gradients_stop_training_before_the_weights_change(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[2:] = float("nan")
    before = model.bert.encoder.layer[0].output.dense.weight.clone()
    with pytest.raises(FloatingPointError, match="step 0: the loss .* not finite"):
        run(model, CFG, tmp_path)
    assert torch.equal(model.bert.encoder.layer[0].output.dense.weight, before)
    assert not (tmp_path / CHECKPOINT).exists()


RUNS = {"simcse": {"gather_negatives": True}, "baseline": {"simcse_weight": 0.0}}  # the baseline leaves the pooler unused
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # dropout differs between processes


def exact_model(seed: int = 0, **overrides) -> MixGFForPretraining:
    """In float64: summing gradients in another order (DDP) changes float32 results by ~1e-7, which Adam amplifies
    to ~1e-6 in parameters whose true gradient is 0 (attention key biases)."""
    return tiny_model(seed, **overrides, **NO_DROPOUT).double()
DDP_CFG = PretrainConfig(lr=3e-3, warmup_steps=2, batch_size=4, max_steps=6, save_every=3, seed=0)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for name, overrides in RUNS.items():  # rank 1's different init is overwritten by rank 0's
        result = run(exact_model(rank, **overrides), DDP_CFG, f"{out_dir}/{name}")
        torch.save(result.model.state_dict(), f"{out_dir}/{name}-rank{rank}.pt")


def test_ddp_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
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

    initial = exact_model().state_dict()["bert.encoder.layer.0.attention.self.query.weight"]
    global_batch = DDP_CFG.__class__(**{**DDP_CFG.__dict__, "batch_size": 8})
    for name, overrides in RUNS.items():
        weights = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in range(2)]
        single = run(exact_model(**overrides), global_batch, tmp_path / f"{name}-single").model
        assert not torch.equal(weights[0]["bert.encoder.layer.0.attention.self.query.weight"], initial)
        for key, value in single.state_dict().items():
            assert torch.equal(weights[0][key], weights[1][key]), (name, key)
            torch.testing.assert_close(weights[0][key], value, rtol=0, atol=1e-6, msg=f"{name} {key}")
        assert torch.load(tmp_path / name / CHECKPOINT, weights_only=True)["step"] == 6


def test_cli_pretrain_trains_and_resumes(test_data, tmp_path):
    """`mixgf pretrain` on a real token dataset: trains, saves a self-describing model, and a rerun resumes."""
    import subprocess
    import sys

    from mixgf.tokenize import tokenize_files

    tokenize_files([test_data / "scanpy-10x-3.0.0"], tmp_path / "tokens", species="human", max_len=64,
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
