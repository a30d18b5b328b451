"""BERT's encoder arithmetic with fused QKV, for inference (in silico perturbation, embeddings) and fine-tuning.

- :class:`Encoder` runs a saved model's encoder only as far as one layer, for inference, each layer in an exact
  but cheaper form (:func:`inference_layer_weights`, residuals accumulated in place). Geneformer's convention
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

# in-place forms of those, for inference on intermediates nobody else reads
INPLACE_ACTIVATIONS = {"relu": F.relu_, "silu": partial(F.silu, inplace=True), "swish": partial(F.silu, inplace=True)}

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


def inference_layer_weights(weights: dict[str, torch.Tensor], i: int) -> dict:
    """Layer ``i``'s weights in the form :func:`bert_layer` computes fastest without gradients: the query projection
    alone (``q``), key and value without bias (``kv``), and the value bias folded into the output bias. Exact: a key
    bias adds the same number to every score of a query, which softmax ignores, and a value bias adds itself to
    every context row (attention weights sum to 1), which the output projection maps to a constant. Saves copying
    two thirds of the biases into the projections' outputs."""
    layer = layer_weights(weights, i)
    (weight, bias), (out_weight, out_bias) = layer.pop("qkv"), layer["out"]
    width = out_weight.shape[0]
    return {**layer, "q": (weight[:width], bias[:width]), "kv": weight[width:],
            "out": (out_weight, out_bias + out_weight @ bias[2 * width :])}


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A CPU dropout mask shaped as ``x``: 0 with probability ``p`` rounded to a multiple of 2^-16 (0.1 -> 0.100006),
    else ``1 / (1 - that probability)``, so the expectation stays exactly 1. Each 64-bit random number gives four
    16-bit draws: a third of the cost of a mask from ``rand_like`` uniforms or ``bernoulli_``, which took a tenth of
    a small model's training step."""
    dropped = round(p * 65536)
    draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, None)
    draws = draws.view(torch.int16)
    keep = draws[: x.numel()].view(x.shape) >= dropped - 32768
    return keep.view(torch.uint8).to(x.dtype).mul_(65536 / (65536 - dropped))


def apply_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(x, p)`` in training mode (on CPU with the masks of :func:`dropout_mask`; on a GPU F.dropout's
    fused kernel)."""
    if not p:
        return x
    return F.dropout(x, p) if x.is_cuda else x * dropout_mask(x, p)


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(x, p) + residual`` (training mode), on CPU in one pass (``addcmul``)."""
    if not p or x.is_cuda:
        return apply_dropout(x, p) + residual
    return torch.addcmul(residual, x, dropout_mask(x, p))


def linear_residual(x: torch.Tensor, weight_bias: tuple[torch.Tensor, torch.Tensor], residual: torch.Tensor,
                    dropout: float = 0.0, inplace: bool = False) -> torch.Tensor:
    """BERT's residual connection, ``dropout(linear(x)) + residual``. ``inplace`` (inference on a ``residual`` the
    caller no longer needs): the matrix product accumulates into ``residual`` itself, a pass over the hidden
    states fewer (where the dtypes agree: not under autocast)."""
    weight, bias = weight_bias
    if inplace and not dropout and residual.is_contiguous() and x.dtype == residual.dtype == weight.dtype:
        flat = residual.view(-1, residual.shape[-1]).add_(bias)
        return flat.addmm_(x.reshape(-1, x.shape[-1]), weight.t()).view(residual.shape)
    return dropout_add(F.linear(x, weight, bias), residual, dropout)


