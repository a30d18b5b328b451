"""Read raw-count single-cell files in row chunks, whatever their format.

``open_cells`` gives a :class:`CellFile` for an .h5ad, a .loom, a 10x matrix folder / .h5, or an in-memory
AnnData. It reads metadata (obs, var) eagerly and counts lazily, ``chunk(start, stop)`` rows at a time as CSR,
so memory does not grow with the number of cells. ``resolve_gene_ids`` turns the file's gene annotation into
Ensembl ids of one species.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from mixgf.vocab import ENSEMBL_PREFIX, check_species, species_of_ensembl, symbol_map


class InputError(ValueError):
    """Bad input: the message names the file, the problem and the fix."""


@dataclass
class CellFile:
    """One input: cell metadata, gene annotation and a row-chunk reader of the chosen count matrix."""

    path: str
    obs: pd.DataFrame
    var: pd.DataFrame
    read_rows: Callable[[int, int], sp.csr_matrix] = field(repr=False)
    close: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    def chunk(self, start: int, stop: int) -> sp.csr_matrix:
        """Counts of rows ``start:stop`` as CSR (float64 or the stored dtype), indices sorted."""
        x = self.read_rows(start, stop)
        x = x.tocsr() if sp.issparse(x) else sp.csr_matrix(np.asarray(x))
        if not x.has_sorted_indices:
            x.sort_indices()
        return x

    def n_counts(self, start: int, stop: int, counts: sp.csr_matrix) -> np.ndarray:
        """Total counts of rows ``start:stop``: obs['n_counts'] when present (Geneformer's convention), else the
        sum over all genes of ``counts`` (those rows)."""
        if "n_counts" in self.obs.columns:
            return self.obs["n_counts"].to_numpy(dtype=np.float64)[start:stop]
        return np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()

    def passes_filter(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` to use: obs['filter_pass'] == 1 when present (Geneformer's convention), else all."""
        if "filter_pass" in self.obs.columns:
            return self.obs["filter_pass"].to_numpy()[start:stop] == 1
        return np.ones(stop - start, dtype=bool)


def open_cells(source: str | Path | AnnData, *, counts: str = "X") -> CellFile:
    """Open an input for chunked reading.

    ``counts`` picks the matrix: ``"X"``, ``"raw"`` (``.raw.X``, with ``.raw.var``), or the name of a layer.
    """
    if isinstance(source, AnnData):
        return _from_anndata(source, "<AnnData>", counts)
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    try:
        if path.is_dir() or path.suffix == ".h5" or path.name.endswith((".mtx", ".mtx.gz")):
            return _open_10x(path, counts)
        if path.suffix == ".h5ad":
            return _open_h5ad(path, counts)
        if path.suffix == ".loom":
            return _open_loom(path, counts)
    except InputError:
        raise
    except Exception as err:  # h5py, anndata and loompy raise many types for truncated or foreign files
        raise InputError(f"{path}: could not be read as {path.suffix or '10x'} ({type(err).__name__}: {err}); "
                         "is the file complete and in that format?") from err
    raise InputError(f"{path}: unknown format; give an .h5ad, a .loom, a 10x matrix folder or a 10x .h5 file")


def count_matrix(adata: AnnData, counts: str, name: str):
    """The matrix ``counts`` names (``"X"``, ``"raw"`` or a layer) of an in-memory AnnData, with its var."""
    if counts == "raw":
        if adata.raw is None:
            raise InputError(f"{name}: has no .raw; choose --counts X or a layer ({', '.join(adata.layers) or 'none'})")
        return adata.raw.X, adata.raw.var
    if counts == "X":
        return adata.X, adata.var
    if counts in adata.layers:
        return adata.layers[counts], adata.var
    raise InputError(f"{name}: has no layer {counts!r}; layers are: {', '.join(adata.layers) or 'none'}")


def _from_anndata(adata: AnnData, name: str, counts: str) -> CellFile:
    matrix, var = count_matrix(adata, counts, name)
    if sp.issparse(matrix) and not sp.isspmatrix_csr(matrix):
        matrix = sp.csr_matrix(matrix)
    return CellFile(name, adata.obs, _with_index(var), lambda a, b: matrix[a:b])


def _with_index(var: pd.DataFrame) -> pd.DataFrame:
    var = var.copy()
    var.index = var.index.astype(str)
    return var


def _open_h5ad(path: Path, counts: str) -> CellFile:
    import h5py
    from anndata.io import read_elem, sparse_dataset

    f = h5py.File(path, "r")
    try:
        obs = read_elem(f["obs"])
        if counts == "raw":
            if "raw" not in f:
                raise InputError(f"{path}: has no .raw; choose --counts X or a layer "
                                 f"({', '.join(f['layers']) if 'layers' in f else 'none'})")
            elem, var = f["raw/X"], read_elem(f["raw/var"])
        elif counts == "X":
            elem, var = f["X"], read_elem(f["var"])
        else:
            layers = list(f["layers"]) if "layers" in f else []
            if counts not in layers:
                raise InputError(f"{path}: has no layer {counts!r}; layers are: {', '.join(layers) or 'none'}")
            elem, var = f[f"layers/{counts}"], read_elem(f["var"])
        encoding = elem.attrs.get("encoding-type", "array") if isinstance(elem, h5py.Group) else "array"
        if encoding == "csr_matrix":
            matrix = sparse_dataset(elem)
            read_rows = lambda a, b: matrix[a:b]  # noqa: E731
        elif encoding == "csc_matrix":
            warnings.warn(f"{path}: counts are stored column-major (CSC); reading the whole matrix into memory. "
                          "Rewrite it as CSR (adata.X = adata.X.tocsr()) to stream it.", stacklevel=3)
            whole = read_elem(elem).tocsr()
            read_rows = lambda a, b: whole[a:b]  # noqa: E731
        else:
            read_rows = lambda a, b: elem[a:b]  # noqa: E731
    except Exception:
        f.close()
        raise
    return CellFile(str(path), obs, _with_index(var), read_rows, f.close)


def _open_loom(path: Path, counts: str) -> CellFile:
    import loompy

    ds = loompy.connect(str(path), "r", validate=False)
    try:
        if counts == "raw":
            raise InputError(f"{path}: loom files have no .raw; use --counts X (the main matrix) or a layer name")
        layer = "" if counts == "X" else counts
        if layer not in ds.layers:
            raise InputError(f"{path}: has no layer {counts!r}; layers are: {', '.join(k for k in ds.layers if k) or 'none'}")
        obs = pd.DataFrame({k: ds.ca[k] for k in ds.ca.keys() if ds.ca[k].ndim == 1})
        obs.index = obs.pop("CellID").astype(str) if "CellID" in obs else obs.index.astype(str)
        var = pd.DataFrame({k: ds.ra[k] for k in ds.ra.keys() if ds.ra[k].ndim == 1})
        if "Gene" in var:
            var.index = var["Gene"].astype(str)
        matrix = ds.layers[layer]
    except Exception:
        ds.close()
        raise
    return CellFile(str(path), obs, _with_index(var), lambda a, b: matrix[:, a:b].T, ds.close)


def _open_10x(path: Path, counts: str) -> CellFile:
    import scanpy as sc

    if counts != "X":
        raise InputError(f"{path}: a 10x matrix has only one count matrix; drop --counts {counts}")
    if path.suffix == ".h5":
        adata = sc.read_10x_h5(path, gex_only=True)
    else:
        adata = sc.read_10x_mtx(path if path.is_dir() else path.parent, var_names="gene_ids")
    adata.var["symbol"] = adata.var.pop("gene_symbols") if "gene_symbols" in adata.var else adata.var_names
    return _from_anndata(adata, str(path), "X")


# ---------------------------------------------------------------------------------------------------------------
# gene identifiers
# ---------------------------------------------------------------------------------------------------------------

_VERSION = re.compile(r"\.\d+$")


@dataclass(frozen=True)
class GeneIds:
    """Ensembl ids per input column (None where unmapped) and where they came from."""

    ensembl: np.ndarray  # object array
    source: str


def _ensembl_share(values: pd.Series, species: str) -> float:
    return float(values.astype(str).str.startswith(ENSEMBL_PREFIX[species]).mean()) if len(values) else 0.0


def resolve_gene_ids(var: pd.DataFrame, species: str, *, gene_column: str | None = None,
                     name: str = "input") -> GeneIds:
    """Ensembl ids for each gene of ``var``.

    Order of preference: ``gene_column`` if given; ``var['ensembl_id']`` (Geneformer's convention); the index if
    it holds Ensembl ids of ``species``; else the index read as gene symbols through the bundled symbol map.
    Version suffixes (``ENSG...​.12``) are stripped. Ids of the other species are an error, not a silent miss.
    """
    check_species(species)
    if gene_column is not None:
        if gene_column not in var.columns and gene_column != "index":
            raise InputError(f"{name}: var has no column {gene_column!r}; columns are: {', '.join(var.columns) or 'none'}")
        values, source = (var.index.to_series() if gene_column == "index" else var[gene_column]), f"var[{gene_column!r}]"
    elif "ensembl_id" in var.columns:
        values, source = var["ensembl_id"], "var['ensembl_id']"
    else:
        values, source = var.index.to_series(), "var index"
    values = values.astype(str).str.replace(_VERSION, "", regex=True).to_numpy(dtype=object)

    other = "mouse" if species == "human" else "human"
    first = next((v for v in values if species_of_ensembl(v) is not None), None)
    if first is not None and species_of_ensembl(first) == other and _ensembl_share(pd.Series(values), other) > 0.5:
        raise InputError(f"{name}: genes in {source} are {other} Ensembl ids (e.g. {first}) but --species is {species}")
    if _ensembl_share(pd.Series(values), species) >= 0.5:
        ensembl = np.array([v if v.startswith(ENSEMBL_PREFIX[species]) else None for v in values], dtype=object)
        return GeneIds(ensembl, source)
    symbols = symbol_map(species)
    ensembl = np.array([symbols.get(v) for v in values], dtype=object)
    return GeneIds(ensembl, f"{source} as {species} gene symbols")


def suggest_gene_columns(var: pd.DataFrame, species: str) -> list[str]:
    """var columns that look like gene ids of ``species`` (Ensembl ids, or symbols the bundled map knows)."""
    symbols = symbol_map(species)
    found = []
    for col in var.columns:
        values = var[col].astype(str)
        if _ensembl_share(values, species) > 0.5 or values.map(lambda v: v in symbols).mean() > 0.5:
            found.append(col)
    return found
