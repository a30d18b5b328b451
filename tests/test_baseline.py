import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from mixgf.baseline import (expression_control, knn_transfer, log1p_cp10k, logistic_regression, map_labels,
                            ortholog_transfer)


@pytest.fixture(scope="module")
def spleens():
    """Demo atlas spleens: 200 mouse cells (10 types) and 200 human cells (6 types, all also in mouse)."""
    from mixgf.demo import simulate_atlas

    return simulate_atlas(organs=("mouse_Spleen", "human_Spleen"), cells_per_organ=200, include_immune=False,
                          n_genes=1500)


def scanpy_log1p_cp10k(X) -> np.ndarray:
    a = ad.AnnData(sp.csr_matrix(X, dtype=np.float32))
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return a.X.toarray()


@pytest.mark.parametrize("read", [
    lambda d: sc.read_10x_mtx(d / "scanpy-10x-3.0.0", var_names="gene_ids").X,  # 1,107 human cells, raw UMIs
    lambda d: ad.read_h5ad(d / "cellrank" / "adata_200_counts.h5ad").layers["ambiguous"],  # 200 mouse cells
])
def test_log1p_cp10k_matches_scanpy_on_real_counts(test_data, read):
    counts = read(test_data)
    got = log1p_cp10k(counts)
    assert sp.isspmatrix_csr(got) and got.dtype == np.float32
    expected = scanpy_log1p_cp10k(counts)
    np.testing.assert_allclose(got.toarray(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(log1p_cp10k(counts.toarray()).toarray(), got.toarray())  # dense in, same out


def test_log1p_cp10k_zero_cells_and_bad_input(test_data):
    counts = np.array([[0, 0, 0], [1, 3, 0]], dtype=np.float32)
    np.testing.assert_allclose(log1p_cp10k(counts).toarray(), [[0, 0, 0], np.log1p([2500, 7500, 0])], rtol=1e-6)
    with pytest.raises(ValueError, match="negative"):
        log1p_cp10k(-counts)
    logged = ad.read_h5ad(test_data / "cellrank" / "adata_200_counts.h5ad").X  # cellrank's log-normalised X
    with pytest.raises(ValueError, match="log-transformed"):
        log1p_cp10k(logged)


def blobs(seed: int, n: int = 300, genes: int = 400):
    """Counts of 3 types, each with its own 20 marker genes at 8x expression."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    mean = np.full((n, genes), 0.5)
    for t in range(3):
        mean[y == t, 20 * t : 20 * (t + 1)] *= 8
    return sp.csr_matrix(rng.poisson(mean).astype(np.float32)), np.array(["B cell", "T cell", "NK cell"])[y]


def test_logistic_regression_recovers_separable_labels_deterministically():
    X, y = blobs(0)
    X = log1p_cp10k(X)
    predicted = logistic_regression(X[:200], y[:200], X[200:])
    assert predicted.dtype.kind == "U" and set(predicted) <= set(y)
    assert (predicted == y[200:]).mean() > 0.97
    np.testing.assert_array_equal(logistic_regression(X[:200], y[:200], X[200:]), predicted)
    with pytest.raises(ValueError, match="at least 2 classes"):
        logistic_regression(X[:10], ["T cell"] * 10, X[10:])


def test_expression_control_trains_and_predicts_named_cells():
    X, y = blobs(1)
    adata = ad.AnnData(X, obs=pd.DataFrame({"cell_type": pd.Categorical(y)}, index=[f"c{i}" for i in range(len(y))]))
    order = np.random.default_rng(0).permutation(adata.n_obs)  # cells given by name, in any order
    train, test = adata.obs_names[order[:200]], adata.obs_names[order[200:]]
    predicted = expression_control(adata, "cell_type", train, test)
    assert (predicted == y[order[200:]]).mean() > 0.97
    with pytest.raises(KeyError, match=r"2 of 3 test cells .* \['nope', 'gone'\]"):
        expression_control(adata, "cell_type", train, ["nope", "c0", "gone"])
    with pytest.raises(KeyError, match="no obs column 'label'"):
        expression_control(adata, "label", train, test)
    adata.obs.loc[test[0], "cell_type"] = np.nan  # an unlabelled query cell is fine, an unlabelled training cell not
    np.testing.assert_array_equal(expression_control(adata, "cell_type", train, test), predicted)
    adata.obs.loc[train[0], "cell_type"] = np.nan
    with pytest.raises(ValueError, match="1 missing training labels"):
        expression_control(adata, "cell_type", train, test)


def brute_force_knn(source, labels, target, k):
    """One target row at a time: sort by cosine similarity, vote, break ties by summed similarity then label."""
    out = []
    for t in target:
        sim = source @ t / np.linalg.norm(source, axis=1) / np.linalg.norm(t)
        nearest = np.argsort(-sim, kind="stable")[:k]
        frame = pd.DataFrame({"label": labels[nearest], "sim": sim[nearest]}).groupby("label").sim.agg(["size", "sum"])
        out.append(frame.sort_values(["size", "sum"], ascending=False, kind="stable").index[0])
    return np.array(out)


def test_knn_transfer_matches_brute_force_in_any_chunking():
    rng = np.random.default_rng(0)
    source, target = rng.normal(size=(300, 16)), rng.normal(size=(120, 16))
    labels = np.array(["a", "b", "c", "d"])[rng.integers(0, 4, 300)]
    for k in (1, 4, 15):
        expected = brute_force_knn(source, labels, target, k)
        np.testing.assert_array_equal(knn_transfer(source, labels, target, k=k), expected)
        np.testing.assert_array_equal(knn_transfer(source, labels, target, k=k, chunk_size=7), expected)
    everyone = brute_force_knn(source, labels, target, len(source))
    np.testing.assert_array_equal(knn_transfer(source, labels, target, k=1000), everyone)  # k above the source size


def test_knn_transfer_ties():
    # target (1, 0): 2 votes for "x" and 2 for "y"; "y"'s neighbours are more similar, so "y" wins
    source = np.array([[1, 0.2], [1, -0.2], [1, 0.1], [1, -0.1], [-1, 0]])
    labels = np.array(["x", "x", "y", "y", "z"])
    assert knn_transfer(source, labels, np.array([[1.0, 0]]), k=4)[0] == "y"
    # equal votes and equal summed similarity: the first label in sorted order
    mirror = np.array([[1, 0.3], [1, -0.3]])
    assert list(knn_transfer(mirror, np.array(["y", "x"]), np.array([[1.0, 0], [2.0, 0]]), k=2)) == ["x", "x"]
    with pytest.raises(ValueError, match="row 1 is zero"):
        knn_transfer(source, labels, np.array([[1.0, 0], [0, 0]]))


def test_ortholog_transfer_mouse_to_human_beats_the_majority_class(spleens):
    mouse, human = spleens["mouse"], spleens["human"]
    result = ortholog_transfer(mouse, human, "cell_type")
    assert (result.source_species, result.target_species) == ("mouse", "human")
    assert result.n_orthologs > 1000 and result.predicted.shape == (human.n_obs,)
    truth = human.obs["cell_type"].astype(str).to_numpy()
    accuracy = np.mean(map_labels(result.predicted, None) == truth)
    majority = human.obs["cell_type"].value_counts(normalize=True).max()
    assert accuracy > majority + 0.2, (accuracy, majority)


def test_ortholog_transfer_uses_only_shared_one_to_one_pairs(spleens):
    """Genes are matched by id, not by position, and a table passed in decides which pairs are used."""
    mouse, human = spleens["mouse"], spleens["human"]
    full = ortholog_transfer(mouse, human, "cell_type")
    shuffled = ortholog_transfer(mouse, human[:, ::-1].copy(), "cell_type")
    np.testing.assert_array_equal(shuffled.predicted, full.predicted)
    from mixgf.vocab import orthologs

    table = orthologs()
    pairs = table[table.human_id.isin(human.var_names) & table.mouse_id.isin(mouse.var_names)]
    assert ortholog_transfer(mouse, human, "cell_type", orthologs=pairs.iloc[::2]).n_orthologs == len(pairs.iloc[::2])


def test_ortholog_transfer_errors(spleens):
    mouse, human = spleens["mouse"], spleens["human"]
    message = r"only 10 one-to-one .*mouse, 200 cells x 1500 genes.*human, 200 cells x 10 genes"
    with pytest.raises(ValueError, match=message):
        ortholog_transfer(mouse, human[:, :10].copy(), "cell_type")
    with pytest.raises(ValueError, match="both mouse"):
        ortholog_transfer(mouse, mouse, "cell_type")
    symbols = human.copy()
    symbols.var_names = symbols.var["symbol"].to_numpy()
    with pytest.raises(ValueError, match="no Ensembl id among the target"):
        ortholog_transfer(mouse, symbols, "cell_type")


def test_map_labels():
    labels = ["B cell", "T cell", "erythroblast", "T cell"]
    assert list(map_labels(labels, None)) == labels
    table = pd.DataFrame({"source": ["B cell", "T cell"], "target": ["B", "T"]})
    with pytest.warns(UserWarning, match="1 of 4 labels .*'erythroblast'"):
        mapped = map_labels(labels, table)
    assert list(mapped) == ["B", "T", None, "T"]
    assert list(map_labels(labels[:2], {"B cell": "B", "T cell": "T"})) == ["B", "T"]
    with pytest.raises(ValueError, match="'B cell' to more than one"):
        map_labels(labels, pd.DataFrame({"source": ["B cell", "B cell"], "target": ["B", "plasma"]}))


def test_map_labels_reads_a_csv(tmp_path):
    path = tmp_path / "correspondence.csv"
    pd.DataFrame({"source": ["NA", "T cell"], "target": ["NA cell", "T"]}).to_csv(path, index=False)
    assert list(map_labels(["NA", "T cell"], path)) == ["NA cell", "T"]  # "NA" is a label, not a missing value


def test_with_ensembl_ids_reads_symbols_drops_unknown_genes_and_sums_duplicates():
    from mixgf.baseline import with_ensembl_ids

    var = pd.DataFrame(index=["CD3E", "not-a-gene", "MS4A1", "CD3E-copy"])
    var["gene"] = ["CD3E", "not-a-gene", "MS4A1", "CD3E"]
    adata = ad.AnnData(sp.csr_matrix(np.array([[1, 5, 2, 3], [0, 1, 4, 1]], np.float32)), var=var)
    out = with_ensembl_ids(adata, "human", gene_column="gene")
    assert list(out.var_names) == ["ENSG00000156738", "ENSG00000198851"]  # MS4A1, CD3E in id order
    np.testing.assert_array_equal(out.X.toarray(), [[2, 4], [4, 1]])


def test_baseline_cli_predicts_and_scores_through_a_correspondence(spleens, tmp_path, capsys):
    import json

    from mixgf.cli import main

    mouse, human = spleens["mouse"], spleens["human"]
    mouse.write_h5ad(tmp_path / "mouse.h5ad")
    by_symbol = human.copy()  # as many users' files: gene symbols as var_names, the types under other names
    by_symbol.var_names = by_symbol.var["symbol"].to_numpy()
    by_symbol.obs["celltype"] = "h-" + human.obs["cell_type"].astype(str)
    by_symbol.write_h5ad(tmp_path / "human.h5ad")
    types = sorted(set(human.obs["cell_type"].astype(str)))
    pd.DataFrame({"mouse": types[1:], "human": ["h-" + t for t in types[1:]]}).to_csv(tmp_path / "corr.csv", index=False)
    out = tmp_path / "baseline.csv"
    with pytest.warns(UserWarning, match="no correspondence"):  # the first type has no row in the table
        assert main(["baseline", str(tmp_path / "mouse.h5ad"), str(tmp_path / "human.h5ad"), "--label", "cell_type",
                     "--out", str(out), "--target-label", "celltype", "--correspondence", str(tmp_path / "corr.csv")]) == 0
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["cell_index", "cell_id", "predicted", "celltype"]
    from mixgf.baseline import with_ensembl_ids

    direct = ortholog_transfer(mouse, with_ensembl_ids(by_symbol, "human"), "cell_type")
    np.testing.assert_array_equal(frame.predicted.to_numpy(), direct.predicted)
    by_ensembl = ortholog_transfer(mouse, human, "cell_type")  # symbols lose a few genes, and so library size
    assert by_ensembl.n_orthologs - 50 < direct.n_orthologs <= by_ensembl.n_orthologs
    assert (by_ensembl.predicted == direct.predicted).mean() > 0.9
    scores = json.loads((tmp_path / "baseline.json").read_text())
    truth = human.obs["cell_type"].astype(str).to_numpy()
    counted = truth != types[0]
    assert scores["n_cells"] == counted.sum() and scores["n_cells_without_counterpart"] == (~counted).sum()
    assert scores["accuracy"]["estimate"] == pytest.approx((direct.predicted == truth)[counted].mean())
    assert scores["n_orthologs"] == direct.n_orthologs
    assert "accuracy " in capsys.readouterr().out
    assert main(["baseline", str(tmp_path / "mouse.h5ad"), str(tmp_path / "human.h5ad"), "--label", "type",
                 "--out", str(tmp_path / "x.csv")]) == 2


def test_baseline_cli_reads_counts_from_a_layer_or_raw(spleens, tmp_path, capsys):
    from mixgf.cli import main

    for species, adata in spleens.items():  # X normalised, as many published files; the counts kept aside
        stored = adata.copy()
        stored.layers["counts"] = adata.X.copy()
        stored.raw = adata
        stored.X = log1p_cp10k(adata.X)
        stored.write_h5ad(tmp_path / f"{species}.h5ad")
    direct = ortholog_transfer(spleens["mouse"], spleens["human"], "cell_type").predicted
    for counts in ("counts", "raw"):
        out = tmp_path / f"{counts}.csv"
        assert main(["baseline", str(tmp_path / "mouse.h5ad"), str(tmp_path / "human.h5ad"), "--label", "cell_type",
                     "--out", str(out), "--counts", counts]) == 0
        np.testing.assert_array_equal(pd.read_csv(out).predicted.to_numpy(), direct)
    assert main(["baseline", str(tmp_path / "mouse.h5ad"), str(tmp_path / "human.h5ad"), "--label", "cell_type",
                 "--out", str(tmp_path / "x.csv"), "--counts", "spliced"]) == 2
    assert "mouse.h5ad: has no layer 'spliced'" in capsys.readouterr().err
