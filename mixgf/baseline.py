"""Non-transformer controls for Tables 1-2 and Figure 2: what a pretrained model has to beat.

The paper's differences are 0.1-1.5 points, and Boiarsky et al. 2023 and Kedzierska et al. 2025 showed that simple
methods on log-normalised expression often match single-cell foundation models. So every fine-tuned number gets a
control here: a logistic regression on log1p CP10k expression (:func:`expression_control`), the same across species
through one-to-one orthologs (:func:`ortholog_transfer`), and k-NN label transfer in any embedding space
(:func:`knn_transfer`). Cross-species predictions are compared to the other species' labels through a cell-type
correspondence table (:func:`map_labels`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from mixgf.medians import TARGET_SUM
from mixgf.tokenize import LOG_SCALE_MAX
from mixgf.vocab import orthologs as bundled_orthologs
from mixgf.vocab import species_of_ensembl

log = logging.getLogger(__name__)


def log1p_cp10k(X) -> sp.csr_matrix:
    """log1p of counts scaled to 10,000 per cell (scanpy's ``normalize_total(target_sum=1e4)`` + ``log1p``), float32.

    Cells with no counts stay 0. Raises on negative, non-finite or already log-transformed values.
    """
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    if not np.isfinite(X.data).all() or (X.data < 0).any():
        raise ValueError("expression holds negative or non-finite values; give raw counts")
    if X.nnz and X.data.max() <= LOG_SCALE_MAX and not np.array_equal(X.data, np.rint(X.data)):
        raise ValueError(f"every value is <= {X.data.max():.3g} and not all are integers, so the expression looks "
                         "log-transformed already; give raw counts (e.g. adata.raw or a counts layer)")
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    X.data *= np.repeat(scale, np.diff(X.indptr))
    np.log1p(X.data, out=X.data)
    return X.astype(np.float32)


def logistic_regression(X_train, y_train, X_test, *, C: float = 1.0, max_iter: int = 1000,
                        seed: int = 42) -> np.ndarray:
    """Predicted labels of ``X_test`` from a multinomial, L2-penalised logistic regression fit on ``X_train``.

    The features go in as they are (log1p CP10k, not standardised), as in the baseline of Boiarsky et al. 2023
    (clinicalml/sc-foundation-eval: scikit-learn on the log-normalised matrix, no scaler): scaling every gene to unit
    variance would densify the sparse matrix and inflate genes detected in a handful of cells. They used L1
    (liblinear, one-vs-rest) with C picked by 5-fold cross-validation; L2 with lbfgs and a fixed ``C`` instead
    converges in seconds on a few hundred cells x a few thousand genes, is deterministic, and keeps the control a
    single fit; a tuned ``C`` could only strengthen the control, so this errs in the transformers' favour. ``seed``
    goes to scikit-learn for solvers that draw random numbers (lbfgs draws none).
    """
    y_train = np.asarray(y_train)
    if len(np.unique(y_train)) < 2:
        raise ValueError(f"logistic regression needs at least 2 classes among the training labels, got "
                         f"{np.unique(y_train)}")
    model = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    return model.fit(X_train, y_train).predict(X_test)


def expression_control(adata: ad.AnnData, label: str, train_cells, test_cells, **kwargs) -> np.ndarray:
    """Logistic regression on log1p CP10k of ``adata.X`` (raw counts): fit on ``train_cells``, predict
    ``test_cells`` (both obs_names). ``kwargs`` go to :func:`logistic_regression`."""
    train, test = _rows(adata, train_cells, "training"), _rows(adata, test_cells, "test")
    y = _labels(adata, label, train)
    X = log1p_cp10k(adata.X)
    return logistic_regression(X[train], y, X[test], **kwargs)


@dataclass(frozen=True)
class OrthologTransfer:
    """Labels predicted for every target cell, and what they were predicted through."""

    predicted: np.ndarray  # one label of the source's per target cell
    n_orthologs: int  # one-to-one ortholog pairs present in both data sets
    source_species: str
    target_species: str


def ortholog_transfer(source: ad.AnnData, target: ad.AnnData, label: str, *, orthologs: pd.DataFrame | None = None,
                      min_orthologs: int = 50, **kwargs) -> OrthologTransfer:
    """Train on every cell of ``source`` (one species), predict every cell of ``target`` (the other species) through
    one-to-one orthologs.

    Genes are Ensembl ids in ``var_names``; ``orthologs`` has columns ``human_id`` and ``mouse_id`` (default: the
    bundled Ensembl BioMart one-to-one table, :func:`mixgf.vocab.orthologs`). Each species is normalised (log1p
    CP10k) over its own full gene set, then restricted to the ortholog pairs both hold, so the library size
    does not depend on which genes have a partner. ``kwargs`` go to :func:`logistic_regression`.
    """
    table = bundled_orthologs() if orthologs is None else orthologs
    src_species, tgt_species = _species(source, "source"), _species(target, "target")
    if src_species == tgt_species:
        raise ValueError(f"source and target are both {src_species}; ortholog transfer goes from one species to "
                         "the other")
    pairs = table[[f"{src_species}_id", f"{tgt_species}_id"]].to_numpy(str)
    src_col, tgt_col = source.var_names.get_indexer(pairs[:, 0]), target.var_names.get_indexer(pairs[:, 1])
    shared = (src_col >= 0) & (tgt_col >= 0)
    n = int(shared.sum())
    if n < min_orthologs:
        raise ValueError(f"only {n} one-to-one ortholog pairs are in both the source ({_describe(source, src_species)})"
                         f" and the target ({_describe(target, tgt_species)}); need at least {min_orthologs}. Are "
                         "both var_names Ensembl gene ids of the same release as the ortholog table?")
    log.info("ortholog transfer %s -> %s through %d one-to-one orthologs", src_species, tgt_species, n)
    X_source = log1p_cp10k(source.X)[:, src_col[shared]]
    X_target = log1p_cp10k(target.X)[:, tgt_col[shared]]
    predicted = logistic_regression(X_source, _labels(source, label), X_target, **kwargs)
    return OrthologTransfer(predicted, n, src_species, tgt_species)


def knn_transfer(source_embedding, source_labels, target_embedding, *, k: int = 15,
                 chunk_size: int | None = None) -> np.ndarray:
    """Label of each target row: majority vote of its ``k`` most cosine-similar source rows.

    Vote ties go to the label with the larger summed similarity, then to the first in sorted label order. Target
    rows are processed ``chunk_size`` at a time (default: about 2**24 similarities per chunk), so no
    target x source matrix is ever built whole.
    """
    source, target = _unit_rows(source_embedding, "source"), _unit_rows(target_embedding, "target")
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"source embedding has {source.shape[1]} dimensions, target {target.shape[1]}")
    classes, codes = np.unique(np.asarray(source_labels), return_inverse=True)
    if len(codes) != len(source):
        raise ValueError(f"{len(codes)} source labels for {len(source)} source rows")
    k = min(k, len(source))
    chunk_size = chunk_size or max(1, 2**24 // len(source))
    predicted = np.empty(len(target), dtype=np.int64)
    for start in range(0, len(target), chunk_size):
        sim = target[start : start + chunk_size] @ source.T
        nearest = np.argpartition(sim, -k, axis=1)[:, -k:]
        cell = (np.arange(len(sim))[:, None] * len(classes) + codes[nearest]).ravel()  # (row, label) of each vote
        size = len(sim) * len(classes)
        votes = np.bincount(cell, minlength=size).reshape(len(sim), -1)
        summed = np.bincount(cell, np.take_along_axis(sim, nearest, axis=1).ravel(), size).reshape(len(sim), -1)
        top = votes == votes.max(axis=1, keepdims=True)
        predicted[start : start + len(sim)] = np.where(top, summed, -np.inf).argmax(axis=1)  # first max: label order
    return classes[predicted]


def map_labels(labels, correspondence: dict | pd.DataFrame | str | Path | None) -> np.ndarray:
    """``labels`` translated through a cell-type correspondence (a dict, or a table / CSV with columns ``source``
    and ``target``); ``None`` keeps them (the demo atlas names homologous types alike). Unmapped labels become
    ``None``, with a warning naming them."""
    labels = np.asarray(labels, dtype=object)
    if correspondence is None:
        return labels
    if isinstance(correspondence, (str, Path)):
        correspondence = pd.read_csv(correspondence, dtype=str, keep_default_na=False)
    if isinstance(correspondence, pd.DataFrame):
        if not {"source", "target"} <= set(correspondence.columns):
            raise ValueError(f"a correspondence table needs columns source and target, got "
                             f"{list(correspondence.columns)}")
        ambiguous = correspondence.groupby("source")["target"].nunique()
        if (ambiguous > 1).any():
            raise ValueError(f"correspondence maps {ambiguous.index[ambiguous > 1][0]!r} to more than one target label")
        correspondence = dict(zip(correspondence["source"], correspondence["target"]))
    mapped = np.array([correspondence.get(x) for x in labels], dtype=object)
    missing = pd.unique(labels[pd.isna(mapped)])
    if len(missing):
        warnings.warn(f"{int(pd.isna(mapped).sum())} of {len(labels)} labels have no correspondence and become None: "
                      f"{', '.join(map(repr, missing[:10]))}{' ...' if len(missing) > 10 else ''}", stacklevel=2)
    return mapped


def counterparts(labels, table: pd.DataFrame | None, source: str, target: str) -> np.ndarray:
    """``target``-species labels in the ``source`` species' names, through a correspondence table with columns
    ``mouse`` and ``human`` (one row per pair of corresponding cell types; ``None``: the names are shared, as in the
    demo atlas). Labels without a counterpart become None, with a warning naming them (:func:`map_labels`)."""
    if table is None:
        return np.asarray(labels, dtype=object)
    missing = {"mouse", "human"} - set(table.columns)
    if missing:
        raise ValueError(f"a cell-type correspondence table needs columns mouse and human, it lacks "
                         f"{', '.join(sorted(missing))}")
    return map_labels(labels, dict(zip(table[target], table[source])))


def with_ensembl_ids(adata: ad.AnnData, species: str, *, gene_column: str | None = None,
                     name: str = "input") -> ad.AnnData:
    """``adata`` with its genes' Ensembl ids as var_names (found as the tokenizer finds them,
    :func:`mixgf.readers.resolve_gene_ids`: a ``gene_column``, var['ensembl_id'], Ensembl ids or gene symbols),
    genes without an id dropped and columns that share one summed, so that :func:`ortholog_transfer` can match
    the ortholog table."""
    from mixgf.readers import resolve_gene_ids

    ids = resolve_gene_ids(adata.var, species, gene_column=gene_column, name=name).ensembl
    known = np.flatnonzero(pd.notna(ids))
    genes, column = np.unique(ids[known].astype(str), return_inverse=True)
    merge = sp.csr_matrix((np.ones(len(known), np.float32), (known, column)), shape=(adata.n_vars, len(genes)))
    X = sp.csr_matrix(adata.X) @ merge
    return ad.AnnData(X=X, obs=adata.obs.copy(), var=pd.DataFrame(index=pd.Index(genes, name="ensembl_id")))


def _rows(adata: ad.AnnData, cells, what: str) -> np.ndarray:
    if not adata.obs_names.is_unique:
        raise ValueError("adata.obs_names are not unique; run adata.obs_names_make_unique() first")
    cells = pd.Index(np.asarray(cells).astype(str))
    rows = adata.obs_names.get_indexer(cells)
    if (rows < 0).any():
        missing = cells[rows < 0]
        raise KeyError(f"{len(missing)} of {len(cells)} {what} cells are not in adata.obs_names, e.g. "
                       f"{list(missing[:3])}")
    return rows


def _labels(adata: ad.AnnData, label: str, rows: np.ndarray | None = None) -> np.ndarray:
    """The training labels: obs[label] of ``rows`` (all cells if None) as strings; none may be missing."""
    if label not in adata.obs:
        raise KeyError(f"no obs column {label!r}; columns: {', '.join(adata.obs.columns)}")
    column = adata.obs[label] if rows is None else adata.obs[label].iloc[rows]
    if column.isna().any():
        raise ValueError(f"obs[{label!r}] has {int(column.isna().sum())} missing training labels; drop those cells "
                         "first")
    return column.astype(str).to_numpy()


def _species(adata: ad.AnnData, role: str) -> str:
    """The species whose Ensembl ids make up most of var_names."""
    found = pd.Series([species_of_ensembl(g) for g in adata.var_names], dtype=object).value_counts()
    if found.empty:
        raise ValueError(f"no Ensembl id among the {role}'s var_names (e.g. {list(adata.var_names[:3])}); map gene "
                         "symbols to Ensembl ids first (mixgf.vocab.symbol_map)")
    return found.index[0]


def _describe(adata: ad.AnnData, species: str) -> str:
    name = f"{adata.filename}, " if adata.isbacked else ""
    return f"{name}{species}, {adata.n_obs} cells x {adata.n_vars} genes"


def _unit_rows(x, role: str) -> np.ndarray:
    x = np.asarray(x)
    x = x.astype(np.promote_types(x.dtype, np.float32))
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{role} embedding must be a non-empty 2-d array, got shape {x.shape}")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    bad = ~(np.isfinite(norm[:, 0]) & (norm[:, 0] > 0))
    if bad.any():
        raise ValueError(f"{role} embedding row {np.flatnonzero(bad)[0]} is zero or not finite; cosine similarity "
                         "is undefined")
    return x / norm
