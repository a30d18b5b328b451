"""mixgf.embed and `mixgf embed`: layer means over genes, Geneformer's layer numbering, rows aligned with the input."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

from mixgf.cli import main
from mixgf.embed import embed_anndata, embed_cells
from mixgf.tokenize import tokenize_files
from mixgf.tokens import load_tokens
from mixgf.vocab import GeneVocab, default_medians, default_vocab

N_GENES, MAX_LEN = 120, 32


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """(h5ad path, token dataset path, vocabulary): 40 cells of raw counts over 120 real human genes, cell 7 empty."""
    root = tmp_path_factory.mktemp("embed")
    medians = set(default_medians("human").values.index)
    genes = [g for g in default_vocab().tokens if g in medians][:N_GENES]
    vocab = GeneVocab(default_vocab().tokens[:2] + tuple(genes), name="tiny")
    rng = np.random.default_rng(0)
    expressed = rng.random((40, N_GENES)) < rng.uniform(0.05, 0.5, (40, 1))
    counts = rng.negative_binomial(1, 0.5, (40, N_GENES)) * expressed
    counts[np.arange(40), np.arange(40) % 7] += 1  # every cell holds a gene...
    counts[7] = 0  # ...but this one
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs={"cell_type": [f"t{i % 3}" for i in range(40)]})
    adata.obs_names, adata.var_names = [f"cell{i}" for i in range(40)], genes
    adata.write_h5ad(root / "cells.h5ad")
    tokenize_files([root / "cells.h5ad"], root / "tokens", species="human", vocab=vocab, obs_keys=["cell_type"],
                   max_len=MAX_LEN, progress=False)
    return root / "cells.h5ad", root / "tokens", vocab


def config(vocab, meta) -> BertConfig:
    return BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=MAX_LEN, vocab=vocab.identity(),
                      medians=meta["medians"], max_len=MAX_LEN)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, cells):
    _, tokens, vocab = cells
    _, meta = load_tokens(tokens)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    BertForMaskedLM(config(vocab, meta)).save_pretrained(out)
    vocab.write(out / "vocab.tsv")
    return out


def by_hand(model: BertModel, dataset, layer: int) -> np.ndarray:
    """Each cell alone, unpadded: the mean over its genes of hidden_states[num_layers + layer]."""
    with torch.no_grad():
        return np.stack([model(input_ids=torch.tensor([ids]), output_hidden_states=True)
                         .hidden_states[model.config.num_hidden_layers + layer][0].mean(0).numpy()
                         for ids in dataset["input_ids"]])


def test_layer_means_match_cell_by_cell(model_dir, cells):
    dataset, meta = load_tokens(cells[1])
    assert len(set(dataset["length"])) > 10  # lengths differ, so batches are padded and reordered
    encoder = BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    for layer in (0, -1, -3):  # last layer, the one before, the input embeddings
        got = embed_cells(model_dir, dataset, meta, layer=layer, batch_size=6, dtype="float32")  # float32 on GPUs too
        assert got.shape == (39, 16) and got.dtype == np.float32
        assert got == pytest.approx(by_hand(encoder, dataset, layer), abs=1e-4)
    assert not np.allclose(embed_cells(model_dir, dataset, meta), embed_cells(model_dir, dataset, meta, layer=-1))


def test_a_fine_tuned_classifier_embeds_with_its_encoder(cells, tmp_path):
    dataset, meta = load_tokens(cells[1])
    torch.manual_seed(1)
    classifier = BertForSequenceClassification(config(cells[2], meta))
    classifier.save_pretrained(tmp_path)
    got = embed_cells(tmp_path, dataset, meta, layer=-1, dtype="float32")
    assert got == pytest.approx(by_hand(classifier.bert.eval(), dataset, -1), abs=1e-4)


def test_bad_layer_and_other_vocabulary_fail_clearly(model_dir, cells):
    dataset, meta = load_tokens(cells[1])
    with pytest.raises(ValueError, match=r"layer must be in \[-3, 0\]"):
        embed_cells(model_dir, dataset, meta, layer=1)
    with pytest.raises(ValueError, match="tokenize the cells with the model's vocabulary"):
        embed_cells(model_dir, dataset, {**meta, "vocab": default_vocab().identity()})


def test_cli_embeds_tokens_and_h5ad_with_rows_aligned(model_dir, cells, tmp_path):
    h5ad, tokens, _ = cells
    assert main(["embed", str(model_dir), str(tokens), "--out", str(tmp_path / "tokens.h5ad")]) == 0
    from_tokens = ad.read_h5ad(tmp_path / "tokens.h5ad")
    assert from_tokens.n_obs == 39 and "cell7" not in from_tokens.obs_names  # the empty cell has no tokens
    assert from_tokens.obs_names[:3].tolist() == ["cell0", "cell1", "cell2"]
    assert from_tokens.obs.cell_type.tolist() == [f"t{i % 3}" for i in range(40) if i != 7]

    assert main(["embed", str(model_dir), str(h5ad), "--species", "human", "--out", str(tmp_path / "cells.h5ad")]) == 0
    from_h5ad = ad.read_h5ad(tmp_path / "cells.h5ad")
    assert from_h5ad.obs_names.tolist() == [f"cell{i}" for i in range(40)] and from_h5ad.X.shape == (40, N_GENES)
    emb = from_h5ad.obsm["X_mixgf"]
    assert np.isnan(emb[7]).all() and from_h5ad.uns["X_mixgf"]["n_cells_not_embedded"] == 1
    small = ["--batch-size", "3", "--max-tokens", "40", "--out", str(tmp_path / "small.h5ad")]
    assert main(["embed", str(model_dir), str(h5ad), "--species", "human", *small]) == 0  # batches of 1-3 cells
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "small.h5ad").obsm["X_mixgf"], emb, rtol=0, atol=1e-6)
    assert main(["embed", str(model_dir), str(tokens), "--max-tokens", "0", "--out", str(tmp_path / "no.h5ad")]) == 2
    assert not (tmp_path / "no.h5ad").exists()  # the option reaches the batching, which refuses it
    assert np.delete(emb, 7, axis=0) == pytest.approx(from_tokens.obsm["X_mixgf"], abs=1e-6)  # the same batches
    assert main(["embed", str(model_dir), str(h5ad), "--out", str(tmp_path / "x.h5ad")]) == 2  # no --species


def test_embed_anndata_copy(model_dir, cells):
    adata = ad.read_h5ad(cells[0])
    out = embed_anndata(adata, model_dir, species="human", copy=True, key_added="X_tiny")
    assert "X_tiny" not in adata.obsm and out.obsm["X_tiny"].shape == (40, 16)
    assert embed_anndata(adata, model_dir, species="human") is None and "X_mixgf" in adata.obsm
