import shutil
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from mixgf import vocab as V
from mixgf.readers import InputError
from mixgf.tokenize import rank_encode, tokenize_files
from mixgf.tokens import load_tokens

VOCAB = V.default_vocab()
GENES = list(VOCAB.tokens[2:7])  # token ids 2..6


def _adata(x, genes=GENES, **obs) -> ad.AnnData:
    a = ad.AnnData(sp.csr_matrix(np.asarray(x, dtype=np.float32)),
                   obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(len(x))]),
                   var=pd.DataFrame(index=list(genes)))
    return a


def _write(tmp_path, adata, name="cells.h5ad"):
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def _geneformer_v1_reference(adata, token_dict, median_dict, max_len=2048):
    """Geneformer V1's h5ad tokenization re-expressed: same sparse arithmetic, same per-cell np.argsort(-x)."""
    genes = adata.var["ensembl_id"].to_numpy()
    loc = np.flatnonzero([g in token_dict for g in genes])
    norm = np.array([median_dict[g] for g in genes[loc]])
    tokens = np.array([token_dict[g] for g in genes[loc]])
    n_counts = adata.obs["n_counts"].to_numpy()[:, None]
    x = sp.csr_matrix(adata.X[:, loc] / n_counts * 10_000 / norm)
    return [tokens[x[i].indices][np.argsort(-x[i].data)][:max_len] for i in range(x.shape[0])]


def _simple_reference(x, medians, tokens, max_len):
    """One cell at a time, plain Python: value descending, ties by input position."""
    out = []
    for row in np.asarray(x, dtype=np.float64):
        n = row.sum()
        ranked = sorted((-(c / n * 10_000 / m), j) for j, (c, m) in enumerate(zip(row, medians)) if c > 0)
        out.append([tokens[j] for _, j in ranked][:max_len])
    return out


# --- hand-computed ------------------------------------------------------------------------------------------

def test_hand_computed_token_ids(tmp_path):
    # medians 1, 2, 4, 0.5, 1 -> value is proportional to count / median
    medians = V.Medians(pd.Series([1.0, 2.0, 4.0, 0.5, 1.0], index=GENES))
    x = [[4, 4, 4, 0, 1],   # 4, 2, 1, -, 1   -> G1 G2 then the tie G3/G5 in column order
         [0, 0, 0, 3, 0],   # only G4
         [0, 0, 0, 0, 0],   # no counts: dropped
         [1, 8, 0, 1, 2]]   # 1, 4, -, 2, 2   -> G2, tie G4/G5, G1; cut to 3
    result = tokenize_files([_write(tmp_path, _adata(x))], tmp_path / "out", species="human",
                            medians=medians, max_len=3, progress=False)
    ds, meta = load_tokens(tmp_path / "out")
    assert ds["input_ids"] == [[2, 3, 4], [5], [3, 5, 6]]
    assert ds["length"] == [3, 1, 3] and ds["cell_id"] == ["c0", "c1", "c3"] and set(ds["species"]) == {"human"}
    summary = result.files[0]
    assert (summary.cells, summary.cells_kept, summary.dropped_zero_counts) == (4, 3, 1)
    assert meta["max_len"] == 3 and meta["vocab"]["hash"] == VOCAB.hash and meta["medians"]["human"]["hash"] == medians.hash


def test_n_counts_from_obs_and_filter_pass(tmp_path):
    medians = V.Medians(pd.Series(1.0, index=GENES))
    # obs n_counts only scales a cell, so order is unchanged; filter_pass drops the second cell
    x = [[1, 3, 0, 0, 2], [5, 0, 0, 0, 0], [0, 0, 7, 0, 0]]
    tokenize_files([_write(tmp_path, _adata(x, n_counts=[100.0, 5.0, 7.0], filter_pass=[1, 0, 1]))],
                   tmp_path / "out", species="human", medians=medians, progress=False)
    ds, meta = load_tokens(tmp_path / "out")
    assert ds["input_ids"] == [[3, 6, 2], [4]] and ds["cell_id"] == ["c0", "c2"]
    assert meta["files"][0]["dropped_filter_pass"] == 1


# --- real data -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pbmc():
    """700 real PBMCs (scanpy's bundled pbmc68k_reduced, counts recovered by mixgf.demo) with Geneformer's
    conventions: var['ensembl_id'], obs['n_counts'] (each cell's library size over all its genes, as in the file)."""
    from mixgf.demo import pbmc68k_immune

    a = pbmc68k_immune()
    a = ad.AnnData(a.X, obs=a.obs[["cell_type", "n_counts"]], var=pd.DataFrame(index=a.var_names.to_numpy()))
    a = a[:, ~a.var_names.duplicated(keep=False)].copy()
    a.var["ensembl_id"] = a.var_names.to_numpy()
    return a


