"""Gene vocabularies, gene medians, symbol maps and orthologs.

The unified Mix-Geneformer vocabulary is one flat list of tokens: ``<pad>`` = 0, ``<mask>`` = 1, the
Geneformer V1 (gc30M) human Ensembl genes with their original ids 2..25,425, then mouse Ensembl genes in
ascending id order. Keeping the V1 ids unchanged keeps Genecorpus-30M and Geneformer V1 checkpoints usable
as they are. That is the paper's ``union`` vocabulary, where a mouse gene and its human ortholog are unrelated tokens;
:func:`orthologs_vocab` makes the ``orthologs`` one, where a one-to-one pair shares its human token (the mouse gene
becomes an alias of it) and every other gene keeps its own. Everything here is read from plain-text TSV files
bundled in ``mixgf/resources`` (built by ``python -m mixgf.resources.build``); legacy Geneformer pickles are read
only through :func:`load_pickle_dict`, which refuses anything but a plain ``dict`` of ``str`` to numbers or strings.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from mixgf.io import write_text_atomic

PAD, MASK = "<pad>", "<mask>"
SPECIES = ("human", "mouse")
ENSEMBL_PREFIX = {"human": "ENSG", "mouse": "ENSMUSG"}


def check_species(species: str) -> str:
    if species not in SPECIES:
        raise ValueError(f"unknown species {species!r}; use one of {', '.join(SPECIES)}")
    return species


def species_of_ensembl(gene_id: str) -> str | None:
    """'human' for ENSG..., 'mouse' for ENSMUSG..., None otherwise."""
    if gene_id.startswith("ENSMUSG"):
        return "mouse"
    if gene_id.startswith("ENSG"):
        return "human"
    return None


def content_hash(lines) -> str:
    """Short sha256 of a sequence of text lines: identifies a vocabulary or a median table."""
    h = hashlib.sha256()
    for line in lines:
        h.update(str(line).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class GeneVocab:
    """An ordered token list; token id = position. Immutable and hashable by content.

    ``aliases`` maps a token to the other genes that share it (the orthologs vocabulary: a human token's one-to-one
    mouse ortholog); :meth:`ids` finds a token by its own name or any alias.
    """

    tokens: tuple[str, ...] = field(repr=False)
    name: str = field(default="custom", compare=False)
    aliases: tuple[tuple[str, tuple[str, ...]], ...] = field(default=(), repr=False)  # (token, its aliases), by id
    _index: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.tokens[:2] != (PAD, MASK):
            raise ValueError(f"vocabulary {self.name!r} must start with {PAD!r}, {MASK!r}; got {self.tokens[:2]}")
        index = {t: i for i, t in enumerate(self.tokens)}
        names = list(self.tokens)
        for token, others in self.aliases:
            if token not in index:
                raise ValueError(f"vocabulary {self.name!r} gives aliases for {token!r}, which is not one of its tokens")
            index |= {alias: index[token] for alias in others}
            names += others
        if len(index) != len(names):
            dup = pd.Series(names)[pd.Series(names).duplicated()].iloc[0]
            raise ValueError(f"vocabulary {self.name!r} lists gene {dup!r} more than once")
        object.__setattr__(self, "_index", index)

    pad_id = 0
    mask_id = 1

    def __repr__(self) -> str:
        return f"GeneVocab(name={self.name!r}, size={len(self)}, hash={self.hash!r})"

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def __getitem__(self, token: str) -> int:
        return self._index[token]

    @property
    def hash(self) -> str:
        """Of the tokens, then of the aliases (none: the hash of the tokens alone, as before aliases existed)."""
        return content_hash([*self.tokens, *(f"{t}\t{','.join(a)}" for t, a in self.aliases)])

    def ids(self, genes, missing: int = -1) -> np.ndarray:
        """Token ids of ``genes`` (int64), ``missing`` where a gene is not in the vocabulary."""
        return np.fromiter((self._index.get(g, missing) for g in genes), dtype=np.int64, count=len(genes))

    def gene_ids(self, species: str) -> np.ndarray:
        """Per token id, the Ensembl id of ``species``' gene behind it ("" where the token has none): a shared token
        reads as the mouse gene in mouse cells."""
        prefix = ENSEMBL_PREFIX[check_species(species)]
        out = np.array([t if t.startswith(prefix) else "" for t in self.tokens], dtype=object)
        for token, others in self.aliases:
            own = [a for a in others if a.startswith(prefix)]
            if own:
                out[self._index[token]] = own[0]
        return out

    def species_ids(self, species: str) -> np.ndarray:
        """Token ids of one species' genes (shared tokens count for both species)."""
        # "ENSMUSG" does not start with "ENSG", so the prefix test separates the species
        return np.flatnonzero(self.gene_ids(species) != "").astype(np.int64)

    def identity(self) -> dict:
        """What a token dataset or checkpoint records to prove which vocabulary made it."""
        return {"name": self.name, "hash": self.hash, "size": len(self)}

    @classmethod
    def from_token_dict(cls, token_dict: dict, name: str = "custom") -> GeneVocab:
        """From a Geneformer-style ``{gene: id}`` dict whose ids are 0..n-1 with <pad>=0, <mask>=1."""
        ids = np.array([int(v) for v in token_dict.values()])
        if sorted(ids.tolist()) != list(range(len(ids))):
            raise ValueError(f"token dictionary {name!r} does not use the ids 0..{len(ids) - 1} exactly once")
        tokens = [None] * len(ids)
        for gene, i in zip(token_dict, ids):
            tokens[i] = str(gene)
        return cls(tuple(tokens), name=name)

    def write(self, path: str | Path) -> None:
        """Write as a TSV (token_id, token, and aliases, comma-separated, if any), atomically; gzip if the name ends
        in .gz."""
        if not self.aliases:
            write_text_atomic(path, "token_id\ttoken\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(self.tokens)))
            return
        aliases = dict(self.aliases)
        write_text_atomic(path, "token_id\ttoken\taliases\n" + "".join(
            f"{i}\t{t}\t{','.join(aliases.get(t, ()))}\n" for i, t in enumerate(self.tokens)))

    @classmethod
    def read(cls, path: str | Path, name: str | None = None) -> GeneVocab:
        frame = pd.read_csv(path, sep="\t", dtype={"token": str, "aliases": str}, keep_default_na=False)
        if list(frame.columns[:2]) != ["token_id", "token"] or not (frame.token_id.to_numpy() == np.arange(len(frame))).all():
            raise ValueError(f"{path}: expected a TSV with columns token_id, token (, aliases) and ids 0..n-1 in order")
        aliases = () if "aliases" not in frame else tuple(
            (t, tuple(a.split(","))) for t, a in zip(frame.token, frame.aliases) if a)
        return cls(tuple(frame.token), name=name or Path(path).name.split(".")[0], aliases=aliases)


def subset_vocab(vocab: GeneVocab, genes) -> GeneVocab:
    """``vocab`` restricted to ``genes`` (and <pad>, <mask>), in its order. A model's output head and its optimiser
    state scale with the vocabulary: the demo atlas uses 8,000 of the unified vocabulary's 82,606 genes."""
    keep = set(genes)
    aliases = dict(vocab.aliases)
    tokens = vocab.tokens[:2] + tuple(t for t in vocab.tokens[2:] if t in keep or keep.intersection(aliases.get(t, ())))
    if len(tokens) == 2:
        raise ValueError(f"none of the {len(keep):,} genes is in vocabulary {vocab.name!r}")
    return GeneVocab(tokens, name=f"{vocab.name}-subset{len(tokens) - 2}",
                     aliases=tuple((t, aliases[t]) for t in tokens if t in aliases))


VOCAB_MODES = ("union", "orthologs")


def orthologs_vocab(vocab: GeneVocab, pairs: pd.DataFrame | None = None) -> GeneVocab:
    """``vocab`` with every one-to-one ortholog pair of ``pairs`` (columns human_id, mouse_id; default: the bundled
    Ensembl BioMart table, :func:`orthologs`) whose two genes it holds merged into one token: the human token keeps
    its id and name, the mouse gene becomes its alias, and the mouse token is removed (the ids after it move up).
    Genes without a one-to-one partner keep their species' token; gene medians stay per species."""
    pairs = orthologs() if pairs is None else pairs
    both = pairs[pairs.human_id.isin(vocab.tokens) & pairs.mouse_id.isin(vocab.tokens)]
    merged = dict(zip(both.human_id, both.mouse_id))
    aliases = dict(vocab.aliases)
    for human, mouse in merged.items():
        aliases[human] = aliases.get(human, ()) + (mouse,) + aliases.get(mouse, ())
    gone = set(merged.values())
    tokens = tuple(t for t in vocab.tokens if t not in gone)
    return GeneVocab(tokens, name=f"{vocab.name}-orthologs{len(merged)}",
                     aliases=tuple((t, aliases[t]) for t in tokens if t in aliases))


def ortholog_targets(vocab: GeneVocab, species: str, pairs: pd.DataFrame | None = None) -> np.ndarray:
    """Per token id of ``species``' genes, the id of its one-to-one ortholog's token in the other species (-1: none).

    How a cell is rendered in the other species' tokens (the cross-species contrastive term). In the union vocabulary
    it maps a mouse token to its human partner's token; in the orthologs one a shared token to itself."""
    pairs = orthologs() if pairs is None else pairs
    source, target = ("human_id", "mouse_id") if check_species(species) == "human" else ("mouse_id", "human_id")
    partner = dict(zip(pairs[source], pairs[target]))
    return vocab.ids([partner.get(gene, "") for gene in vocab.gene_ids(species)])


def unified_vocab(human: GeneVocab, mouse_genes) -> GeneVocab:
    """Human vocabulary with its ids kept, then the mouse genes (sorted, deduplicated) appended."""
    mouse = sorted({g for g in mouse_genes if g not in (PAD, MASK)})
    bad = [g for g in mouse if not g.startswith("ENSMUSG")][:3]
    if bad:
        raise ValueError(f"mouse gene list holds non-ENSMUSG ids such as {bad}")
    return GeneVocab(human.tokens + tuple(mouse), name=f"{human.name}+mouse{len(mouse)}")


# ---------------------------------------------------------------------------------------------------------------
# bundled resources
# ---------------------------------------------------------------------------------------------------------------

def _resource(name: str):
    return resources.files("mixgf.resources") / name


def _read_resource_tsv(name: str, **kwargs) -> pd.DataFrame:
    with _resource(name).open("rb") as fh:
        # gene symbols such as "NA" or "NULL" are names, not missing values
        return pd.read_csv(io.BytesIO(gzip.decompress(fh.read())), sep="\t", keep_default_na=False, **kwargs)


@cache
def default_vocab() -> GeneVocab:
    """The bundled unified vocabulary (Geneformer V1 human ids + BioMart mouse genes)."""
    frame = _read_resource_tsv("vocab_mixgf.tsv.gz", dtype={"token": str})
    return GeneVocab(tuple(frame.token), name="mixgf-gc30M-biomart")


@cache
def geneformer_v1_vocab() -> GeneVocab:
    """Geneformer V1 (gc30M) human vocabulary: the first 25,426 tokens of the unified vocabulary."""
    tokens = default_vocab().tokens
    n = sum(1 for t in tokens if not t.startswith("ENSMUSG"))
    return GeneVocab(tokens[:n], name="geneformer-gc30M")


def load_vocab(spec: str | Path | None = None) -> GeneVocab:
    """A vocabulary by name or file.

    ``None`` or ``"mixgf"``: the bundled unified vocabulary; ``"geneformer-v1"``: its Geneformer V1 part; a
    ``.pkl`` path: a Geneformer-style token dictionary (read safely); any other path: a TSV from :meth:`GeneVocab.write`.
    """
    if spec is None or str(spec) == "mixgf":
        return default_vocab()
    if str(spec) == "geneformer-v1":
        return geneformer_v1_vocab()
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"vocabulary {spec}: no such file (give 'mixgf', 'geneformer-v1', a .pkl or a .tsv)")
    if path.suffix == ".pkl":
        return GeneVocab.from_token_dict(load_pickle_dict(path), name=path.stem)
    return GeneVocab.read(path)


