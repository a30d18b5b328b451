"""The pretraining loop (SPEC §4): AdamW, warmup + cosine, length-grouped batches, DDP, exact resume.

:func:`pretrain` trains a :class:`~mixgf.model.MixGFForPretraining` on a token dataset and leaves in ``out_dir``::

    checkpoint.pt   the whole training state, replaced atomically every ``save_every`` steps and at the end
    model/          the final model, written with ``save_pretrained`` (config.json + model.safetensors)

It runs as one process on CPU or a GPU, or as one process per GPU under ``torchrun`` (DDP over NCCL; gloo on CPU),
where only rank 0 logs and writes. Batches are built by a ``DataLoader`` (workers, pinned memory) from
:class:`~mixgf.collate.PretrainBatches`, whose step ``k`` is a pure function of ``k``. A rerun with ``resume=True``
continues from ``checkpoint.pt`` and gives the same weights as an uninterrupted run: the checkpoint holds the step
(the learning rate and the batches are pure functions of it), the optimizer and every rank's random number
generators (dropout); it refuses a checkpoint written with other settings or another corpus.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from datasets import Dataset
from dvclive import Live
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mixgf.checkpoint import VOCAB_FILE, check_token_dataset
from mixgf.collate import MLMCollator, PretrainBatches
from mixgf.io import atomic_dir
from mixgf.model import IGNORE_INDEX, MixGFForPretraining
from mixgf.vocab import GeneVocab

CHECKPOINT = "checkpoint.pt"
MODEL_DIR = "model"


@dataclass
class PretrainConfig:
    """Optimisation settings; the defaults are the paper's (SPEC §4) where it states them.

    ``batch_size`` is per process. ``max_steps``, when set, replaces ``epochs`` as the length of the run (and of the
    cosine schedule). ``balance_species`` (ours) makes every epoch hold as many cells of each species as of the largest
    (:func:`mixgf.collate.balanced_rows`; the paper's corpus is 44% mouse). ``grad_clip`` 1.0 is the Hugging Face
    Trainer's default, which the authors used. ``dtype`` is the autocast dtype on GPUs ("bfloat16" or "float32"); CPU
    always runs in float32.

    The last four fields (:data:`RUNTIME_FIELDS`) change how a run is watched and fed, not what it computes: a
    checkpoint resumes when only they differ. ``num_workers`` are DataLoader processes building batches;
    ``deterministic`` turns on ``torch.use_deterministic_algorithms`` (on CUDA, bit-identical reruns at some speed).
    """

    lr: float = 1e-3
    warmup_steps: int = 10_000
    weight_decay: float = 0.001
    batch_size: int = 8
    epochs: int = 10
    max_steps: int | None = None
    grad_clip: float = 1.0
    megabatch: int = 50
    balance_species: bool = False
    mlm_probability: float = 0.15
    pad_to_multiple_of: int = 8
    seed: int = 42
    dtype: str = "bfloat16"
    save_every: int = 1000
    log_every: int = 10
    num_workers: int = 0
    deterministic: bool = False

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        for name in ("batch_size", "epochs", "megabatch", "pad_to_multiple_of", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


RUNTIME_FIELDS = ("save_every", "log_every", "num_workers", "deterministic")


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
    return torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)  # one kernel per step for all tensors, also on CPU


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

def _seed(seed: int, rank: int) -> None:
    """Seed python, numpy and torch (dropout) with an independent stream for this rank."""
    rank_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)


def _rng_state(device: torch.device) -> dict:
    name, keys, *rest = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), *rest),  # a list, so the checkpoint loads with weights_only=True
        "torch": torch.get_rng_state(),
        "device": torch.cuda.get_rng_state(device) if device.type != "cpu" else None,
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if device.type != "cpu":
        torch.cuda.set_rng_state(state["device"], device)


def _all_rng_states(proc: _Process) -> list[dict]:
    """Every rank's generator states, indexed by rank (collective: all ranks call it)."""
    state = _rng_state(proc.device)
    if proc.world_size == 1:
        return [state]
    states = [None] * proc.world_size
    dist.all_gather_object(states, state)
    return states


_BOOKKEEPING = ("transformers_version", "architectures", "_name_or_path", "dtype")


def _architecture(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _BOOKKEEPING}


def _run_identity(model_config, cfg: PretrainConfig, dataset: Dataset, world_size: int) -> dict:
    """What a checkpoint must share with a run to be resumed by it: everything that changes the computation."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS}
    return {"model": _architecture(model_config), "pretrain": settings,
            "corpus": {"fingerprint": dataset._fingerprint, "rows": len(dataset)}, "processes": world_size}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every leaf where two nested dicts differ."""
    out = []
    for key in sorted(old.keys() | new.keys(), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def checkpoint_differences(out_dir: str | Path, model_config, cfg: PretrainConfig, dataset: Dataset,
                           world_size: int = 1) -> list[str] | None:
    """How the checkpoint in ``out_dir`` differs from this run (``[]``: it can be resumed), or ``None`` if there is
    none. Settings of :data:`RUNTIME_FIELDS` (logging, saving, workers) are not compared."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return _differences(state["run"], _run_identity(model_config, cfg, dataset, world_size))


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temp file beside ``path``, flush it to disk, then rename: a crash leaves the old checkpoint whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _load_checkpoint(path: Path, run: dict, model: MixGFForPretraining,
                     optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """Restore model and optimizer from ``path``; return the step and every rank's RNG states.

    Refuses a checkpoint of another run: continuing it with another learning rate, schedule, batch size or corpus
    would silently give a model that no configuration describes.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = _differences(state["run"], run)
    if changed:
        raise ValueError(f"{path} was written by another run, so it cannot be continued; it differs in "
                         + "; ".join(changed) + ". Restore those settings to resume, or pass resume=False "
                         "(or delete the checkpoint) to start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
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


def _species_codes(dataset: Dataset, meta: dict) -> tuple[list[str], np.ndarray]:
    """The species of the corpus and each row's index into them (column ``species``, else the metadata's)."""
    if "species" in dataset.column_names:
        column = pa.chunked_array(dataset.with_format("arrow")["species"])
        names = sorted(pc.unique(column).to_pylist())
        return names, pc.index_in(column, value_set=pa.array(names)).to_numpy().astype(np.int8)
    names = list(meta.get("species") or [])
    if len(names) != 1:
        raise ValueError("the token dataset has no 'species' column and its metadata names "
                         f"{names or 'no species'}; masking needs each cell's species: add the column")
    return names, np.zeros(len(dataset), dtype=np.int8)


def _truncate_logs(log_dir: Path, step: int) -> None:
    """Drop logged rows past ``step`` (written after the checkpoint a run resumes from), so each step appears once."""
    for tsv in (log_dir / "plots" / "metrics").glob("*.tsv"):
        header, *rows = tsv.read_text().splitlines(keepends=True)
        tsv.write_text(header + "".join(r for r in rows if int(r.split("\t", 1)[0]) <= step))


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------

_LOGGED = ("loss", "loss_mlm", "loss_simcse", "simcse_pos_cos", "simcse_neg_cos", "simcse_accuracy", "loss_ortholog",
           "ortholog_pos_cos", "ortholog_neg_cos", "ortholog_accuracy", "grad_norm")


def pretrain(model: MixGFForPretraining, dataset: Dataset, meta: dict, cfg: PretrainConfig, out_dir: str | Path, *,
             vocab: GeneVocab, resume: bool = True, log_dir: str | Path | None = None,
             model_dir: str | Path | None = None) -> PretrainResult:
    """Pretrain ``model`` on ``dataset`` with MLM (+ SimCSE unless ``model.config.simcse_weight`` is 0).

    Parameters
    ----------
    model
        The model to train, in place; its weights are taken as they are (seed before building it). Under DDP every
        rank passes a model of the same config; rank 0's weights are broadcast.
    dataset
        Token dataset with columns ``input_ids`` (gene ids, rank order), ``length`` and ``species`` (or one species
        in ``meta["species"]``).
    meta
        The dataset's metadata ``{"vocab", "medians", "max_len"}``; it must match the model's config
        (:func:`~mixgf.checkpoint.check_token_dataset`).
    cfg
        Optimisation settings.
    out_dir
        Where ``checkpoint.pt`` and the final ``model/`` go (see the module docstring). Under DDP every rank reads
        the checkpoint, so across nodes it must be on a shared file system.
    vocab
        The vocabulary of the corpus: MLM's random replacements draw from the genes of each cell's species in it,
        and it is saved with the final model, so the model directory is self-describing.
    resume
        Continue from ``out_dir/checkpoint.pt`` if it exists (``ValueError`` if it was written by another run,
        naming what differs); otherwise start at step 0 (overwriting it).
    model_dir
        Where the final model goes (default ``out_dir/model``), e.g. apart from a checkpoint folder that persists.
    log_dir
        dvclive directory for loss, loss_mlm, loss_simcse, the SimCSE diagnostics (mean cosine of positive and of
        negative pairs, contrastive accuracy), loss_ortholog and its diagnostics (ortholog_*), grad_norm (before
        clipping), lr and tokens_per_s (non-pad tokens over all ranks); ``None`` logs nothing. Values are averages over
        the ``log_every`` steps before each logged step. Note that dvclive runs ``dvc init`` at the git root when the
        working directory is in a git repository without DVC.

    Returns
    -------
    PretrainResult with the model, the final step, the last logged metrics and the path of the saved model.

    Raises
    ------
    FloatingPointError
        When a step's gradients are not finite (the weights are left as they were before that step).
    """
    lengths = _lengths(dataset)
    check_token_dataset(model.config, meta)
    if vocab.hash != model.config.vocab["hash"]:
        raise ValueError(f"vocabulary {vocab.name!r} is not the model's ({model.config.vocab}); pass the corpus's")
    species, species_codes = _species_codes(dataset, meta)
    proc = _start_process()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    out_dir = Path(out_dir)
    checkpoint = out_dir / CHECKPOINT
    model_dir = Path(model_dir) if model_dir is not None else out_dir / MODEL_DIR

    model.to(proc.device)
    optimizer = configure_optimizer(model, cfg)
    collate = MLMCollator.for_vocab(vocab, species, orthologs=model.config.ortholog_weight > 0,
                                    mlm_probability=cfg.mlm_probability,
                                    pad_to_multiple_of=cfg.pad_to_multiple_of,
                                    max_length=model.config.max_position_embeddings)
    batches = PretrainBatches(dataset.select_columns("input_ids").with_format("numpy"), lengths, species_codes,
                              collate, cfg.batch_size, megabatch=cfg.megabatch, seed=cfg.seed, rank=proc.rank,
                              world_size=proc.world_size, balance_species=cfg.balance_species)
    total_steps = cfg.max_steps or cfg.epochs * len(batches)
    run = _run_identity(model.config, cfg, dataset, proc.world_size)
    resuming = resume and checkpoint.exists()
    if resuming:
        step, rng_states = _load_checkpoint(checkpoint, run, model, optimizer)
        _set_rng_state(rng_states[proc.rank], proc.device)
    else:
        step = 0
        _seed(cfg.seed, proc.rank)
    if proc.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resuming and log_dir:
            _truncate_logs(Path(log_dir), step)

    simcse = model.config.simcse_weight > 0
    # BERT's pooler gets no gradient unless SimCSE embeds with it, and DDP must be told so
    uses_pooler = simcse and model.config.pooling == "first"
    ddp_model = model if proc.world_size == 1 else DistributedDataParallel(
        model, device_ids=None if proc.device.type == "cpu" else [proc.device], find_unused_parameters=not uses_pooler)
    autocast = _autocast(proc.device, cfg.dtype)
    on_gpu = proc.device.type == "cuda"
    loader = DataLoader(batches, batch_size=None, sampler=range(step, total_steps), num_workers=cfg.num_workers,
                        pin_memory=on_gpu, prefetch_factor=4 if cfg.num_workers else None,
                        generator=torch.Generator())  # its own generator: the global one drives dropout
    live = Live(str(log_dir), dvcyaml=False, save_dvc_exp=False, resume=resuming) if proc.is_main and log_dir else None

    window = torch.zeros(len(_LOGGED) + 1, device=proc.device)  # sums since the last log, then the token count
    window_steps, window_start, metrics = 0, time.perf_counter(), {}
    bar = tqdm(total=total_steps, initial=step, desc="pretrain", disable=not proc.is_main,
               mininterval=1 if sys.stderr.isatty() else 30)  # a readable log when stderr is a file (dvc repro)
    model.train()
    for batch in loader:
        lr = lr_at(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = {k: v.to(proc.device, non_blocking=True) for k, v in batch.items()}
        n_masked = (batch["labels"] != IGNORE_INDEX).sum()
        if proc.world_size > 1:  # the MLM loss averages over the masked genes of all processes
            dist.all_reduce(n_masked)
        with autocast:
            out = ddp_model(**batch, num_items_in_batch=n_masked / proc.world_size)
        out.loss.backward()
        # the norm of the all-reduced gradients: the same on every rank, so all stop together
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(
                f"step {step}: the loss ({out.loss.item():.4g}) or its gradients are not finite, so training stops "
                f"before the weights are spoilt; the last checkpoint in {out_dir} is intact. Lower pretrain.lr or "
                "raise pretrain.warmup_steps, or check the corpus for empty cells")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update()

        values = {"loss": out.loss, "loss_mlm": out.loss_mlm, "grad_norm": grad_norm, **out.diagnostics,
                  **{k: getattr(out, k) for k in ("loss_simcse", "loss_ortholog") if getattr(out, k) is not None}}
        window += torch.stack([values[k].detach().float() if k in values else torch.zeros((), device=proc.device)
                               for k in _LOGGED] + [batch["attention_mask"].sum().float()])
        window_steps += 1
        if step % cfg.log_every == 0 or step == total_steps:
            if proc.world_size > 1:
                dist.all_reduce(window)
            *sums, n_tokens = window.tolist()
            means = dict(zip(_LOGGED, (s / (window_steps * proc.world_size) for s in sums)))
            metrics = {k: v for k, v in means.items() if k in values}
            metrics |= {"lr": lr, "tokens_per_s": n_tokens / (time.perf_counter() - window_start)}
            if live:
                live.step = step
                for name, value in metrics.items():
                    live.log_metric(name, value)
                live.next_step()
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)  # redrawn at the bar's interval
            window.zero_()
            window_steps, window_start = 0, time.perf_counter()
        if step % cfg.save_every == 0 or step == total_steps:
            rng_states = _all_rng_states(proc)
            if proc.is_main:
                _save_checkpoint(checkpoint, {"step": step, "model": model.state_dict(),
                                              "optimizer": optimizer.state_dict(), "rng": rng_states, "run": run})
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
