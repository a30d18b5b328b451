"""The pretraining loop (SPEC §4): AdamW, warmup + cosine, length-grouped batches, DDP, exact resume.

:func:`pretrain` trains a :class:`~mixgf.model.MixGFForPretraining` on a token dataset and leaves in ``out_dir``::

    checkpoint.pt   the whole training state, replaced atomically every ``save_every`` steps and at the end
    model/          the final model, written with ``save_pretrained`` (config.json + model.safetensors)

It runs as one process on CPU or a GPU, or as one process per GPU under ``torchrun`` (DDP over NCCL; gloo on CPU),
where only rank 0 logs and writes. A rerun with ``resume=True`` continues from ``checkpoint.pt`` and gives the
same weights as an uninterrupted run: the checkpoint holds the step (the learning rate is a pure function of it),
the optimizer, the batch order's position and every random number generator of every rank.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from datasets import Dataset
from dvclive import Live
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mixgf.collate import LengthGroupedBatches, MLMCollator
from mixgf.io import atomic_dir
from mixgf.model import MixGFForPretraining, check_token_dataset
from mixgf.vocab import GeneVocab

CHECKPOINT = "checkpoint.pt"
MODEL_DIR = "model"
VOCAB_FILE = "vocab.tsv"


@dataclass
class PretrainConfig:
    """Optimisation settings; the defaults are the paper's (SPEC §4) where it states them.

    ``batch_size`` is per process. ``max_steps``, when set, replaces ``epochs`` as the length of the run (and of the
    cosine schedule). ``grad_clip`` 1.0 is the Hugging Face Trainer's default, which the authors used. ``dtype`` is
    the autocast dtype on GPUs ("bfloat16" or "float32"); CPU always runs in float32.
    """

    lr: float = 1e-3
    warmup_steps: int = 10_000
    weight_decay: float = 0.001
    batch_size: int = 8
    epochs: int = 10
    max_steps: int | None = None
    grad_clip: float = 1.0
    megabatch: int = 50
    mlm_probability: float = 0.15
    pad_to_multiple_of: int = 8
    save_every: int = 1000
    log_every: int = 10
    seed: int = 42
    dtype: str = "bfloat16"

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        for name in ("batch_size", "epochs", "megabatch", "pad_to_multiple_of", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")


@dataclass
class PretrainResult:
    """The trained model (on the training device), the steps taken, the last logged metrics and where the model is."""

    model: MixGFForPretraining
    step: int
    metrics: dict[str, float]
    model_dir: Path


def lr_at(step: int, cfg: PretrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step``: linear warmup from 0, then cosine decay to 0 at ``total_steps``.

    The same curve as transformers' ``get_cosine_schedule_with_warmup``, which the authors' Trainer used.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def configure_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings (>= 2 dims) only, not on biases and LayerNorm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


@dataclass(frozen=True)
class _Process:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # this call started the process group, so it ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _start_process() -> _Process:
    """Choose the device once and join torchrun's process group when RANK / WORLD_SIZE / LOCAL_RANK are set."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    owns_group = "RANK" in os.environ and not dist.is_initialized()
    if owns_group:
        if device.type != "cpu":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return _Process(dist.get_rank(), dist.get_world_size(), device, owns_group)
    return _Process(0, 1, device, owns_group)


def _autocast(device: torch.device, dtype: str):
    if device.type == "cpu" or dtype == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# random number generators and checkpoints
# ---------------------------------------------------------------------------------------------------------------

def _seed(seed: int, rank: int, mask_rng: torch.Generator) -> None:
    """Seed python, numpy and torch (dropout) and the masking generator with independent streams for this rank."""
    global_seed, mask_seed = (int(s) for s in np.random.SeedSequence([seed, rank]).generate_state(2))
    random.seed(global_seed)
    np.random.seed(global_seed)
    torch.manual_seed(global_seed)
    mask_rng.manual_seed(mask_seed)


def _rng_state(device: torch.device, mask_rng: torch.Generator) -> dict:
    name, keys, *rest = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), *rest),  # a list, so the checkpoint loads with weights_only=True
        "torch": torch.get_rng_state(),
        "device": torch.cuda.get_rng_state(device) if device.type != "cpu" else None,
        "mask": mask_rng.get_state(),
    }


def _set_rng_state(state: dict, device: torch.device, mask_rng: torch.Generator) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if device.type != "cpu":
        torch.cuda.set_rng_state(state["device"], device)
    mask_rng.set_state(state["mask"])