@dataclass(frozen=True)
class Medians:
    """Per-gene non-zero median of count / n_counts * 10,000, the divisor of rank-value encoding."""

    values: pd.Series  # index: Ensembl id, float64
    name: str = "custom"

    @property
    def hash(self) -> str:
        return content_hash(f"{g}\t{v!r}" for g, v in self.values.items())

    def identity(self) -> dict:
        return {"name": self.name, "hash": self.hash, "size": int(self.values.size)}

    def write(self, path: str | Path) -> None:
        # repr keeps every float64 bit, so medians round-trip exactly
        write_text_atomic(path, "ensembl_id\tmedian\n" + "".join(f"{g}\t{float(v)!r}\n" for g, v in self.values.items()))

    @classmethod
    def read(cls, path: str | Path, name: str | None = None) -> Medians:
        frame = pd.read_csv(path, sep="\t", dtype={"ensembl_id": str, "median": np.float64}, float_precision="round_trip")
        if list(frame.columns) != ["ensembl_id", "median"]:
            raise ValueError(f"{path}: expected a TSV with columns ensembl_id, median; got {list(frame.columns)}")
        bad = frame[~(frame["median"] > 0)]
        if len(bad):
            raise ValueError(f"{path}: medians must be positive; {bad.ensembl_id.iloc[0]} has {bad['median'].iloc[0]}")
        return cls(pd.Series(frame["median"].to_numpy(), index=frame.ensembl_id.to_numpy()), name or Path(path).name.split(".")[0])


