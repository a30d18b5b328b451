"""The encoder of a saved BERT model, only as far as one layer, for inference: in silico perturbation and embeddings.

Geneformer's convention names the layer (``emb_layer``: 0 the last, -1 the one before, down to
``-num_hidden_layers``, the input embeddings). No MLM or classifier head and no pooler run, and the layers above
the chosen one are never computed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


class Encoder:
    """The first ``n_layers`` layers of a ``BertModel``, run with contiguous SDPA attention (the same arithmetic as
    ``BertLayer`` in eval mode, about twice as fast on CPU) and a boolean key mask only when a batch has padding."""

    def __init__(self, bert, n_layers: int, device: torch.device):
        config = bert.config
        if getattr(config, "position_embedding_type", "absolute") != "absolute" or config.is_decoder:
            raise ValueError("mixgf's encoder supports encoder-only BERT with absolute position embeddings; "
                             f"this model has position_embedding_type={config.position_embedding_type!r}, "
                             f"is_decoder={config.is_decoder}")
        self.bert = bert.to(device).eval()
        self.layers = list(bert.encoder.layer[:n_layers])
        self.heads = config.num_attention_heads
        self.qkv = [(torch.cat([s.query.weight, s.key.weight, s.value.weight]),
                     torch.cat([s.query.bias, s.key.bias, s.value.bias]))
                    for s in (layer.attention.self for layer in self.layers)]
        self.device = device

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L, hidden) hidden states after ``n_layers`` layers (0: the embeddings)."""
        h = self.bert.embeddings(input_ids=input_ids)
        n, length, width = h.shape
        keys = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        for layer, (w, b) in zip(self.layers, self.qkv):
            q, k, v = F.linear(h, w, b).view(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4).contiguous()
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
            context = context.transpose(1, 2).reshape(n, length, width)
            attended = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + h)
            h = layer.output.LayerNorm(layer.output.dense(layer.intermediate(attended)) + attended)
        return h


def load_encoder(model_dir: Path, config, emb_layer: int, device: torch.device) -> Encoder:
    """The encoder of the model in ``model_dir`` (``config``: its config), float32, up to ``emb_layer``."""
    from transformers import AutoModel

    if not -config.num_hidden_layers <= emb_layer <= 0:
        raise ValueError(f"emb_layer must be in [-{config.num_hidden_layers}, 0] (0: the last of the model's "
                         f"{config.num_hidden_layers} layers, -1: the one before), got {emb_layer}")
    bert = AutoModel.from_pretrained(model_dir, config=config, dtype=torch.float32, add_pooling_layer=False)
    return Encoder(bert, config.num_hidden_layers + emb_layer, device)  # Geneformer: hidden_states[n + emb_layer]