def _heads(x: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    return x.view(*x.shape[:2], parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


class _SplitHeads(torch.autograd.Function):
    """(N, L, parts x heads x d) -> ``parts`` views (N, heads, L, d): query, key and value of a fused projection.
    Its backward writes each part's gradient straight into its slice of one buffer (autograd's own stacks them,
    then copies the stack into place: 5x the time, a twentieth of a small model's training step)."""

    @staticmethod
    def forward(ctx, x, parts: int, heads: int):
        n, length, width = x.shape
        ctx.shape, ctx.like = (n, length, parts, heads, width // (parts * heads)), {"dtype": x.dtype, "device": x.device}
        return _heads(x, parts, heads)

    @staticmethod
    def backward(ctx, *grads):
        grad = torch.empty(ctx.shape, **ctx.like)
        for i, g in enumerate(grads):
            grad[:, :, i] = 0 if g is None else g.transpose(1, 2)
        return grad.view(*ctx.shape[:2], -1), None, None


def split_heads(x: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """The attention heads of a fused projection ``x`` (N, L, parts x hidden): ``parts`` strided views (N, heads,
    L, d), no copy."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _SplitHeads.apply(x, parts, heads)
    return _heads(x, parts, heads)


def embeddings(input_ids: torch.Tensor, weights: dict[str, torch.Tensor], eps: float, *, padding_idx=None,
               dropout: float = 0.0) -> torch.Tensor:
    """``BertEmbeddings`` (token type 0, positions 0..L-1) in its order of additions, into the looked-up rows
    (a fresh tensor) in place; ``padding_idx``: the word embedding row that gets no gradient, as ``nn.Embedding``'s."""
    h = F.embedding(input_ids, weights["embeddings.word_embeddings.weight"], padding_idx)
    h = h.add_(weights["embeddings.token_type_embeddings.weight"][0]).add_(
        weights["embeddings.position_embeddings.weight"][: input_ids.shape[1]])
    h = F.layer_norm(h, h.shape[-1:], weights["embeddings.LayerNorm.weight"], weights["embeddings.LayerNorm.bias"], eps)
    return apply_dropout(h, dropout)


def first_position_context(h: torch.Tensor, first: torch.Tensor, layer: dict, heads: int, keys: torch.Tensor | None,
                           attention_dropout: float = 0.0) -> torch.Tensor:
    """The self-attention context of position 0 alone, (N, 1, H), without projecting any other position's key or
    value. A head's query ``q`` scores position j as ``q . (W_k x_j + b_k) = (W_k^T q) . x_j + q . b_k``, and the
    last term, the same for every j, is ignored by softmax; its output is ``sum_j p_j (W_v x_j + b_v) = W_v
    (sum_j p_j x_j) + b_v sum_j p_j``. So each head scores the hidden states themselves against ``W_k^T q`` and
    projects their weighted mean once: 2 x heads x H multiply-adds a position instead of the 2 H^2 of its key and
    value projections. Exact up to float rounding; the key bias gets no gradient (its true gradient is 0). ``first``:
    ``h[:, :1]``, the very view the caller's residual connection reads, so that autograd scatters one gradient back
    into ``h``, not two."""
    n, length, width = h.shape
    d = width // heads
    if "kv" in layer:  # inference_layer_weights: no key bias, the value bias is in the output's
        (q_weight, q_bias), (k_weight, v_weight), v_bias = layer["q"], layer["kv"].split(width), None
    else:
        weight, bias = layer["qkv"]
        (q_weight, k_weight, v_weight), (q_bias, _, v_bias) = weight.split(width), bias.split(width)
    q = F.linear(first, q_weight, q_bias).view(n, heads, d)
    probe = torch.einsum("nhd,hdw->nhw", q, k_weight.view(heads, d, width)) * d ** -0.5
    scores = torch.bmm(probe, h.transpose(1, 2))  # (N, heads, L)
    if keys is not None:
        scores = scores.masked_fill(~keys.view(n, 1, length), float("-inf"))
    p = apply_dropout(torch.softmax(scores, -1), attention_dropout)
    context = torch.einsum("nhw,hdw->nhd", torch.bmm(p, h), v_weight.view(heads, d, width))
    if v_bias is not None:
        context = context + v_bias.view(heads, d) * p.sum(-1, keepdim=True)
    return context.reshape(n, 1, width)


def bert_layer(h: torch.Tensor, layer: dict, heads: int, eps: float, act, keys: torch.Tensor | None, *,
               dropout: float = 0.0, attention_dropout: float = 0.0, first_only: bool = False,
               inplace: bool = False) -> torch.Tensor:
    """One ``BertLayer`` on hidden states ``h`` (N, L, H), SDPA attention on strided views of the fused QKV (no
    copy; about 10% faster on CPU than contiguous heads). ``layer``: :func:`layer_weights`, or for inference
    :func:`inference_layer_weights`. ``keys``: a boolean (N, 1, 1, L) mask of the positions
    attended to, ``None`` without padding. ``first_only``: the output at position 0 alone (N, 1, H), all a pooler on
    position 0 reads, at a fraction of the work (:func:`first_position_context`). ``inplace`` (inference): ``h`` and
    the layer's intermediates are overwritten (:func:`linear_residual`)."""
    n, length, width = h.shape
    if first_only:
        first = h[:, :1]
        context, h = first_position_context(h, first, layer, heads, keys, attention_dropout), first
    else:
        if "kv" in layer:  # inference_layer_weights
            q = split_heads(F.linear(h, *layer["q"]), 1, heads)[0]
            k, v = split_heads(F.linear(h, layer["kv"]), 2, heads)
        else:
            q, k, v = split_heads(F.linear(h, *layer["qkv"]), 3, heads)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=attention_dropout)
        context = context.transpose(1, 2).reshape(n, length, width)
    attended = linear_residual(context, layer["out"], h, dropout, inplace)
    attended = F.layer_norm(attended, (width,), *layer["norm1"], eps)
    out = linear_residual(act(F.linear(attended, *layer["up"])), layer["down"], attended, dropout, inplace)
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
        self.layers = [inference_layer_weights(self.weights, i) for i in range(n_layers)]
        self.heads, self.width, self.eps = config.num_attention_heads, config.hidden_size, config.layer_norm_eps
        self.act = INPLACE_ACTIVATIONS.get(config.hidden_act, ACTIVATIONS[config.hidden_act])
        self.device = device

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L, hidden) hidden states after ``n_layers`` layers (0: the embeddings)."""
        h = embeddings(input_ids, self.weights, self.eps)
        keys = key_mask(attention_mask)
        for layer in self.layers:
            h = bert_layer(h, layer, self.heads, self.eps, self.act, keys, inplace=True)
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