def _all_rng_states(proc: _Process, mask_rng: torch.Generator) -> list[dict]:
    """Every rank's generator states, indexed by rank (collective: all ranks call it)."""
    state = _rng_state(proc.device, mask_rng)
    if proc.world_size == 1:
        return [state]
    states = [None] * proc.world_size
    dist.all_gather_object(states, state)
    return states


_BOOKKEEPING = ("transformers_version", "architectures", "_name_or_path", "dtype")


def _architecture(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _BOOKKEEPING}


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temp file beside ``path``, flush it to disk, then rename: a crash leaves the old checkpoint whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def checkpoint_matches(out_dir: str | Path, model_config, cfg: PretrainConfig, dataset: Dataset) -> bool:
    """Whether ``out_dir`` holds a checkpoint of exactly this run: same model config, optimisation settings and
    corpus. A pipeline resumes only then; anything else (a changed parameter, a new corpus) starts over."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        return False
    state = torch.load(path, map_location="cpu", weights_only=True)
    return (state["model_config"] == _architecture(model_config) and state["pretrain_config"] == asdict(cfg)
            and state.get("dataset") == dataset._fingerprint)


def _load_checkpoint(path: Path, model: MixGFForPretraining, optimizer: torch.optim.Optimizer,
                     batches: LengthGroupedBatches) -> tuple[int, list[dict]]:
    """Restore model, optimizer and batch position from ``path``; return the step and every rank's RNG states."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    ours = _architecture(model.config)
    changed = sorted(k for k in ours.keys() | state["model_config"].keys() if ours.get(k) != state["model_config"].get(k))
    if changed:
        raise ValueError(f"{path} was written for another model config (differs in {', '.join(changed)}); "
                         "build the model with the checkpoint's config, or pass resume=False to start over")
    if len(state["rng"]) != batches.world_size:
        raise ValueError(f"{path} was written by {len(state['rng'])} processes; resume with the same number")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    batches.load_state_dict(state["batches"])
    return state["step"], state["rng"]