def test_same_token_ids_as_geneformer_v1_on_real_cells(pbmc, test_data, tmp_path):
    token_dict = V.load_pickle_dict(test_data / "geneformer" / "token_dictionary_gc30M.pkl")
    median_dict = V.load_pickle_dict(test_data / "geneformer" / "gene_median_dictionary_gc30M.pkl")
    expected = _geneformer_v1_reference(pbmc, token_dict, median_dict)
    tokenize_files([_write(tmp_path, pbmc)], tmp_path / "out", species="human",
                   obs_keys=["cell_type"], progress=False)
    ds, _ = load_tokens(tmp_path / "out")
    assert len(ds) == pbmc.n_obs == 700
    assert all(list(e) == got for e, got in zip(expected, ds["input_ids"]))
    assert ds["cell_type"] == list(pbmc.obs["cell_type"].astype(str))


def test_truncation_and_ties_agree_with_simple_reference(pbmc, tmp_path):
    # equal medians make ties common (same counts): exercises the tie rule on real count patterns
    small = pbmc[:60, pbmc.var["ensembl_id"].isin(VOCAB.tokens).to_numpy()].copy()
    genes = small.var["ensembl_id"].to_numpy()
    medians = V.Medians(pd.Series(1.0, index=genes))
    tokenize_files([_write(tmp_path, small)], tmp_path / "out", species="human", medians=medians, max_len=64,
                   progress=False)
    ds, _ = load_tokens(tmp_path / "out")
    expected = _simple_reference(small.X.toarray(), np.ones(len(genes)), VOCAB.ids(genes), max_len=64)
    assert ds["input_ids"] == expected and max(ds["length"]) == 64


def test_collisions_of_truncated_keys_are_ordered_exactly():
    # a huge value forces dropped key bits; two values one ulp apart must still come out in exact order
    m = np.array([1e-300, 1.0, np.nextafter(1.0, 2.0), 1.0, 3.0])
    x = sp.csr_matrix(np.array([[1.0, 5.0, 5.0, 5.0, 1.0], [0.0, 5.0, 5.0, 0.0, 0.0]]))
    offsets, tokens = rank_encode(x, np.array([17.0, 10.0]), np.arange(10, 15), m, max_len=10)
    # gene 11 and 13 tie exactly (same count, same median): input order; gene 12 is one ulp smaller
    assert tokens[offsets[0]:offsets[1]].tolist() == [10, 11, 13, 12, 14]
    assert tokens[offsets[1]:offsets[2]].tolist() == [11, 12]


def test_10x_folder_with_ensembl_ids_and_two_workers(test_data, tmp_path):
    folder = test_data / "scanpy-10x-3.0.0"
    one = tokenize_files([folder], tmp_path / "one", species="human", chunk_size=100, progress=False)
    two = tokenize_files([folder, folder], tmp_path / "two", species="human", chunk_size=100, workers=2,
                         progress=False)
    ds1, _ = load_tokens(tmp_path / "one")
    ds2, meta = load_tokens(tmp_path / "two")
    assert len(ds2) == 2 * len(ds1) == 2 * one.n_cells
    assert ds2["input_ids"][: len(ds1)] == ds1["input_ids"] == ds2["input_ids"][len(ds1):]
    assert one.files[0].gene_id_source == "var index" and 0.9 < one.files[0].share_counts <= 1
    assert [f["cells_kept"] for f in meta["files"]] == [one.n_cells] * 2 and two.n_cells == 2 * one.n_cells


def test_loom_input_matches_h5ad(pbmc, tmp_path):
    small = pbmc[:40].copy()
    h5ad = _write(tmp_path, small)
    loom = tmp_path / "cells.loom"
    small.write_loom(loom)
    tokenize_files([h5ad], tmp_path / "a", species="human", progress=False)
    tokenize_files([loom], tmp_path / "b", species="human", progress=False)
    assert load_tokens(tmp_path / "a")[0]["input_ids"] == load_tokens(tmp_path / "b")[0]["input_ids"]


def test_mouse_symbols_from_a_count_layer(test_data, tmp_path):
    path = test_data / "cellrank" / "adata_200_counts.h5ad"
    genes = ad.read_h5ad(path).var_names.map(V.symbol_map("mouse")).dropna()
    medians = V.Medians(pd.Series(1.0, index=genes.unique()))
    result = tokenize_files([path], tmp_path / "out", species="mouse", counts="ambiguous", medians=medians,
                            obs_keys=["clusters"], progress=False)
    ds, meta = load_tokens(tmp_path / "out")
    assert meta["species"] == "mouse" and set(ds["species"]) == {"mouse"}
    assert all(VOCAB.tokens[t].startswith("ENSMUSG") for ids in ds["input_ids"] for t in ids)
    assert result.files[0].gene_id_source == "var index as mouse gene symbols"
    assert len(ds) == result.n_cells > 0


