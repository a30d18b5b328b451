"""mixgf.perturb and `mixgf perturb`: the token manipulations, Geneformer's own numbers, a plain reference loop, the
statistics against scipy / statsmodels, and padding that changes nothing."""

import random

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import load_file
from scipy.stats import ranksums
from statsmodels.stats.multitest import multipletests
from transformers import BertConfig, BertForMaskedLM, BertModel

from mixgf.cli import main
from mixgf.checkpoint import read_config, read_weights
from mixgf.encoder import Encoder
from mixgf.perturb import (ABSENT, PERTURB_COLUMNS, SHIFT_COLUMNS, STATS_COLUMNS, gene_stats, load_cells,
                           perturb, perturb_to_goal, perturbed_blocks)
from mixgf.vocab import GeneVocab, load_vocab

MAX_POSITIONS = 40  # the random model's length: the real cells (56-286 genes) are cut to it


@pytest.fixture(scope="module")
def isp(test_data, tmp_path_factory):
    """Geneformer's tiny model rebuilt from its reduced weights, the 5 real cells as a Geneformer-format dataset,
    and Geneformer's output for them (tests/data/README.md, geneformer-isp)."""
    folder, root = test_data / "geneformer-isp", tmp_path_factory.mktemp("isp")
    weights = load_file(folder / "tiny_model.safetensors")
    config = BertConfig.from_pretrained(folder)
    word = torch.zeros(config.vocab_size, config.hidden_size)
    word[weights.pop("word_embeddings.rows")] = weights.pop("word_embeddings.values")
    model = BertForMaskedLM(config)
    model.load_state_dict({**weights, "bert.embeddings.word_embeddings.weight": word}, strict=False)
    model.save_pretrained(root / "model")
    cells = pd.read_parquet(folder / "cells_5.parquet")
    Dataset.from_dict({"input_ids": [list(map(int, x)) for x in cells.input_ids], "length": cells.length.tolist(),
                       "cell_type": cells.cell_type.tolist()}).save_to_disk(str(root / "cells"))
    return root / "model", root / "cells", pd.read_parquet(folder / "delete_emb_layer0_5cells.parquet")


@pytest.fixture(scope="module")
def small(isp, tmp_path_factory):
    """A random 2-layer model of MAX_POSITIONS positions over a vocabulary of just the 5 cells' genes, and the cells
    re-encoded in it (Geneformer format); vocabulary file beside."""
    root = tmp_path_factory.mktemp("small")
    v1 = load_vocab("geneformer-v1")
    dataset, _ = load_cells(isp[1], v1)
    used = sorted({int(t) for ids in dataset["input_ids"] for t in ids})
    vocab = GeneVocab(v1.tokens[:2] + tuple(v1.tokens[t] for t in used), name="isp-genes")
    new = {t: i + 2 for i, t in enumerate(used)}
    Dataset.from_dict({"input_ids": [[new[t] for t in ids] for ids in dataset["input_ids"]],
                       "length": dataset["length"], "cell_type": dataset["cell_type"]}).save_to_disk(str(root / "cells"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=MAX_POSITIONS, hidden_act="gelu",
                        initializer_range=0.5)  # large weights: attention far from uniform
    BertForMaskedLM(config).save_pretrained(root / "model")
    vocab.write(root / "vocab.tsv")
    return root / "model", root / "cells", vocab


# ---------------------------------------------------------------------------------------------------------------
# token manipulation on hand-made cells
# ---------------------------------------------------------------------------------------------------------------

CELL = np.array([5, 6, 7, 8])


def test_delete_every_position():
    (b,) = perturbed_blocks(3, CELL, "delete", None, limit=10)
    assert b.tokens.tolist() == [[6, 7, 8], [5, 7, 8], [5, 6, 8], [5, 6, 7]]
    assert b.reference.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]] and b.offset == 0
    assert b.positions.tolist() == [0, 1, 2, 3] and b.genes.tolist() == [5, 6, 7, 8] and b.cell == 3


def test_overexpress_moves_to_front_never_the_first():
    (b,) = perturbed_blocks(0, CELL, "overexpress", None, limit=10)
    assert b.tokens.tolist() == [[6, 5, 7, 8], [7, 5, 6, 8], [8, 5, 6, 7]]
    assert b.positions.tolist() == [1, 2, 3] and b.offset == 1  # the moved gene (position 0) is not compared
    assert b.reference.tolist() == [[0, 2, 3], [0, 1, 3], [0, 1, 2]]  # the same genes, in the original cell