@cache
def default_medians(species: str) -> Medians:
    """Bundled medians: Geneformer V1's for human. Mouse has none bundled (compute them with `mixgf medians`)."""
    if check_species(species) == "mouse":
        raise FileNotFoundError(
            "no mouse gene medians are bundled (Mouse-Geneformer's are not public here); compute them with "
            "`mixgf medians FILES --species mouse --out medians.tsv` or import Mouse-Geneformer's pickle with "
            "`mixgf import-dict mouse_gene_median_dictionary.pkl --kind medians --out medians.tsv`"
        )
    frame = _read_resource_tsv("medians_human_gc30M.tsv.gz", dtype={"ensembl_id": str}, float_precision="round_trip")
    return Medians(pd.Series(frame["median"].to_numpy(), index=frame.ensembl_id.to_numpy()), "geneformer-gc30M")


def load_medians(species: str, path: str | Path | None = None) -> Medians:
    return default_medians(species) if path is None else Medians.read(path)


@cache
def symbol_map(species: str) -> dict[str, str]:
    """Gene symbol -> Ensembl id (human: Geneformer's gc30M map; mouse: Ensembl BioMart, unambiguous symbols)."""
    frame = _read_resource_tsv(f"symbols_{check_species(species)}.tsv.gz", dtype=str)
    return dict(zip(frame.symbol, frame.ensembl_id))


