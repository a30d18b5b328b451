import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mixgf import vocab as V
from mixgf.corpus import Source, merge_corpora, remap_input_ids
from mixgf.tokenize import tokenize_files
from mixgf.tokens import load_tokens

UNIFIED = V.default_vocab()
ALIEN = "ENSMUSG99999999999"  # a gene the unified vocabulary does not have


@pytest.fixture(scope="module")
def mouse_h5ad(test_data, tmp_path_factory):
    """cellrank mouse cells (integer 'ambiguous' counts) with Ensembl ids; one gene renamed to an alien id."""
    a = ad.read_h5ad(test_data / "cellrank" / "adata_200_counts.h5ad")
    ids = a.var_names.map(V.symbol_map("mouse"))
    a = ad.AnnData(a.layers["ambiguous"], obs=a.obs[["clusters"]], var=pd.DataFrame(index=ids.fillna("none")))
    a = a[:, ~a.var_names.duplicated(keep=False) & (a.var_names != "none")].copy()
    a.var_names = [ALIEN if i == 0 else g for i, g in enumerate(a.var_names)]
    path = tmp_path_factory.mktemp("mouse") / "mouse.h5ad"
    a.write_h5ad(path)
    return path, a


@pytest.fixture(scope="module")
def foreign_mouse_vocab(mouse_h5ad):
    """A Mouse-Geneformer-like vocabulary: its own id order, and a gene the unified vocabulary lacks."""
    genes = list(mouse_h5ad[1].var_names)
    rng = np.random.default_rng(1)
    return V.GeneVocab(("<pad>", "<mask>", *rng.permutation(genes)), name="mouse-geneformer-like")


def test_remap_drops_missing_ids_and_counts_them():
    ids = pa.array([[5, 2, 9], [], [9], [3, 4]], pa.list_(pa.int32())).slice(1)  # sliced: offsets start > 0
    table = np.array([0, 1, 12, 13, 14, 15, -1, -1, -1, -1])
    out, missing = remap_input_ids(ids, table)
    assert out.to_pylist() == [[], [], [13, 14]] and missing == 1


def test_merge_of_foreign_vocabularies_equals_direct_tokenization(mouse_h5ad, foreign_mouse_vocab, test_data,
                                                                  tmp_path):
    path, cells = mouse_h5ad
    medians = V.Medians(pd.Series(np.linspace(0.5, 3, cells.n_vars), index=cells.var_names))
    tokenize_files([path], tmp_path / "foreign", species="mouse", vocab=foreign_mouse_vocab, medians=medians,
                   progress=False)
    tokenize_files([path], tmp_path / "direct", species="mouse", medians=medians, progress=False)
    human = test_data / "scanpy-10x-3.0.0"
    tokenize_files([human], tmp_path / "human_v1", species="human", vocab=V.geneformer_v1_vocab(), progress=False)
    tokenize_files([human], tmp_path / "human_direct", species="human", progress=False)

    summaries = merge_corpora([Source(str(tmp_path / "human_v1"), V.geneformer_v1_vocab(), "human"),
                               Source(str(tmp_path / "foreign"), foreign_mouse_vocab, "mouse")],
                              tmp_path / "mix", UNIFIED, seed=7, rows_per_bucket=300, batch_size=128, progress=False)
    mix, meta = load_tokens(tmp_path / "mix")
    direct = [load_tokens(tmp_path / "human_direct")[0]["input_ids"], load_tokens(tmp_path / "direct")[0]["input_ids"]]
    for source, row, ids, species in zip(mix["source"], mix["row"], mix["input_ids"], mix["species"]):
        assert ids == direct[source][row] and species == ("human", "mouse")[source]

    foreign_tokens = load_tokens(tmp_path / "foreign")[0]["input_ids"]
    alien = foreign_mouse_vocab[ALIEN]
    expressing = sum(alien in ids for ids in foreign_tokens)
    assert summaries[1].tokens_missing == expressing > 0 and summaries[1].genes_missing == 1
    assert summaries[0].tokens_missing == 0 and meta["sources"][1]["tokens_missing"] == expressing
    assert set(meta["medians"]) == {"human", "mouse"} and meta["max_len"] == 2048
    assert len(mix) == sum(s.cells - s.cells_empty_after_remap for s in summaries)


def test_shuffle_is_a_seeded_permutation_with_lengths(test_data, tmp_path):
    tokenize_files([test_data / "scanpy-10x-3.0.0"], tmp_path / "tokens", species="human", progress=False)
    n = len(load_tokens(tmp_path / "tokens")[0])
    sources = [Source(str(tmp_path / "tokens"), UNIFIED, "human")] * 2
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        merge_corpora(sources, tmp_path / name, UNIFIED, seed=seed, rows_per_bucket=500, batch_size=200,
                      progress=False)
        runs[name] = load_tokens(tmp_path / name)[0]
    a = runs["a"]
    pairs = sorted(zip(a["source"], a["row"]))
    assert pairs == [(s, r) for s in (0, 1) for r in range(n)]
    assert a["input_ids"] == runs["b"]["input_ids"] and a["row"] == runs["b"]["row"]
    assert a["row"] != runs["c"]["row"]
    assert a["row"][:n] != sorted(a["row"][:n])  # rows really are shuffled
    assert (np.load(tmp_path / "a" / "lengths.npy") == np.array(a["length"])).all()


def test_merge_refuses_a_dataset_made_with_another_vocabulary(test_data, tmp_path):
    tokenize_files([test_data / "scanpy-10x-3.0.0"], tmp_path / "tokens", species="human", progress=False)
    with pytest.raises(ValueError, match="was tokenized with vocabulary mixgf.*not geneformer-gc30M"):
        merge_corpora([Source(str(tmp_path / "tokens"), V.geneformer_v1_vocab(), "human")], tmp_path / "mix", UNIFIED)
    assert not (tmp_path / "mix").exists()