def test_listed_genes_absent_inserted_first_gene_skipped():
    present, absent = perturbed_blocks(0, CELL, "overexpress", np.array([5, 7, 9, 11]), limit=10)
    assert present.tokens.tolist() == [[7, 5, 6, 8]] and present.positions.tolist() == [2]  # 5 is already first
    assert absent.tokens.tolist() == [[9, 5, 6, 7, 8], [11, 5, 6, 7, 8]]
    assert absent.positions.tolist() == [ABSENT, ABSENT] and absent.reference.tolist() == [[0, 1, 2, 3]] * 2
    assert not absent.truncated
    (deleted,) = perturbed_blocks(0, CELL, "delete", np.array([7, 9]), limit=10)  # absent genes: nothing to delete
    assert deleted.tokens.tolist() == [[5, 6, 8]]


def test_insertion_into_a_full_cell_truncates_both():
    (b,) = perturbed_blocks(0, CELL, "overexpress", np.array([9]), limit=4)
    assert b.tokens.tolist() == [[9, 5, 6, 7]] and b.truncated  # the original is the cell without its last gene
    assert b.reference.tolist() == [[0, 1, 2]] and b.offset == 1
    (b,) = perturbed_blocks(0, CELL[:3], "overexpress", np.array([9]), limit=4)
    assert b.tokens.tolist() == [[9, 5, 6, 7]] and not b.truncated


# ---------------------------------------------------------------------------------------------------------------
# Geneformer's own numbers, and a plain per-cell, per-gene reference loop
# ---------------------------------------------------------------------------------------------------------------

def test_equals_geneformer_delete_emb_layer0(isp):
    model, cells, expected = isp
    vocab = load_vocab("geneformer-v1")
    dataset, meta = load_cells(cells, vocab)
    got = perturb(model, dataset, meta, mode="delete", emb_layer=0, vocab=vocab, device="cpu")
    expected = expected.sort_values(["cell_index", "perturbed_position"], ignore_index=True)
    assert list(got.columns) == PERTURB_COLUMNS and len(got) == len(expected) == 836
    pd.testing.assert_frame_equal(got.drop(columns="cos_sim"), expected.drop(columns="cos_sim"), check_dtype=False)
    np.testing.assert_allclose(got.cos_sim, expected.cos_sim, atol=1e-5, rtol=0)


def _variant(ids: list, mode: str, gene: int, limit: int) -> list:
    """The perturbed cell, with plain list operations (Geneformer's delete_indices / overexpress_*)."""
    if mode == "delete":
        return [t for t in ids if t != gene]
    return [gene] + ([t for t in ids if t != gene] if gene in ids else ids[: limit - 1])


def reference_loop(model_dir, dataset, mode, genes, emb_layer, goal_rows=None, rows=None) -> list[tuple]:
    """Per cell, per gene, one forward pass each, straight from transformers' BertModel: (cell, gene, value)."""
    bert = BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    limit, layer = bert.config.max_position_embeddings, bert.config.num_hidden_layers + emb_layer

    def hidden(ids):
        with torch.no_grad():
            return bert(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]

    cells = [list(ids)[:limit] for ids in dataset["input_ids"]]
    goal = None if goal_rows is None else torch.stack([hidden(cells[r]).mean(0) for r in goal_rows]).mean(0)
    out = []
    for c in (range(len(cells)) if rows is None else rows):
        ids = cells[c]
        wanted = ids[1:] if mode == "overexpress" and genes is None else ids if genes is None else genes
        for gene in wanted:
            if (mode == "delete" and gene not in ids) or (gene in ids and ids.index(gene) == 0 and mode == "overexpress"):
                continue
            hp, ho = hidden(_variant(ids, mode, gene, limit)), hidden(ids if gene in ids else ids[: limit - 1])
            if gene in ids:
                ho = torch.cat([ho[: ids.index(gene)], ho[ids.index(gene) + 1 :]])
            if mode == "overexpress":
                hp = hp[1:]
            if goal is None:
                value = F.cosine_similarity(hp, ho, dim=-1, eps=1e-8).mean().item()
            else:
                value = (F.cosine_similarity(hp.mean(0), goal, dim=0) - F.cosine_similarity(ho.mean(0), goal, dim=0)).item()
            out.append((c, gene, value))
    return out


@pytest.mark.parametrize("mode,emb_layer", [("delete", 0), ("overexpress", 0), ("delete", -1), ("overexpress", -1)])
def test_goal_free_equals_reference_loop(small, mode, emb_layer):
    model, cells, vocab = small
    dataset, meta = load_cells(cells, vocab)
    with pytest.warns(UserWarning, match="cut to their"):
        got = perturb(model, dataset, meta, mode=mode, emb_layer=emb_layer, vocab=vocab, batch_size=7, device="cpu")
    expected = reference_loop(model, dataset, mode, None, emb_layer)
    assert [(c, t) for c, t, _ in expected] == list(zip(got.cell_index, got.perturbed_token))
    np.testing.assert_allclose(got.cos_sim, [v for *_, v in expected], atol=1e-5, rtol=0)
    assert got.cos_sim.std() > 0.01  # a model whose perturbations matter


