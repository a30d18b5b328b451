"""Cell embeddings: the mean of one encoder layer over a cell's genes (Geneformer's ``EmbExtractor`` convention).

:func:`embed_cells` runs only the BERT encoder of any saved model (pretrained or fine-tuned; no MLM logits), up to
the chosen layer, and returns one row per cell. :func:`embed_anndata` does the same for an AnnData of raw counts,
tokenized on the fly with the model's vocabulary, and writes ``.obsm[key_added]``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from mixgf.checkpoint import VOCAB_FILE, default_device, length_limit, read_config, token_column, warn_truncation
from mixgf.classify import _autocast, _Cells, batch_tokens
from mixgf.encoder import load_encoder, map_batches
from mixgf.pooling import mean_pool
from mixgf.vocab import GeneVocab


def embed_cells(model_dir, dataset, meta: dict, *, layer: int = 0, batch_size: int = 64,
                max_tokens: int | None = None, dtype: str = "bfloat16", vocab: GeneVocab | None = None,
                source: str = "the token dataset") -> np.ndarray:
    """(n_cells, hidden) float32 embeddings of a token dataset's cells, in dataset order.

    A cell's embedding is the mean over its genes (non-pad positions) of the hidden states of one layer: ``layer`` 0
    is the last layer, -1 the one before, down to ``-num_hidden_layers`` (the input embeddings), as Geneformer's
    ``emb_layer``. The tokens are checked against the model (vocabulary, medians, length: ``ValueError``); ``vocab``
    stands in for a model whose config records none. Batched longest first, at most ``batch_size`` cells and
    :func:`mixgf.classify.batch_tokens` tokens (``max_tokens``) a batch; only the layers up to ``layer`` run
    (:class:`mixgf.encoder.Encoder`); bf16 autocast on a GPU (``dtype``).
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir, vocab)
    limit = length_limit(config, meta, source)
    warn_truncation(token_column(dataset, "length"), limit)
    device = default_device()
    encoder = load_encoder(model_dir, config, layer, device)
    # tensor-core shapes on a GPU; on a CPU no padding beyond the batch's longest cell, so most batches need no mask
    cells = _Cells(dataset, limit, config.max_position_embeddings, 8 if device.type == "cuda" else 1, device)
    out = np.empty((len(dataset), config.hidden_size), np.float32)
    autocast = _autocast(device, dtype)

    def pool(batch) -> tuple[np.ndarray, np.ndarray]:
        where, (input_ids, mask) = batch
        with autocast:
            hidden = encoder(input_ids, mask)
        return where, mean_pool(hidden.float(), mask).cpu().numpy()

    batches = cells.by_length(np.arange(len(dataset)), batch_size, batch_tokens(device, max_tokens))
    for where, pooled in map_batches(pool, batches, device):
        out[where] = pooled
    return out


def embed_anndata(adata, model_dir, *, species: str, layer: int = 0, batch_size: int = 64,
                  max_tokens: int | None = None, medians=None, key_added: str = "X_mixgf", copy: bool = False,
                  **tokenize_kwargs):
    """Embed the cells of ``adata`` (raw counts) with the model in ``model_dir``; sets ``adata.obsm[key_added]``.

    The cells are rank-value encoded with the model's vocabulary (``model_dir/vocab.tsv``), ``medians`` (default:
    the bundled ones of ``species``) and the model's maximum length, then embedded by :func:`embed_cells`
    (``layer``, ``batch_size``, ``max_tokens``).
    ``.obsm[key_added]`` has one row per cell of ``adata``, NaN for cells the tokenizer drops (no counts, no
    vocabulary gene, ``filter_pass`` != 1); ``.uns[key_added]`` records the model, layer and number of such cells.
    ``tokenize_kwargs`` go to :func:`mixgf.tokenize.tokenize_files` (e.g. ``counts="raw"``, ``gene_column``).
    Returns the AnnData with ``copy``, else ``None``.
    """
    from mixgf.tokenize import tokenize_files
    from mixgf.tokens import load_tokens
    from mixgf.vocab import load_medians

    adata = adata.copy() if copy else adata
    model_dir = Path(model_dir)
    config = read_config(model_dir, None)
    vocab = GeneVocab.read(model_dir / VOCAB_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cells.h5ad"
        source = adata.copy()
        source.obs_names = [str(i) for i in range(adata.n_obs)]  # positions: unique even if the names are not
        source.write_h5ad(path)
        tokenize_files([path], Path(tmp) / "tokens", species=species, vocab=vocab,
                       medians=load_medians(species, medians), max_len=config.max_len or config.max_position_embeddings,
                       progress=False, **tokenize_kwargs)
        dataset, meta = load_tokens(Path(tmp) / "tokens")
        embedding = embed_cells(model_dir, dataset, meta, layer=layer, batch_size=batch_size, max_tokens=max_tokens,
                                source=str(path))
        rows = np.asarray(dataset["cell_id"]).astype(int)
    full = np.full((adata.n_obs, embedding.shape[1]), np.nan, np.float32)
    full[rows] = embedding
    adata.obsm[key_added] = full
    adata.uns[key_added] = {"model": str(model_dir), "layer": layer,
                            "n_cells_not_embedded": int(adata.n_obs - len(rows))}
    return adata if copy else None
