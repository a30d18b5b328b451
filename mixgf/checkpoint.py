"""A saved model as inference sees it, without transformers' model classes: its config, vocabulary and weights.

In silico perturbation and embeddings only run a BERT encoder (:mod:`mixgf.encoder`), and importing transformers'
model classes costs seconds of a command that otherwise takes a few: this module reads ``config.json`` and the
weight file directly, and checks a token dataset against the model (vocabulary, medians, length) before any work.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mixgf.vocab import GeneVocab

VOCAB_FILE = "vocab.tsv"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# BertConfig's defaults for the keys the checks and the encoder read (a saved config.json usually holds them all)
BERT_DEFAULTS = {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "type_vocab_size": 2, "pad_token_id": 0,
                 "max_position_embeddings": 512, "position_embedding_type": "absolute", "is_decoder": False}


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def with_identity(config, model_dir: Path, vocab: GeneVocab | None):
    """``config`` with the identity attributes :func:`check_token_dataset` reads (``None`` where it records none);
    ``vocab`` stands in for a checkpoint that records no vocabulary (Geneformer V1)."""
    for name in ("vocab", "medians", "max_len"):
        if not hasattr(config, name):
            setattr(config, name, None)
    if config.vocab is None and vocab is not None:
        if len(vocab) != config.vocab_size:
            raise ValueError(f"{model_dir}: the model has {config.vocab_size} tokens but vocabulary {vocab.name!r} "
                             f"has {len(vocab)}; name the vocabulary the checkpoint was trained with")
        config.vocab = vocab.identity()
    return config


def read_config(model_dir, vocab: GeneVocab | None = None) -> SimpleNamespace:
    """``model_dir/config.json`` as attributes, BERT's defaults where it is silent, with the model's identity."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; is it a saved Hugging Face model folder?")
    config = SimpleNamespace(**{**BERT_DEFAULTS, **json.loads(path.read_text())})
    return with_identity(config, Path(model_dir), vocab)


def read_weights(model_dir) -> dict[str, torch.Tensor]:
    """The state dict of ``model_dir`` (``model.safetensors``, else ``pytorch_model.bin``, read without unpickling
    code), with the names of a bare ``BertModel``: a ``bert.`` prefix (BertForMaskedLM, ...ForSequenceClassification)
    is removed and old LayerNorm names (``gamma``, ``beta``) become ``weight``, ``bias``."""
    model_dir = Path(model_dir)
    path = next((model_dir / f for f in WEIGHT_FILES if (model_dir / f).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{model_dir}: no {' or '.join(WEIGHT_FILES)} (a sharded checkpoint: save it unsharded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    prefixed = any(k.startswith("bert.") for k in state)
    renamed = {}
    for key, value in state.items():
        if prefixed and not key.startswith("bert."):
            continue  # a head
        key = key.removeprefix("bert.")
        if ".LayerNorm." in key:
            key = key.replace(".gamma", ".weight").replace(".beta", ".bias")
        renamed[key] = value
    return renamed


def check_token_dataset(config, meta: dict, source: str = "the token dataset") -> None:
    """Raise ``ValueError`` unless a token dataset (its metadata ``meta``) was made with the model's vocabulary,
    gene medians and maximum length; ``source`` names the dataset in the message."""
    vocab = meta["vocab"]
    if config.vocab is None:
        raise ValueError(
            f"the model records no vocabulary, so {source} (vocabulary {vocab['name']!r}) cannot be checked against it; "
            "if the checkpoint was trained on that vocabulary, set model.config.vocab = vocab.identity()"
        )
    if (vocab["hash"], vocab["size"]) != (config.vocab["hash"], config.vocab["size"]):
        raise ValueError(
            f"{source} was tokenized with vocabulary {vocab['name']!r} ({vocab['size']} tokens, hash {vocab['hash']}) "
            f"but the model uses {config.vocab['name']!r} ({config.vocab['size']} tokens, hash {config.vocab['hash']}); "
            "tokenize the cells with the model's vocabulary"
        )
    for species, medians in (meta.get("medians") or {}).items():
        trained = (config.medians or {}).get(species)
        if trained is not None and medians is not None and medians["hash"] != trained["hash"]:
            raise ValueError(
                f"{source} normalized its {species} cells with gene medians {medians['name']!r} ({medians['hash']}) "
                f"but the model was trained with {trained['name']!r} ({trained['hash']}); tokenize the cells with "
                "the model's medians"
            )
    if meta["max_len"] > config.max_position_embeddings:
        raise ValueError(
            f"{source} keeps up to {meta['max_len']} genes per cell but the model has {config.max_position_embeddings} "
            "positions; tokenize with a smaller max_len"
        )
    if config.max_len is not None and meta["max_len"] != config.max_len:
        raise ValueError(
            f"{source} keeps up to {meta['max_len']} genes per cell but the model was trained on up to {config.max_len}; "
            f"tokenize with max_len={config.max_len}"
        )


def length_limit(config, meta: dict, source: str) -> int:
    """Check the tokens against the model and return how many top-ranked genes of a cell the model takes.

    A cell tokenized with a larger ``max_len`` than the model's, cut to its top genes, is exactly the cell tokenized
    with the model's (rank-value encoding keeps a prefix), so the check sees the dataset as it will be fed.
    """
    limit = config.max_len or config.max_position_embeddings
    check_token_dataset(config, {**meta, "max_len": min(meta["max_len"], limit)}, source)
    return limit


def warn_truncation(lengths: np.ndarray, limit: int) -> None:
    long = int((lengths > limit).sum())
    if long:
        warnings.warn(f"{long:,} of {len(lengths):,} cells hold more than {limit} genes; they are cut to their "
                      f"{limit} top-ranked genes", stacklevel=3)


def token_column(dataset, name: str) -> np.ndarray:
    """One column of a token dataset, with an error naming the columns it has."""
    if name not in dataset.column_names:
        raise ValueError(f"the token dataset has no column {name!r}; its columns are {dataset.column_names}. "
                         "Tokenize with --obs-keys naming it")
    return np.asarray(dataset.select_columns([name]).to_pandas()[name])


def model_vocab(model_dir: Path, config, vocab: GeneVocab | None) -> GeneVocab:
    """The vocabulary saved with the model: the model directory's ``vocab.tsv``, else ``vocab``; it must be the
    one the config records."""
    path = Path(model_dir) / VOCAB_FILE
    found = GeneVocab.read(path, name=config.vocab["name"]) if path.exists() else vocab
    if found is None:
        raise FileNotFoundError(f"{model_dir} has no {VOCAB_FILE}; name the checkpoint's vocabulary (--vocab)")
    if found.hash != config.vocab["hash"]:
        raise ValueError(f"{path if path.exists() else found.name}: vocabulary hash {found.hash} differs from the "
                         f"{config.vocab['hash']} the model's config records")
    return found