def test_gene_list_with_absent_genes_and_truncation(small):
    model, cells, vocab = small
    dataset, meta = load_cells(cells, vocab)
    first = list(dataset[3]["input_ids"])  # the 56-gene cell, cut to MAX_POSITIONS: at the maximum length
    genes = [first[0], first[5], first[-1]]
    listed = [vocab.tokens[t] for t in genes]
    with pytest.warns(UserWarning):
        got = perturb(model, dataset, meta, mode="overexpress", genes=listed, vocab=vocab, device="cpu")
    expected = reference_loop(model, dataset, "overexpress", sorted(genes), 0)
    key = sorted(zip(got.cell_index, got.perturbed_token, got.cos_sim))
    assert [(c, t) for c, t, _ in key] == sorted((c, t) for c, t, _ in expected)
    np.testing.assert_allclose([v for *_, v in key], [v for *_, v in sorted(expected)], atol=1e-5, rtol=0)
    assert (got.perturbed_position == ABSENT).any() and set(got.ensembl_id) <= set(listed)


@pytest.mark.parametrize("mode", ["delete", "overexpress"])
def test_goal_state_equals_reference_loop(small, mode):
    model, cells, vocab = small
    dataset, meta = load_cells(cells, vocab)
    with pytest.warns(UserWarning):
        got = perturb_to_goal(model, dataset, meta, state_key="cell_type", start="Naive CD4 T", goal="B", mode=mode,
                              vocab=vocab, device="cpu")
    expected = reference_loop(model, dataset, mode, None, 0, goal_rows=[0], rows=[3, 4])
    assert list(got.columns) == SHIFT_COLUMNS and set(got.cell_index) == {3, 4}
    assert list(got.ensembl_id) == [vocab.tokens[t] for _, t, _ in expected]
    np.testing.assert_allclose(got.cosine_shift, [v for *_, v in expected], atol=1e-5, rtol=0)