def save_model(model: MixGFForPretraining, path: str | Path, vocab: GeneVocab | None = None) -> None:
    """``save_pretrained`` plus the vocabulary (``vocab.tsv``) into one directory that appears whole or not at all."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        if vocab is not None:
            vocab.write(tmp / VOCAB_FILE)


def _lengths(dataset: Dataset) -> np.ndarray:
    missing = sorted({"input_ids", "length"} - set(dataset.column_names))
    if missing:
        raise ValueError(f"the token dataset has no column {', '.join(missing)}; make it with mixgf's tokenizer, "
                         "which writes input_ids and length")
    return dataset.with_format("numpy")["length"][:]


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------

def pretrain(model: MixGFForPretraining, dataset: Dataset, meta: dict, cfg: PretrainConfig, out_dir: str | Path, *,
             resume: bool = True, log_dir: str | Path | None = None, model_dir: str | Path | None = None,
             vocab: GeneVocab | None = None) -> PretrainResult:
    """Pretrain ``model`` on ``dataset`` with MLM (+ SimCSE unless ``model.config.simcse_weight`` is 0).

    Parameters
    ----------
    model
        The model to train, in place; its weights are taken as they are (seed before building it). Under DDP every
        rank passes a model of the same config; rank 0's weights are broadcast.
    dataset
        Token dataset with columns ``input_ids`` (gene ids, rank order) and ``length``.
    meta
        The dataset's metadata ``{"vocab", "medians", "max_len"}``; it must match the model's config
        (:func:`~mixgf.model.check_token_dataset`).
    cfg
        Optimisation settings.
    out_dir
        Where ``checkpoint.pt`` and the final ``model/`` go (see the module docstring). Under DDP every rank reads
        the checkpoint, so across nodes it must be on a shared file system.
    resume
        Continue from ``out_dir/checkpoint.pt`` if it exists; otherwise start at step 0 (overwriting it).
    vocab
        The vocabulary of the corpus; saved with the final model, so the model directory is self-describing.
    model_dir
        Where the final model goes (default ``out_dir/model``), e.g. apart from a checkpoint folder that persists.
    log_dir
        dvclive directory for loss, loss_mlm, loss_simcse, lr and tokens_per_s (non-pad tokens over all ranks);
        ``None`` logs nothing. Values are averages over the ``log_every`` steps before each logged step. Note that
        dvclive runs ``dvc init`` at the git root when the working directory is in a git repository without DVC.

    Returns
    -------
    PretrainResult with the model, the final step, the last logged metrics and the path of the saved model.
    """
    lengths = _lengths(dataset)
    check_token_dataset(model.config, meta)
    proc = _start_process()
    out_dir = Path(out_dir)
    checkpoint = out_dir / CHECKPOINT
    model_dir = Path(model_dir) if model_dir is not None else out_dir / MODEL_DIR

    model.to(proc.device)
    optimizer = configure_optimizer(model, cfg)
    batches = LengthGroupedBatches(lengths, cfg.batch_size, megabatch=cfg.megabatch, seed=cfg.seed,
                                   rank=proc.rank, world_size=proc.world_size)
    total_steps = cfg.max_steps or cfg.epochs * len(batches)
    collate = MLMCollator(model.config.vocab_size, cfg.mlm_probability, cfg.pad_to_multiple_of)
    mask_rng = torch.Generator()
    resuming = resume and checkpoint.exists()
    if resuming:
        step, rng_states = _load_checkpoint(checkpoint, model, optimizer, batches)
        _set_rng_state(rng_states[proc.rank], proc.device, mask_rng)
    else:
        step = 0
        _seed(cfg.seed, proc.rank, mask_rng)
    if proc.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    simcse = model.config.simcse_weight > 0
    # BERT's pooler gets no gradient unless SimCSE embeds with it, and DDP must be told so
    uses_pooler = simcse and model.config.pooling == "first"
    ddp_model = model if proc.world_size == 1 else DistributedDataParallel(
        model, device_ids=None if proc.device.type == "cpu" else [proc.device], find_unused_parameters=not uses_pooler)
    autocast = _autocast(proc.device, cfg.dtype)
    tokens = dataset.select_columns("input_ids").with_format("torch")
    live = Live(str(log_dir), dvcyaml=False, save_dvc_exp=False, resume=resuming) if proc.is_main and log_dir else None

    window = torch.zeros(4, device=proc.device)  # sums since the last log: loss, loss_mlm, loss_simcse, tokens
    window_steps, window_start, metrics = 0, time.perf_counter(), {}
    bar = tqdm(total=total_steps, initial=step, desc="pretrain", disable=not proc.is_main)
    model.train()
    while step < total_steps:
        lr = lr_at(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = collate(tokens[next(batches)]["input_ids"], generator=mask_rng)
        batch = {k: v.to(proc.device) for k, v in batch.items()}
        with autocast:
            out = ddp_model(**batch)
        out.loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update()

        loss_simcse = out.loss_simcse if simcse else torch.zeros((), device=proc.device)
        window += torch.stack([out.loss.detach(), out.loss_mlm.detach(), loss_simcse.detach(),
                               batch["attention_mask"].sum().float()])
        window_steps += 1
        if step % cfg.log_every == 0 or step == total_steps:
            if proc.world_size > 1:
                dist.all_reduce(window)
            *loss_sums, n_tokens = window.tolist()
            loss, loss_mlm, loss_sim = (s / (window_steps * proc.world_size) for s in loss_sums)
            metrics = {"loss": loss, "loss_mlm": loss_mlm, **({"loss_simcse": loss_sim} if simcse else {}), "lr": lr,
                       "tokens_per_s": n_tokens / (time.perf_counter() - window_start)}
            if live:
                live.step = step
                for name, value in metrics.items():
                    live.log_metric(name, value)
                live.next_step()
            bar.set_postfix(loss=f"{loss:.3f}")
            window.zero_()
            window_steps, window_start = 0, time.perf_counter()
        if step % cfg.save_every == 0 or step == total_steps:
            rng_states = _all_rng_states(proc, mask_rng)
            if proc.is_main:
                _save_checkpoint(checkpoint, {
                    "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "batches": batches.state_dict(), "rng": rng_states,
                    "model_config": _architecture(model.config), "pretrain_config": asdict(cfg),
                    "dataset": dataset._fingerprint,
                })
    bar.close()

    if proc.is_main:
        save_model(model, model_dir, vocab)
    if live:
        live.end()
    if proc.world_size > 1:
        dist.barrier()
    # DDP's reducer holds the process group; freeing it after the group is destroyed can hang in gloo's destructor
    del ddp_model
    if proc.owns_group:
        dist.destroy_process_group()
    return PretrainResult(model=model, step=step, metrics=metrics, model_dir=model_dir)