def test_duplicate_genes_summed_on_request(tmp_path):
    medians = V.Medians(pd.Series([1.0, 1.0, 1.0], index=GENES[:3]))
    x = [[1, 2, 2, 0], [0, 1, 0, 3]]
    path = _write(tmp_path, _adata(x, genes=[GENES[0], GENES[1], GENES[2], GENES[0]]))
    with pytest.raises(InputError, match="2 columns share an Ensembl id.*--sum-duplicates"):
        tokenize_files([path], tmp_path / "out", species="human", medians=medians, progress=False)
    assert not (tmp_path / "out").exists()
    tokenize_files([path], tmp_path / "out", species="human", medians=medians, sum_duplicates=True, progress=False)
    assert load_tokens(tmp_path / "out")[0]["input_ids"] == [[3, 4, 2], [2, 3]]


# --- bad input -------------------------------------------------------------------------------------------------

def _bad(tmp_path, adata=None, path=None, match="", **kwargs):
    path = path or _write(tmp_path, adata)
    with pytest.raises(InputError, match=match) as err:
        tokenize_files([path], tmp_path / "out", **({"species": "human"} | kwargs), progress=False)
    assert str(path) in str(err.value) or "<" in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_rejects_non_integer_counts_unless_normalized(test_data, tmp_path):
    path = test_data / "cellrank" / "adata_200_counts.h5ad"
    medians = V.Medians(pd.Series(1.0, index=list(V.symbol_map("mouse").values())))
    _bad(tmp_path, path=path, species="mouse", medians=medians, match="not integers.*--normalized")
    # these cells are log1p-normalised: --normalized must refuse them, rank-value encoding needs a linear scale
    _bad(tmp_path, path=path, species="mouse", medians=medians, normalized=True, match="look log-transformed")
    linear = ad.read_h5ad(path)
    linear.X = np.expm1(linear.X)  # linear-scale normalised values are accepted as they are
    tokenize_files([_write(tmp_path, linear)], tmp_path / "out", species="mouse", normalized=True, medians=medians,
                   progress=False)
    assert load_tokens(tmp_path / "out")[1]["normalized"] is True


@pytest.mark.parametrize("value, match", [(-1.0, "negative"), (np.nan, "NaN")])
def test_rejects_negative_and_nan(tmp_path, value, match):
    _bad(tmp_path, _adata([[1, 2, 3, 4, 5], [1, value, 0, 0, 1]]), match=match)


def test_rejects_bad_value_in_a_later_chunk_and_leaves_nothing(tmp_path):
    x = np.ones((600, 5))
    x[550, 2] = 0.5
    _bad(tmp_path, _adata(x), match="not integers", chunk_size=100)


def test_rejects_unknown_gene_ids_and_names_the_column(tmp_path):
    a = _adata([[1, 2, 3, 4, 5]], genes=[f"gene{i}" for i in range(5)])
    a.var["ids"] = GENES
    _bad(tmp_path, a, match="0 of 5 genes.*--gene-column ids")
    tokenize_files([_write(tmp_path, a)], tmp_path / "out", species="human", gene_column="ids", progress=False)


def test_rejects_wrong_species_and_unknown_species(tmp_path):
    mouse_genes = list(VOCAB.tokens[-5:])
    _bad(tmp_path, _adata([[1, 2, 3, 4, 5]], genes=mouse_genes), match="mouse Ensembl ids.*--species is human")
    with pytest.raises(ValueError, match="unknown species 'rat'"):
        tokenize_files([_write(tmp_path, _adata([[1, 2, 3, 4, 5]]))], tmp_path / "out", species="rat")


def test_rejects_empty_corrupt_and_missing_files(tmp_path):
    _bad(tmp_path, _adata(np.zeros((0, 5))), match="is empty")
    corrupt = tmp_path / "corrupt.h5ad"
    corrupt.write_bytes(_write(tmp_path, _adata([[1, 2, 3, 4, 5]])).read_bytes()[:300])
    _bad(tmp_path, path=corrupt, match="could not be read")
    _bad(tmp_path, path=tmp_path / "missing.h5ad", match="no such file")
    _bad(tmp_path, path=shutil.copy(corrupt, tmp_path / "cells.csv"), match="unknown format")


def test_rejects_missing_obs_key_and_layer(tmp_path):
    a = _adata([[1, 2, 3, 4, 5]])
    _bad(tmp_path, a, match="obs has no column.*cell_type", obs_keys=["cell_type"])
    _bad(tmp_path, a, match="has no layer 'counts'", counts="counts")
    _bad(tmp_path, a, match="has no .raw", counts="raw")


def test_cli_tokenize_and_error_exit(tmp_path):
    path = _write(tmp_path, _adata([[1, 2, 3, 4, 5]], cell_type=["B"]))
    run = subprocess.run([sys.executable, "-m", "mixgf", "tokenize", str(path), "--species", "human",
                          "--out", str(tmp_path / "out"), "--obs-keys", "cell_type"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "1/1 cells kept" in run.stderr
    assert load_tokens(tmp_path / "out")[0]["cell_type"] == ["B"]
    bad = subprocess.run([sys.executable, "-m", "mixgf", "tokenize", str(tmp_path / "nope.h5ad"), "--species",
                          "human", "--out", str(tmp_path / "out2")], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope.h5ad: no such file" in bad.stderr and "Traceback" not in bad.stderr