def test_padding_in_packed_batches_changes_nothing(small):
    model, cells, vocab = small
    dataset, meta = load_cells(cells, vocab)
    with pytest.warns(UserWarning):
        alone = perturb(model, dataset, meta, mode="delete", vocab=vocab, batch_size=1, device="cpu")
        packed = perturb(model, dataset, meta, mode="overexpress", genes=[vocab.tokens[2], vocab.tokens[40]],
                         vocab=vocab, batch_size=1000, device="cpu")  # one batch of rows of different lengths
        one_by_one = perturb(model, dataset, meta, mode="overexpress", genes=[vocab.tokens[2], vocab.tokens[40]],
                             vocab=vocab, batch_size=1, device="cpu")
    np.testing.assert_allclose(alone.cos_sim, perturb(model, dataset, meta, vocab=vocab, device="cpu").cos_sim, atol=1e-6)
    pd.testing.assert_frame_equal(packed.drop(columns="cos_sim"), one_by_one.drop(columns="cos_sim"))
    np.testing.assert_allclose(packed.cos_sim, one_by_one.cos_sim, atol=1e-6)

    bert = BertModel.from_pretrained(model, add_pooling_layer=False).eval()
    encoder = Encoder(read_weights(model), read_config(model), 2, torch.device("cpu"))
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    padded = encoder(ids, (ids != 0).long())
    np.testing.assert_allclose(padded[1, :3], encoder(ids[1:, :3], torch.ones(1, 3, dtype=torch.long))[0], atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(padded[0], bert(ids[:1]).last_hidden_state[0], atol=1e-6)


def test_errors_name_the_problem(small, isp):
    model, cells, vocab = small
    dataset, meta = load_cells(cells, vocab)
    with pytest.raises(FileNotFoundError, match="name its vocabulary"):
        load_cells(cells)
    with pytest.raises(ValueError, match="mode must be"):
        perturb(model, dataset, meta, mode="knockout", vocab=vocab)
    with pytest.raises(ValueError, match="emb_layer must be in"):
        perturb(model, dataset, meta, emb_layer=-3, vocab=vocab)
    with pytest.raises(ValueError, match="not genes of the model's vocabulary"):
        perturb(model, dataset, meta, genes=["ENSG00000000000"], vocab=vocab)
    with pytest.raises(ValueError, match="no cell has cell_type == 'NK'"):
        perturb_to_goal(model, dataset, meta, state_key="cell_type", start="NK", goal="B", vocab=vocab)


# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------

def _shifts(seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    genes = np.repeat([f"ENSG{i:011d}" for i in range(30)], rng.integers(8, 40, 30))
    return pd.DataFrame({"cell_index": np.arange(len(genes)), "ensembl_id": genes,
                         "cosine_shift": rng.normal(0, 0.01, len(genes)) + (genes == "ENSG00000000007") * 0.05})


@pytest.mark.parametrize("alternative", ["two-sided", "greater"])
def test_gene_stats_equals_scipy_and_statsmodels(alternative):
    shifts = _shifts()
    stats = gene_stats(shifts, symbols={"ENSG00000000007": "DRV1"}, n_null=200, alternative=alternative)
    random.seed(42)
    pool = random.sample(shifts.cosine_shift.tolist(), k=200)  # Geneformer's down-sampling
    groups = shifts.groupby("ensembl_id").cosine_shift
    p = {g: ranksums(s, pool, alternative=alternative).pvalue for g, s in groups}
    assert list(stats.columns) == STATS_COLUMNS and stats.ensembl_id.iloc[0] == "ENSG00000000007"
    assert stats.symbol.iloc[0] == "DRV1" and stats.symbol.iloc[1:].isna().all()
    assert stats.mean_shift.is_monotonic_decreasing
    np.testing.assert_allclose(stats.mean_shift, groups.mean()[stats.ensembl_id])
    np.testing.assert_array_equal(stats.n_cells, groups.size()[stats.ensembl_id])
    np.testing.assert_allclose(stats.p_value, [p[g] for g in stats.ensembl_id])
    genes = sorted(p)
    fdr = dict(zip(genes, multipletests([p[g] for g in genes], method="fdr_bh")[1]))
    np.testing.assert_allclose(stats.fdr, [fdr[g] for g in stats.ensembl_id])
    assert stats.fdr.iloc[0] < 0.05


def test_gene_stats_null_options():
    shifts = _shifts()
    pooled = gene_stats(shifts)  # fewer shifts than n_null: the whole pool, as Geneformer
    every = shifts.cosine_shift.to_numpy()
    first = shifts[shifts.ensembl_id == pooled.ensembl_id.iloc[5]].cosine_shift
    assert pooled.p_value.iloc[5] == pytest.approx(ranksums(first, every).pvalue)
    rand = gene_stats(shifts, null="random", n_null=5000)
    pd.testing.assert_frame_equal(rand, gene_stats(shifts, null="random", n_null=5000))  # seeded
    assert not np.allclose(rand.p_value, pooled.p_value)
    with pytest.raises(ValueError, match="null must be one of"):
        gene_stats(shifts, null="shuffled")


# ---------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------

def test_cli_goal_state_end_to_end(small, tmp_path):
    model, cells, vocab = small
    out = tmp_path / "isp.parquet"
    with pytest.warns(UserWarning):
        code = main(["perturb", str(model), str(cells), "--mode", "delete", "--out", str(out), "--vocab",
                     str(model.parent / "vocab.tsv"), "--state-key", "cell_type", "--start", "Naive CD4 T",
                     "--goal", "B", "--device", "cpu", "--batch-size", "16"])
    assert code == 0
    shifts, stats = pd.read_parquet(out), pd.read_csv(tmp_path / "isp.stats.csv")
    dataset, meta = load_cells(cells, vocab)
    with pytest.warns(UserWarning):
        expected = perturb_to_goal(model, dataset, meta, state_key="cell_type", start="Naive CD4 T", goal="B",
                                   vocab=vocab, device="cpu")
    pd.testing.assert_frame_equal(shifts, expected)
    assert list(stats.columns) == STATS_COLUMNS and stats.n_cells.sum() == len(shifts) == 2 * MAX_POSITIONS
    assert stats.symbol.notna().any()  # real genes: Geneformer's symbols
    assert main(["perturb", str(model), str(cells), "--mode", "delete", "--out", str(out), "--start", "B"]) == 2


def test_a_shared_ortholog_token_is_named_by_the_cells_species_gene():
    from mixgf.perturb import _gene_names
    from mixgf.vocab import orthologs_vocab

    vocab = orthologs_vocab(GeneVocab(("<pad>", "<mask>", "ENSG01", "ENSG02", "ENSMUSG01", "ENSMUSG03")),
                            pairs=pd.DataFrame({"human_id": ["ENSG01"], "mouse_id": ["ENSMUSG01"]}))
    assert vocab.tokens == ("<pad>", "<mask>", "ENSG01", "ENSG02", "ENSMUSG03")
    assert list(_gene_names(vocab, {"species": ["mouse"]})) == ["<pad>", "<mask>", "ENSMUSG01", "ENSG02", "ENSMUSG03"]
    assert list(_gene_names(vocab, {"species": "human"})) == list(vocab.tokens)
    assert list(_gene_names(vocab, {"species": ["human", "mouse"]})) == list(vocab.tokens)  # mixed: the token's name