@cache
def orthologs() -> pd.DataFrame:
    """Ensembl BioMart one-to-one human/mouse orthologs: human_id, human_symbol, mouse_id, mouse_symbol."""
    return _read_resource_tsv("orthologs_one2one.tsv.gz", dtype=str)


# ---------------------------------------------------------------------------------------------------------------
# legacy Geneformer pickles
# ---------------------------------------------------------------------------------------------------------------

class _DictOnlyUnpickler(pickle.Unpickler):
    """Builds only plain containers and numpy scalars; any other global is refused before it can run."""

    _allowed = {
        ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain dicts of str -> number/str are allowed")


def load_pickle_dict(path: str | Path) -> dict:
    """Read a Geneformer / Mouse-Geneformer dictionary pickle safely.

    Admits only a ``dict`` whose keys are ``str`` and whose values are ``int``, ``float``, ``str`` or numpy
    scalars (returned as Python ``int`` / ``float`` / ``str``). Anything else raises ``ValueError`` naming the file.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            obj = _DictOnlyUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as err:
        raise ValueError(f"{path}: not a plain dictionary pickle ({err}); only Geneformer-style dicts can be imported") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, expected a dict of gene -> value")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: key {key!r} is a {type(key).__name__}, expected str")
        if isinstance(value, (np.integer, np.floating)):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{path}: value of {key!r} is a {type(value).__name__}, expected int, float or str")
        out[key] = value
    return out
