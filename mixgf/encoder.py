"""BERT's encoder arithmetic with fused QKV, for inference (in silico perturbation, embeddings) and fine-tuning.

- :class:`Encoder` runs a saved model's encoder only as far as one layer, for inference. Geneformer's convention
  names the layer (``emb_layer``: 0 the last, -1 the one before, down to ``-num_hidden_layers``, the input
  embeddings). No MLM or classifier head and no pooler run, and the layers above the chosen one are never computed.
  Built from the weight file itself (:func:`mixgf.checkpoint.read_weights`), so that a command which only encodes
  does not import transformers' model classes.
- :func:`embeddings` and :func:`bert_layer` are ``BertEmbeddings`` and ``BertLayer`` as functions of their weights
  (a ``BertModel`` state dict's names), dropout included, so that fine-tuning (:mod:`mixgf.classify`) trains a
  Hugging Face model's own parameters through them and can compute a layer for its first position only.
- :func:`map_batches` runs independent inference batches side by side on a CPU's cores.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from mixgf.checkpoint import read_weights

# transformers' ACT2FN names of the activations BERT checkpoints use; "gelu" is the exact (erf) form
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu,
               "gelu_new": partial(F.gelu, approximate="tanh"), "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}

# a BertLayer's parts after self-attention, by the name the forward pass uses
LAYER_PARTS = {"out": "attention.output.dense", "norm1": "attention.output.LayerNorm", "up": "intermediate.dense",
               "down": "output.dense", "norm2": "output.LayerNorm"}
EMBEDDING_WEIGHTS = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                     "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
                     "embeddings.LayerNorm.bias"]
ATTENTION_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value")


def check_architecture(config) -> None:
    """Refuse a BERT variant these functions do not compute (all of the field's checkpoints are plain BERT).
    transformers 5's ``BertConfig`` has neither key (it builds only this variant); an older config.json may."""
    positions, decoder = getattr(config, "position_embedding_type", "absolute"), getattr(config, "is_decoder", False)
    if positions != "absolute" or decoder:
        raise ValueError("mixgf's encoder supports encoder-only BERT with absolute position embeddings; "
                         f"this model has position_embedding_type={positions!r}, is_decoder={decoder}")
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {config.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")


def layer_weights(weights: dict[str, torch.Tensor], i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer ``i``'s (weight, bias) pairs by the names :func:`bert_layer` uses, query, key and value fused."""
    def pair(name):
        return weights[f"encoder.layer.{i}.{name}.weight"], weights[f"encoder.layer.{i}.{name}.bias"]

    query, key, value = (pair(name) for name in ATTENTION_PARTS)
    return {"qkv": (torch.cat([query[0], key[0], value[0]]), torch.cat([query[1], key[1], value[1]])),
            **{name: pair(part) for name, part in LAYER_PARTS.items()}}


def apply_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(x, p)`` in training mode: each element kept with probability ``1 - p`` and scaled by
    ``1 / (1 - p)``. On CPU the mask comes from ``rand_like``, half the cost of the ``bernoulli_`` F.dropout draws
    (a tenth of a small model's training step); on a GPU F.dropout's fused kernel is faster."""
    if not p:
        return x
    if x.is_cuda:
        return F.dropout(x, p)
    return x * ((torch.rand_like(x) >= p) * (1 / (1 - p)))


def embeddings(input_ids: torch.Tensor, weights: dict[str, torch.Tensor], eps: float, *, padding_idx=None,
               dropout: float = 0.0) -> torch.Tensor:
    """``BertEmbeddings`` (token type 0, positions 0..L-1) in its order of additions; ``padding_idx``: the word
    embedding row that gets no gradient, as ``nn.Embedding``'s."""
    word = F.embedding(input_ids, weights["embeddings.word_embeddings.weight"], padding_idx)
    h = (word + weights["embeddings.token_type_embeddings.weight"][0]
         + weights["embeddings.position_embeddings.weight"][: input_ids.shape[1]])
    h = F.layer_norm(h, h.shape[-1:], weights["embeddings.LayerNorm.weight"], weights["embeddings.LayerNorm.bias"], eps)
    return apply_dropout(h, dropout)


def bert_layer(h: torch.Tensor, layer: dict, heads: int, eps: float, act, keys: torch.Tensor | None, *,
               dropout: float = 0.0, attention_dropout: float = 0.0, first_only: bool = False) -> torch.Tensor:
    """One ``BertLayer`` on hidden states ``h`` (N, L, H), SDPA attention on strided views of the fused QKV (no
    copy; about 10% faster on CPU than contiguous heads). ``keys``: a boolean (N, 1, 1, L) mask of the positions
    attended to, ``None`` without padding. ``first_only``: the output at position 0 alone (N, 1, H), from its query
    and every position's key and value: all a pooler on position 0 reads, at a fraction of the work."""
    n, length, width = h.shape
    weight, bias = layer["qkv"]
    if first_only:
        q = F.linear(h[:, :1], weight[:width], bias[:width]).view(n, 1, heads, -1).transpose(1, 2)
        k, v = F.linear(h, weight[width:], bias[width:]).view(n, length, 2, heads, -1).permute(2, 0, 3, 1, 4)
        h, length = h[:, :1], 1
    else:
        q, k, v = F.linear(h, weight, bias).view(n, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=attention_dropout)
    context = context.transpose(1, 2).reshape(n, length, width)
    attended = apply_dropout(F.linear(context, *layer["out"]), dropout) + h
    attended = F.layer_norm(attended, (width,), *layer["norm1"], eps)
    out = apply_dropout(F.linear(act(F.linear(attended, *layer["up"])), *layer["down"]), dropout) + attended
    return F.layer_norm(out, (width,), *layer["norm2"], eps)


def key_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The (N, 1, 1, L) boolean key mask of SDPA, or ``None`` when nothing is padded (SDPA's fastest path)."""
    return None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]


class Encoder:
    """The first ``n_layers`` layers of a BERT encoder, from its ``BertModel`` state dict ``weights``, in eval mode:
    the same arithmetic as ``BertModel``, about twice as fast."""

    def __init__(self, weights: dict[str, torch.Tensor], config, n_layers: int, device: torch.device):
        check_architecture(config)
        parts = (*ATTENTION_PARTS, *LAYER_PARTS.values())
        needed = [*EMBEDDING_WEIGHTS, *(f"encoder.layer.{i}.{part}.{kind}" for i in range(n_layers) for part in parts
                                        for kind in ("weight", "bias"))]
        missing = [k for k in needed if k not in weights]
        if missing:
            raise ValueError(f"the checkpoint lacks encoder weights {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        self.weights = {k: weights[k].to(device=device, dtype=torch.float32) for k in needed}
        self.layers = [layer_weights(self.weights, i) for i in range(n_layers)]
        self.heads, self.width, self.eps = config.num_attention_heads, config.hidden_size, config.layer_norm_eps
        self.act = ACTIVATIONS[config.hidden_act]
        self.device = device

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L, hidden) hidden states after ``n_layers`` layers (0: the embeddings)."""
        h = embeddings(input_ids, self.weights, self.eps)
        keys = key_mask(attention_mask)
        for layer in self.layers:
            h = bert_layer(h, layer, self.heads, self.eps, self.act, keys)
        return h


def map_batches(fn, batches, device: torch.device, max_workers: int = 4):
    """``fn`` over the iterable ``batches``, results in order. On a CPU of several torch threads the batches run in
    up to ``max_workers`` Python threads that share the torch threads (torch releases the GIL in its kernels): a
    small model's operations spread over 2 cores at about 1.5x one core's rate, two independent batches at about
    1.9x. Each batch is still computed by one worker alone, so results do not depend on the scheduling; memory is
    one batch per worker, and ``batches`` is read ahead by one batch per worker. Elsewhere (a GPU, one thread) in
    turn."""
    threads = torch.get_num_threads()
    workers = min(threads, max_workers)
    if device.type != "cpu" or workers == 1:
        yield from map(fn, batches)
        return

    def run(batch):
        torch.set_num_threads(threads // workers)
        return fn(batch)

    pending = deque()
    try:
        with ThreadPoolExecutor(workers) as pool:
            for batch in batches:
                pending.append(pool.submit(run, batch))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        torch.set_num_threads(threads)  # a worker's setting can become the caller's (before its first read)


def load_encoder(model_dir: Path, config, emb_layer: int, device: torch.device) -> Encoder:
    """The encoder of the model in ``model_dir`` (``config``: its config), float32, up to ``emb_layer``."""
    if not -config.num_hidden_layers <= emb_layer <= 0:
        raise ValueError(f"emb_layer must be in [-{config.num_hidden_layers}, 0] (0: the last of the model's "
                         f"{config.num_hidden_layers} layers, -1: the one before), got {emb_layer}")
    return Encoder(read_weights(model_dir), config, config.num_hidden_layers + emb_layer, device)
