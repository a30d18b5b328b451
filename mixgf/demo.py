"""The embedded demo atlas: a seeded synthetic single-cell atlas with real gene identifiers.

No public corpus can be fetched at run time, so the demo profile simulates the organs of the paper's Tables 1-2
(mouse and human, with the paper's numbers of cell types), a heart with disease and normal cells in both species,
and adds the only real cells that ship offline: scanpy's ``pbmc68k_reduced`` (700 human PBMCs, 10 FACS-sorted
types) as the human "Immune" organ. Every gene is a real Ensembl id: human ENSG from Geneformer's V1 dictionary
(all with a Geneformer median), mouse ENSMUSG from Ensembl BioMart.

Generative model (all effects in log2 units)
--------------------------------------------
Genes. ``n_genes`` per species: a backbone of one-to-one orthologs (same row meaning in both species: human ENSG
and its mouse partner), then species-specific genes (human genes without a one-to-one mouse ortholog, and
vice versa). A few hundred backbone genes are named on purpose: ribosomal / housekeeping genes (high baseline),
lineage markers (CD79A for B cells, PECAM1 for endothelium, ...), cell-state genes (MKI67, ISG15, FOS, ...),
heart-failure genes used as disease drivers (NPPA, MYH7, ATP2A2, ...) and the human genes of pbmc68k_reduced.

Programs. A program is a set of genes with log2 fold changes. Cell types sit in a three-level tree
(class -> lineage -> cell type, e.g. immune -> myeloid -> macrophage), and each level has its own program;
so sibling types in a lineage share everything but their small type programs. Programs are keyed by name, not
by organ or species: "macrophage" is the same program in mouse kidney and human spleen, which is what makes
homologous cell types comparable across species. Each species sees a shared program through a filter
(per gene: dropped with probability ``divergence_drop``, else its fold change jittered by ``divergence_sd``)
plus a few genes of its own species-specific pool. An organ program (tissue environment, ambient RNA) is
added to every cell of that organ.

Cells. For a cell of type t in organ o of species s::

    x      = base_s + organ_s[o] + class_s[c(t)] + lineage_s[l(t)] + type_s[t]     # log2 profile
    x     += w * (profile of a sibling type - profile of t)      # transitional cells, fraction p_transition
    x     += sum_k a_k * state_s[k]                              # cell cycle, interferon, stress; a_k ~ Exp
    x     += disease_s                                           # heart cells in the "disease" state only
    mu     = L * 2**x / sum(2**x),  L ~ median_umis * size(t) * LogNormal(0, library_sd)
    count ~ NegativeBinomial(mean mu, dispersion theta_g)          # gamma-Poisson; theta_g ~ LogNormal

Cell-type proportions are uneven (log-normal weights) with a floor of ``min_type_fraction`` of the organ, so no
type falls under the paper's 0.5% filter. Transitional cells and the cell-state programs keep a linear classifier
on log1p-normalised counts below 100% (about 85-97% on most organs) without making the task trivial or hopeless.

Heart disease. Disease cells carry planted driver genes (up and down, mostly shared orthologs with the same
direction in both species, a few species-specific); :func:`heart_disease_drivers` returns them as ground truth
for the in-silico perturbation check. The human heart is not part of Table 2 (``Organ.in_paper`` is False).

Randomness. All draws come from ``np.random.Generator`` streams seeded by ``DemoConfig.seed``: one stream for the
genes and programs, one per organ for its cells. The same config gives identical counts, and simulating a subset
of organs (``DemoConfig.organs``) gives the same cells for those organs as the full atlas.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType
from typing import Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from mixgf.vocab import default_medians, default_vocab, orthologs, symbol_map

HEART = "Heart"
IMMUNE = "Immune"

# ---------------------------------------------------------------------------------------------------------------
# cell-type tree: class -> lineage -> cell type
# ---------------------------------------------------------------------------------------------------------------

LINEAGES: Mapping[str, tuple[str, tuple[str, ...]]] = MappingProxyType({
    # lineage: (class, cell types)
    "B lymphoid": ("immune", ("B cell", "plasma cell")),
    "T lymphoid": ("immune", ("T cell", "regulatory T cell", "double negative thymocyte", "double positive thymocyte",
                              "CD4 single positive thymocyte", "CD8 single positive thymocyte")),
    "NK": ("immune", ("NK cell",)),
    "myeloid": ("immune", ("macrophage", "monocyte", "dendritic cell", "plasmacytoid dendritic cell", "neutrophil",
                           "mast cell", "microglial cell", "Kupffer cell", "alveolar macrophage")),
    "erythroid": ("immune", ("erythroblast",)),
    "vascular endothelium": ("endothelial", ("endothelial cell", "endocardial cell", "liver sinusoidal endothelial cell")),
    "fibroblast": ("mesenchymal", ("fibroblast", "myofibroblast", "fibro-adipogenic progenitor", "stromal cell", "tenocyte",
                                   "hepatic stellate cell", "activated stellate cell", "quiescent stellate cell",
                                   "mesangial cell")),
    "mural": ("mesenchymal", ("smooth muscle cell", "pericyte", "brain pericyte")),
    "cardiac muscle": ("muscle", ("atrial myocyte", "ventricular myocyte")),
    "skeletal muscle": ("muscle", ("skeletal muscle satellite cell", "myoblast")),
    "neuron": ("neural", ("neuron", "interneuron", "medium spiny neuron")),
    "glia": ("neural", ("astrocyte", "Bergmann glial cell", "oligodendrocyte", "oligodendrocyte precursor cell",
                        "neural stem cell", "ependymal cell", "Schwann cell")),
    "renal epithelium": ("epithelial", ("proximal tubule cell", "proximal convoluted tubule cell",
                                        "proximal straight tubule cell", "thin descending limb cell",
                                        "thick ascending limb cell", "distal convoluted tubule cell",
                                        "connecting tubule cell", "principal cell", "intercalated cell type A",
                                        "intercalated cell type B", "podocyte")),
    "intestinal epithelium": ("epithelial", ("colonocyte", "immature colonocyte", "BEST4+ colonocyte",
                                             "transit amplifying cell", "intestinal stem cell", "goblet cell",
                                             "enteroendocrine cell", "tuft cell")),
    "hepatic epithelium": ("epithelial", ("hepatocyte", "pericentral hepatocyte", "cholangiocyte")),
    "lung epithelium": ("epithelial", ("alveolar type 1 cell", "alveolar type 2 cell", "ciliated cell", "club cell",
                                       "airway basal cell")),
    "pancreatic islet": ("epithelial", ("alpha cell", "beta cell", "delta cell", "gamma cell", "epsilon cell")),
    "pancreatic exocrine": ("epithelial", ("acinar cell", "ductal cell")),
    "squamous epithelium": ("epithelial", ("basal cell of epidermis", "suprabasal keratinocyte",
                                           "differentiated keratinocyte")),
    "mammary epithelium": ("epithelial", ("basal cell", "luminal epithelial cell", "luminal progenitor cell")),
    "thymic epithelium": ("epithelial", ("thymic epithelial cell",)),
    "trophoblast": ("epithelial", ("villous cytotrophoblast", "syncytiotrophoblast", "extravillous trophoblast")),
})
LINEAGE_OF = MappingProxyType({t: lin for lin, (_, types) in LINEAGES.items() for t in types})
CLASS_OF = MappingProxyType({t: LINEAGES[lin][0] for t, lin in LINEAGE_OF.items()})

# Human symbols of real markers, put into the lineage / class programs when they are one-to-one orthologs.
MARKERS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "immune": ("PTPRC", "CORO1A", "LCP1"),
    "B lymphoid": ("CD19", "MS4A1", "CD79A", "CD79B"),
    "T lymphoid": ("CD3E", "CD3D", "CD2", "LCK"),
    "NK": ("NKG7", "KLRD1"),
    "myeloid": ("CD14", "LYZ", "CSF1R", "TYROBP"),
    "erythroid": ("ALAS2", "KLF1"),
    "endothelial": ("PECAM1", "CDH5", "VWF"),
    "fibroblast": ("COL1A2", "DCN", "PDGFRA"),
    "mural": ("ACTA2", "MYH11", "TAGLN"),
    "cardiac muscle": ("TNNT2", "ACTC1", "MYL4"),
    "skeletal muscle": ("PAX7", "MYOD1", "DES"),
    "neuron": ("SNAP25", "SYT1", "RBFOX3"),
    "glia": ("SOX10", "PLP1", "OLIG2", "GFAP"),
    "epithelial": ("EPCAM", "KRT8", "KRT18"),
    "renal epithelium": ("CDH16", "PAX8", "PAX2"),
    "intestinal epithelium": ("CDX2", "VIL1", "CDH17"),
    "hepatic epithelium": ("ALB", "APOB"),
    "lung epithelium": ("NKX2-1", "SFTPB", "SFTPC"),
    "pancreatic islet": ("CHGA", "NEUROD1"),
    "pancreatic exocrine": ("CPA1",),
    "squamous epithelium": ("KRT14", "TP63"),
    "mammary epithelium": ("ESR1",),
    "thymic epithelium": ("FOXN1",),
    "trophoblast": ("GATA3", "KRT7"),
})
STATES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "cell cycle": ("MKI67", "TOP2A", "CCNB1", "CDK1", "BIRC5", "UBE2C", "CENPF", "TYMS", "PCNA", "MCM2"),
    "interferon response": ("ISG15", "STAT1", "IRF7", "IFI44L"),
    "dissociation stress": ("FOS", "JUN", "EGR1", "DUSP1", "HSP90AA1", "IER2", "ZFP36"),
})
# Known heart-failure genes planted as disease drivers when they are one-to-one orthologs.
HEART_DRIVERS_UP = ("NPPA", "NPPB", "MYH7", "ACTA1", "ANKRD1", "POSTN", "COL1A1", "CCN2", "XIRP2")
HEART_DRIVERS_DOWN = ("ATP2A2", "MYH6", "KCNJ2", "HCN4", "RYR2", "PLN")
_RIBOSOMAL = r"^RP[LS]\d+A?X?$"  # RPL3, RPS27A, RPS4X; not RPL3L or RPS6KA1
HOUSEKEEPING = ("ACTB", "B2M", "EEF1A1", "GAPDH", "TPT1", "FTH1", "FTL", "TMSB10", "MYL6", "UBA52")

# ---------------------------------------------------------------------------------------------------------------
# the organ table (Tables 1 and 2 of the paper, plus the human heart for the perturbation experiment)
# ---------------------------------------------------------------------------------------------------------------

PBMC68K_TYPES = ("CD14+ Monocyte", "CD19+ B", "CD34+", "CD4+/CD25 T Reg", "CD4+/CD45RA+/CD25- Naive T",
                 "CD4+/CD45RO+ Memory", "CD56+ NK", "CD8+ Cytotoxic T", "CD8+/CD45RA+ Naive Cytotoxic", "Dendritic")


@dataclass(frozen=True)
class Organ:
    """One organ of one species and its cell types."""

    species: str
    name: str
    cell_types: tuple[str, ...]
    in_paper: bool = True  # a row of Table 1 / Table 2 (the human heart is not)
    simulated: bool = True  # False: real cells (pbmc68k_reduced)

    @property
    def key(self) -> str:
        return f"{self.species}_{self.name}"

    @property
    def n_types(self) -> int:
        return len(self.cell_types)


_HEART_MOUSE = ("atrial myocyte", "ventricular myocyte", "fibroblast", "myofibroblast", "endothelial cell",
                "endocardial cell", "smooth muscle cell", "pericyte", "macrophage", "B cell", "T cell")
ORGAN_TABLE: tuple[Organ, ...] = (
    Organ("mouse", "Brain", ("astrocyte", "Bergmann glial cell", "oligodendrocyte", "oligodendrocyte precursor cell",
                             "neuron", "interneuron", "medium spiny neuron", "neural stem cell", "ependymal cell",
                             "endothelial cell", "brain pericyte", "microglial cell", "macrophage", "T cell", "B cell")),
    Organ("mouse", HEART, _HEART_MOUSE),
    Organ("mouse", "Kidney", ("proximal convoluted tubule cell", "proximal straight tubule cell",
                              "thin descending limb cell", "thick ascending limb cell", "distal convoluted tubule cell",
                              "connecting tubule cell", "principal cell", "intercalated cell type A",
                              "intercalated cell type B", "podocyte", "mesangial cell", "endothelial cell", "fibroblast",
                              "macrophage", "B cell", "T cell", "NK cell", "neutrophil")),
    Organ("mouse", "Large_intestine", ("colonocyte", "immature colonocyte", "transit amplifying cell",
                                       "intestinal stem cell", "goblet cell", "enteroendocrine cell", "tuft cell")),
    Organ("mouse", "Limb_muscle", ("skeletal muscle satellite cell", "myoblast", "fibro-adipogenic progenitor", "tenocyte",
                                   "endothelial cell", "smooth muscle cell", "Schwann cell", "macrophage", "B cell")),
    Organ("mouse", "Mammary_gland", ("basal cell", "luminal epithelial cell", "luminal progenitor cell", "stromal cell",
                                     "endothelial cell", "macrophage", "T cell")),
    Organ("mouse", "Spleen", ("B cell", "plasma cell", "T cell", "NK cell", "macrophage", "monocyte", "dendritic cell",
                              "plasmacytoid dendritic cell", "neutrophil", "erythroblast")),
    Organ("mouse", "Thymus", ("double negative thymocyte", "double positive thymocyte", "CD4 single positive thymocyte",
                              "CD8 single positive thymocyte", "regulatory T cell", "thymic epithelial cell")),
    Organ("mouse", "Tongue", ("basal cell of epidermis", "suprabasal keratinocyte", "differentiated keratinocyte")),
    Organ("human", "Spleen", ("B cell", "T cell", "NK cell", "macrophage", "dendritic cell", "neutrophil")),
    Organ("human", "Brain", ("astrocyte", "oligodendrocyte", "oligodendrocyte precursor cell", "neuron",
                             "microglial cell", "endothelial cell")),
    Organ("human", IMMUNE, PBMC68K_TYPES, simulated=False),
    Organ("human", "Kidney", ("proximal tubule cell", "thick ascending limb cell", "distal convoluted tubule cell",
                              "connecting tubule cell", "principal cell", "intercalated cell type A",
                              "intercalated cell type B", "podocyte", "mesangial cell", "endothelial cell", "fibroblast",
                              "macrophage", "T cell", "B cell", "NK cell")),
    Organ("human", "Large_intestine", ("colonocyte", "immature colonocyte", "BEST4+ colonocyte", "transit amplifying cell",
                                       "intestinal stem cell", "goblet cell", "enteroendocrine cell", "tuft cell",
                                       "fibroblast", "smooth muscle cell", "endothelial cell", "B cell", "plasma cell",
                                       "T cell", "macrophage", "mast cell")),
    Organ("human", "Liver", ("hepatocyte", "pericentral hepatocyte", "cholangiocyte", "liver sinusoidal endothelial cell",
                             "hepatic stellate cell", "Kupffer cell", "monocyte", "T cell", "NK cell", "B cell",
                             "plasma cell", "erythroblast")),
    Organ("human", "Lung", ("alveolar type 1 cell", "alveolar type 2 cell", "ciliated cell", "club cell",
                            "airway basal cell", "alveolar macrophage", "monocyte", "dendritic cell", "T cell", "B cell",
                            "NK cell", "mast cell", "endothelial cell", "fibroblast", "smooth muscle cell", "pericyte")),
    Organ("human", "Pancreas", ("alpha cell", "beta cell", "delta cell", "gamma cell", "epsilon cell", "acinar cell",
                                "ductal cell", "activated stellate cell", "quiescent stellate cell", "endothelial cell",
                                "macrophage", "mast cell", "T cell", "Schwann cell", "B cell")),
    Organ("human", "Placenta", ("villous cytotrophoblast", "syncytiotrophoblast", "extravillous trophoblast")),
    Organ("human", HEART, ("atrial myocyte", "ventricular myocyte", "fibroblast", "endothelial cell", "endocardial cell",
                           "smooth muscle cell", "pericyte", "macrophage", "T cell"), in_paper=False),
)

ORGANS: Mapping[str, Mapping[str, int]] = MappingProxyType({
    sp_: MappingProxyType({o.name: o.n_types for o in ORGAN_TABLE if o.species == sp_ and o.in_paper})
    for sp_ in ("mouse", "human")
})
"""Species -> organ -> number of cell types, exactly the rows of Tables 1 (mouse) and 2 (human)."""


def organ(species: str, name: str) -> Organ:
    """The :class:`Organ` of ``species`` called ``name``."""
    for o in ORGAN_TABLE:
        if o.species == species and o.name == name:
            return o
    known = ", ".join(o.name for o in ORGAN_TABLE if o.species == species)
    raise KeyError(f"no organ {name!r} for species {species!r}; known: {known}")


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoConfig:
    """Every knob of the simulator; the defaults give ~20k cells in ~10 s on 2 CPU cores."""

    seed: int = 0
    n_genes: int = 4000  # per species
    frac_orthologs: float = 0.85  # share of the genes that are one-to-one orthologs (the shared backbone)
    cells_per_organ: int = 1000
    heart_cells: int = 2000  # per species, disease and normal together
    organ_cells: Mapping[str, int] = field(default_factory=dict)  # per-organ override, keyed "mouse_Brain"
    organs: tuple[str, ...] = ()  # simulate only these organ keys ("human_Spleen", ...); () = all
    include_immune: bool = True  # add pbmc68k_reduced as the human Immune organ
    disease_fraction: float = 0.5  # share of heart cells in the disease state
    # expression model (log2 units)
    base_sd: float = 2.0  # spread of baseline gene abundance
    type_genes: int = 40  # genes per cell-type program
    type_lfc: float = 1.6  # mean log2 fold change of a cell-type program
    p_transition: float = 0.12  # share of cells partway towards a sibling type
    max_transition: float = 0.5  # largest step towards the sibling (0.5 = halfway)
    state_scale: float = 0.5  # mean activity of the cell-state programs
    divergence_sd: float = 0.3  # per-species jitter of a shared program's fold changes
    divergence_drop: float = 0.15  # per-species chance that a program gene is not used
    n_drivers: int = 24  # planted heart-disease drivers on orthologs (half up, half down)
    n_species_drivers: int = 4  # plus species-specific drivers, per species
    # counts
    median_umis: float = 5000.0
    library_sd: float = 0.45  # natural-log sd of the library size
    theta_median: float = 2.5  # negative-binomial dispersion (size) of a typical gene
    min_type_fraction: float = 0.01

    def __post_init__(self):
        if self.n_genes < 1500:
            raise ValueError(f"n_genes={self.n_genes} is too small: the named marker, state and pbmc68k genes need >= 1500")
        if not 0.5 <= self.frac_orthologs < 1:
            raise ValueError(f"frac_orthologs must lie in [0.5, 1), got {self.frac_orthologs}")
        if not 0.005 < self.min_type_fraction < 0.05:
            raise ValueError(f"min_type_fraction must lie in (0.005, 0.05) to pass the paper's 0.5% filter, "
                             f"got {self.min_type_fraction}")
        known = {o.key for o in ORGAN_TABLE}
        unknown = sorted((set(self.organs) | set(self.organ_cells)) - known)
        if unknown:
            raise ValueError(f"unknown organ keys {unknown}; use keys like {sorted(known)[:3]}")

    def n_cells(self, o: Organ) -> int:
        default = self.heart_cells if o.name == HEART else self.cells_per_organ
        return int(self.organ_cells.get(o.key, default))

    def selected(self) -> list[Organ]:
        return [o for o in ORGAN_TABLE if not self.organs or o.key in self.organs]


# ---------------------------------------------------------------------------------------------------------------
# genes and programs (the catalog: everything that does not depend on the cells drawn)
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _Catalog:
    var: dict[str, pd.DataFrame]  # species -> var (index Ensembl id; symbol, ortholog)
    n_shared: int
    base: dict[str, np.ndarray]  # species -> (G,) baseline log2 abundance
    theta: dict[str, np.ndarray]  # species -> (G,) NB size
    effects: dict[tuple[str, str], np.ndarray]  # (species, program name) -> (G,) log2 fold changes
    states: tuple[str, ...]
    size: dict[str, float]  # cell type -> relative library size
    shares: dict[str, np.ndarray]  # organ key -> cell-type proportions
    drivers: dict[str, pd.DataFrame]  # species -> ground-truth driver table


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


@cache
def _gene_pools() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Ortholog pairs, human-only and mouse-only candidates (all in the vocabulary; human genes have medians)."""
    vocab, medians, orth = set(default_vocab().tokens), default_medians("human").values.index, orthologs()
    pairs = orth[orth.human_id.isin(medians) & orth.mouse_id.isin(vocab)].sort_values("human_id").reset_index(drop=True)
    human_sym = {e: s for s, e in symbol_map("human").items()}
    human = pd.DataFrame({"ensembl_id": sorted(set(medians) - set(orth.human_id))})
    human["symbol"] = human.ensembl_id.map(human_sym)
    human = human.dropna()
    mouse_sym = {e: s for s, e in symbol_map("mouse").items()}
    paired = set(orth.mouse_id)
    mouse_ids = sorted(g for g in vocab if g.startswith("ENSMUSG") and g not in paired and g in mouse_sym)
    mouse = pd.DataFrame({"ensembl_id": mouse_ids, "symbol": [mouse_sym[g] for g in mouse_ids]})
    # microRNAs, lincRNAs, olfactory receptors, read-throughs and predicted genes read poorly as cell-type genes
    human["plain"] = ~human.symbol.str.contains(r"^(?:MIR|LINC|SNOR|OR\d|LOC)|-AS\d|-DT$|\w-\w+\d")
    mouse["plain"] = ~mouse.symbol.str.contains(r"^(?:Gm|Mir|Snor|Olfr|Or|Vmn\dr)\d|Rik\d*$|-ps\d*$|os\d?$")
    return pairs, human.reset_index(drop=True), mouse[mouse.plain].reset_index(drop=True)


@cache
def _pbmc68k_raw() -> ad.AnnData:
    import scanpy as sc  # heavy import, only needed here

    return sc.datasets.pbmc68k_reduced()


def _pbmc68k_ids() -> list[str]:
    to_id = symbol_map("human")
    return [to_id[s] for s in _pbmc68k_raw().raw.var_names if s in to_id]


def _select_genes(cfg: DemoConfig, rng: np.random.Generator) -> tuple[dict[str, pd.DataFrame], int]:
    """Backbone of ortholog pairs (named genes first, then random), then species-specific genes."""
    pairs, human_only, mouse_only = _gene_pools()
    n_shared = int(round(cfg.n_genes * cfg.frac_orthologs))
    n_specific = cfg.n_genes - n_shared
    ribosomal = pairs.human_symbol.str.match(_RIBOSOMAL)
    named = set(HOUSEKEEPING) | {g for v in MARKERS.values() for g in v} | {g for v in STATES.values() for g in v}
    named |= set(HEART_DRIVERS_UP) | set(HEART_DRIVERS_DOWN)
    immune = set(_pbmc68k_ids())
    forced = ribosomal | pairs.human_symbol.isin(named) | pairs.human_id.isin(immune)
    if forced.sum() > n_shared:
        raise ValueError(f"n_genes={cfg.n_genes} leaves {n_shared} ortholog genes, fewer than the {forced.sum()} "
                         "named ones; raise n_genes or frac_orthologs")
    rest = np.flatnonzero(~forced.to_numpy())
    pick = np.sort(np.r_[np.flatnonzero(forced.to_numpy()), rng.choice(rest, n_shared - forced.sum(), replace=False)])
    backbone = pairs.iloc[pick].reset_index(drop=True)

    forced_h = human_only.ensembl_id.isin(immune).to_numpy()  # pbmc68k genes stay whatever their name
    rest_h = np.flatnonzero(~forced_h & human_only.plain.to_numpy())
    hs = human_only.iloc[np.sort(np.r_[np.flatnonzero(forced_h), rng.choice(rest_h, n_specific - forced_h.sum(), replace=False)])]
    ms = mouse_only.iloc[np.sort(rng.choice(len(mouse_only), n_specific, replace=False))]

    var = {
        "human": pd.DataFrame({"symbol": np.r_[backbone.human_symbol, hs.symbol],
                               "ortholog": np.r_[backbone.mouse_id, [""] * n_specific]},
                              index=pd.Index(np.r_[backbone.human_id, hs.ensembl_id], name="ensembl_id")),
        "mouse": pd.DataFrame({"symbol": np.r_[backbone.mouse_symbol, ms.symbol],
                               "ortholog": np.r_[backbone.human_id, [""] * n_specific]},
                              index=pd.Index(np.r_[backbone.mouse_id, ms.ensembl_id], name="ensembl_id")),
    }
    return var, n_shared


def _shares(n_types: int, floor: float, rng: np.random.Generator) -> np.ndarray:
    """Uneven cell-type proportions (log-normal weights), none below ``floor``."""
    p = 2.0 ** rng.normal(0, 1.3, n_types)
    p /= p.sum()
    for _ in range(20):  # raising small types shrinks the others; a few rounds settle it
        p = np.maximum(p, floor * 1.05)
        p /= p.sum()
    return p


# the fields that shape genes and programs; the others only change which cells are drawn
_CATALOG_FIELDS = ("seed", "n_genes", "frac_orthologs", "base_sd", "type_genes", "type_lfc", "divergence_sd",
                   "divergence_drop", "n_drivers", "n_species_drivers", "theta_median", "min_type_fraction")


def _catalog(cfg: DemoConfig) -> _Catalog:
    return _catalog_cached(tuple(getattr(cfg, f) for f in _CATALOG_FIELDS))


@cache
def _catalog_cached(key: tuple) -> _Catalog:
    """Genes, baselines, programs, proportions and drivers, drawn in a fixed order from one stream."""
    cfg = DemoConfig(**dict(zip(_CATALOG_FIELDS, key)))
    rng = _rng(cfg.seed, 0)
    var, n_shared = _select_genes(cfg, rng)
    base, theta = _baselines(cfg, var, n_shared, rng)
    effects = _programs(cfg, var, n_shared, rng)
    size = {t: float(2.0 ** rng.normal(0, 0.4)) for t in LINEAGE_OF}
    shares = {o.key: _shares(o.n_types, cfg.min_type_fraction, rng) for o in ORGAN_TABLE}
    drivers = _plant_drivers(cfg, var, n_shared, base, effects, rng)
    return _Catalog(var, n_shared, base, theta, effects, tuple(STATES), size, shares, drivers)


def _baselines(cfg: DemoConfig, var: dict[str, pd.DataFrame], n_shared: int, rng: np.random.Generator):
    """Baseline log2 abundance and NB size per gene: shared by orthologs, with a little species divergence."""
    n_spec = cfg.n_genes - n_shared
    base_shared = rng.normal(0, cfg.base_sd, n_shared)
    symbols = var["human"].symbol.iloc[:n_shared]
    housekeeping = (symbols.str.match(_RIBOSOMAL) | symbols.isin(HOUSEKEEPING)).to_numpy()
    base_shared[housekeeping] = rng.normal(6.0, 0.7, housekeeping.sum())  # ~20% of UMIs, as in real cells
    theta_shared = cfg.theta_median * 2.0 ** rng.normal(0, 1.0, n_shared)
    base, theta = {}, {}
    for s in ("human", "mouse"):
        base[s] = np.r_[base_shared + rng.normal(0, 0.5, n_shared), rng.normal(-0.5, cfg.base_sd, n_spec)]
        theta[s] = np.r_[theta_shared, cfg.theta_median * 2.0 ** rng.normal(0, 1.0, n_spec)]
    return base, theta


def _programs(cfg: DemoConfig, var: dict[str, pd.DataFrame], n_shared: int,
              rng: np.random.Generator) -> dict[tuple[str, str], np.ndarray]:
    """Every program (class, lineage, cell type, organ, cell state) as a dense log2-fold-change vector per species."""
    G, n_spec = cfg.n_genes, cfg.n_genes - n_shared
    index_of = {s: i for i, s in enumerate(var["human"].symbol.iloc[:n_shared])}

    def program(n_up: int, n_down: int, lfc: float, n_own: int, named=()) -> dict[str, np.ndarray]:
        """One shared program seen by each species through its own filter, plus species-specific genes."""
        named_idx = np.array([index_of[g] for g in named if g in index_of], dtype=int)
        genes = np.r_[rng.choice(n_shared, n_up + n_down, replace=False), named_idx]
        fc = np.r_[rng.normal(lfc, 0.3 * lfc, n_up), -rng.normal(0.6 * lfc, 0.2 * lfc, n_down),
                   rng.normal(lfc + 1.5, 0.3, len(named_idx))]  # real markers: strong
        out = {}
        for s in ("human", "mouse"):
            v = np.zeros(G)
            keep = rng.random(len(genes)) >= cfg.divergence_drop
            keep[n_up + n_down:] = True  # real markers hold in both species
            v[genes[keep]] = fc[keep] * 2.0 ** rng.normal(0, cfg.divergence_sd, keep.sum())
            v[n_shared + rng.choice(n_spec, n_own, replace=False)] += rng.normal(lfc, 0.3 * lfc, n_own)
            out[s] = v
        return out

    named_programs = (  # (key, program), in a fixed order so the seed fixes every draw
        [(f"class:{c}", program(150, 50, 2.5, 20, MARKERS.get(c, ())))
         for c in sorted({c for c, _ in LINEAGES.values()})]
        + [(f"lineage:{lin}", program(60, 20, 2.0, 12, MARKERS.get(lin, ()))) for lin in LINEAGES]
        + [(f"type:{t}", program(cfg.type_genes, max(1, cfg.type_genes // 3), cfg.type_lfc, 6)) for t in LINEAGE_OF]
        + [(f"organ:{o}", program(30, 0, 0.8, 5)) for o in sorted({o.name for o in ORGAN_TABLE})]
        + [(f"state:{st}", program(40, 0, 1.5, 3, named)) for st, named in STATES.items()]
    )
    return {(s, key): v for key, per_species in named_programs for s, v in per_species.items()}


def _plant_drivers(cfg: DemoConfig, var: dict[str, pd.DataFrame], n_shared: int, base: dict[str, np.ndarray],
                   effects: dict, rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """Heart-disease drivers: known heart-failure genes first, then random backbone genes, then species-specific ones.

    Drivers get a baseline in the upper quarter of abundances (so they are seen going up or down) and avoid
    markers, state genes and class programs (so they are not confounded with cell identity). Adds
    ``effects[species, "disease"]`` and returns the ground-truth tables.
    """
    symbols = var["human"].symbol.iloc[:n_shared]
    index_of = {s: i for i, s in enumerate(symbols)}
    known = [(g, +1) for g in HEART_DRIVERS_UP] + [(g, -1) for g in HEART_DRIVERS_DOWN]
    known = [(index_of[g], d) for g, d in known if g in index_of][: cfg.n_drivers]
    named = {g for v in MARKERS.values() for g in v} | {g for v in STATES.values() for g in v}
    used = np.zeros(n_shared, dtype=bool)
    used[[i for i, _ in known] + [index_of[g] for g in named if g in index_of]] = True
    used |= (symbols.str.match(_RIBOSOMAL) | symbols.isin(HOUSEKEEPING)).to_numpy()
    for (_, key), v in effects.items():
        if key.startswith("class:"):
            used |= v[:n_shared] != 0
    n_up = max(cfg.n_drivers // 2 - sum(d > 0 for _, d in known), 0)
    n_down = max(cfg.n_drivers - cfg.n_drivers // 2 - sum(d < 0 for _, d in known), 0)
    genes = np.r_[[i for i, _ in known], rng.choice(np.flatnonzero(~used), n_up + n_down, replace=False)].astype(int)
    direction = np.r_[[d for _, d in known], np.ones(n_up), -np.ones(n_down)]
    magnitude = rng.uniform(1.0, 2.0, len(genes))
    lo, hi = np.quantile(base["human"][:n_shared], [0.75, 0.95])
    level = rng.uniform(lo, hi, len(genes))
    drivers = {}
    for s in ("human", "mouse"):
        own = n_shared + rng.choice(cfg.n_genes - n_shared, cfg.n_species_drivers, replace=False)
        base[s][genes] = level + rng.normal(0, 0.2, len(genes))
        base[s][own] = rng.uniform(lo, hi, len(own))
        g_all = np.r_[genes, own]
        d_all = np.r_[direction, np.where(np.arange(len(own)) % 2 == 0, 1.0, -1.0)]
        lfc = d_all * np.r_[magnitude * 2.0 ** rng.normal(0, 0.15, len(genes)), rng.uniform(1.0, 2.0, len(own))]
        effects[s, "disease"] = np.zeros(cfg.n_genes)
        effects[s, "disease"][g_all] = lfc
        drivers[s] = pd.DataFrame({
            "species": s, "ensembl_id": var[s].index[g_all], "symbol": var[s].symbol.to_numpy()[g_all],
            "direction": np.where(d_all > 0, "up", "down"), "log_fold_change": lfc,
        })
    return drivers


# ---------------------------------------------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------------------------------------------

def _type_profile(cat: _Catalog, species: str, organ_name: str, cell_type: str) -> np.ndarray:
    e = cat.effects
    lin = LINEAGE_OF[cell_type]
    return (cat.base[species] + e[species, f"organ:{organ_name}"] + e[species, f"class:{LINEAGES[lin][0]}"]
            + e[species, f"lineage:{lin}"] + e[species, f"type:{cell_type}"])


def _siblings(o: Organ) -> list[np.ndarray]:
    """For each type of the organ, the types a transitional cell may lean towards: same lineage, else same class."""
    out = []
    for t in o.cell_types:
        same_lin = [j for j, u in enumerate(o.cell_types) if u != t and LINEAGE_OF[u] == LINEAGE_OF[t]]
        same_cls = [j for j, u in enumerate(o.cell_types) if u != t and CLASS_OF[u] == CLASS_OF[t]]
        out.append(np.array(same_lin or same_cls or [j for j in range(o.n_types) if o.cell_types[j] != t]))
    return out


def _allocate(n: int, p: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding of n * p to integers summing to n."""
    raw = n * p
    k = np.floor(raw).astype(int)
    k[np.argsort(k - raw)[: n - k.sum()]] += 1
    return k


def _simulate_organ(cfg: DemoConfig, cat: _Catalog, o: Organ, rng: np.random.Generator) -> ad.AnnData:
    """One organ's cells, following the generative model of the module docstring, in one vectorised pass."""
    n = cfg.n_cells(o)
    profiles = np.stack([_type_profile(cat, o.species, o.name, t) for t in o.cell_types])
    label = rng.permutation(np.repeat(np.arange(o.n_types), _allocate(n, cat.shares[o.key])))

    x = profiles[label]
    moving = np.flatnonzero(rng.random(n) < cfg.p_transition)
    sibs = _siblings(o)
    partner = np.array([rng.choice(sibs[label[i]]) for i in moving], dtype=int)
    step = rng.uniform(0, cfg.max_transition, len(moving))
    x[moving] += step[:, None] * (profiles[partner] - profiles[label[moving]])
    activity = rng.exponential(cfg.state_scale, (n, len(cat.states)))
    x += activity @ np.stack([cat.effects[o.species, f"state:{s}"] for s in cat.states])
    disease = np.zeros(n, dtype=bool)
    if o.name == HEART:
        disease[rng.permutation(n)[: int(round(n * cfg.disease_fraction))]] = True
        x[disease] += cat.effects[o.species, "disease"]

    size = np.array([cat.size[t] for t in o.cell_types])[label]
    library = cfg.median_umis * size * np.exp(rng.normal(0, cfg.library_sd, n))
    x -= x.max(axis=1, keepdims=True)
    mu = 2.0 ** x
    mu *= (library / mu.sum(axis=1))[:, None]
    theta = cat.theta[o.species]
    counts = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float32)

    X = sp.csr_matrix(counts)
    obs = pd.DataFrame({
        "organ": o.name, "cell_type": np.asarray(o.cell_types)[label], "species": o.species,
        "disease": np.where(disease, "disease", "normal"), "n_counts": np.asarray(X.sum(axis=1)).ravel(),
        "source": "simulated",
    }, index=[f"{o.key}_{i:05d}" for i in range(n)])
    return ad.AnnData(X, obs=obs, var=cat.var[o.species].copy())


def simulate_atlas(cfg: DemoConfig | None = None, **overrides) -> dict[str, ad.AnnData]:
    """Simulate the demo atlas: one AnnData per species holding all its organs.

    Parameters
    ----------
    cfg
        A :class:`DemoConfig` (defaults when None); keyword ``overrides`` replace its fields,
        e.g. ``simulate_atlas(seed=1, cells_per_organ=300)``.

    Returns
    -------
    ``{"mouse": AnnData, "human": AnnData}`` (only species with a selected organ). Each holds
    ``X``: raw counts, CSR float32 with integer values; ``var``: index Ensembl id, ``symbol``, ``ortholog``
    (the one-to-one partner in the other species, "" for species-specific genes); ``obs``: ``organ``, ``cell_type``,
    ``species``, ``disease`` ("disease" / "normal"), ``n_counts`` (library size), ``source`` ("simulated" or
    "pbmc68k_reduced"); ``uns['disease_drivers']``: the planted heart-disease genes (see :func:`heart_disease_drivers`);
    ``uns['demo']``: the config and a note that the data are synthetic.
    """
    cfg = dataclasses.replace(cfg or DemoConfig(), **overrides)
    cat = _catalog(cfg)
    parts: dict[str, list[ad.AnnData]] = {"mouse": [], "human": []}
    real = {}
    for i, o in enumerate(ORGAN_TABLE):
        if o not in cfg.selected():
            continue
        if o.simulated:
            parts[o.species].append(_simulate_organ(cfg, cat, o, _rng(cfg.seed, 1, i)))
        elif cfg.include_immune:
            immune = pbmc68k_immune()
            parts[o.species].append(_conform(immune, cat.var[o.species]))
            real[o.species] = {"organ": o.name, "source": "scanpy pbmc68k_reduced", **immune.uns["pbmc68k"],
                               "n_genes_kept": int(immune.var_names.isin(cat.var[o.species].index).sum())}
    atlas = {}
    for s, chunks in parts.items():
        if not chunks:
            continue
        a = ad.concat(chunks, join="inner", merge="first")
        a.var = cat.var[s].copy()
        for col in ("organ", "cell_type", "species", "disease", "source"):
            a.obs[col] = a.obs[col].astype("category")
        a.uns["disease_drivers"] = cat.drivers[s].copy()
        a.uns["demo"] = {"config": _config_record(cfg), "note": "synthetic demo atlas from mixgf.demo; not real tissue "
                         "(except the Immune organ, scanpy's pbmc68k_reduced)"}
        if s in real:
            a.uns["demo"]["real_cells"] = real[s]
        atlas[s] = a
    return atlas


def _conform(a: ad.AnnData, var: pd.DataFrame) -> ad.AnnData:
    """Real cells on the simulated gene axis: genes outside it (those without a Geneformer median) are dropped."""
    keep = a.var_names.isin(var.index)
    b = a[:, keep].copy()
    cols = var.index.get_indexer(b.var_names)
    src = sp.csr_matrix(b.X)
    X = sp.csr_matrix((src.data, cols[src.indices], src.indptr), shape=(b.n_obs, len(var)))
    X.sort_indices()
    return ad.AnnData(X, obs=b.obs.copy(), var=var.copy())


def _config_record(cfg: DemoConfig) -> dict:
    rec = dataclasses.asdict(cfg)
    rec["organ_cells"] = dict(cfg.organ_cells)
    rec["organs"] = list(cfg.organs)
    return rec


def heart_disease_drivers(cfg: DemoConfig | None = None, **overrides) -> pd.DataFrame:
    """Ground truth of the heart-disease perturbation check: the planted driver genes of both species.

    Columns: species, ensembl_id, symbol, direction ("up" / "down" in disease), log_fold_change (log2, disease vs
    normal, as planted). Depends only on ``seed`` and the gene / program settings, not on the numbers of cells.
    """
    cat = _catalog(dataclasses.replace(cfg or DemoConfig(), **overrides))
    return pd.concat([cat.drivers["mouse"], cat.drivers["human"]], ignore_index=True)


# ---------------------------------------------------------------------------------------------------------------
# real cells: scanpy's pbmc68k_reduced as the human Immune organ
# ---------------------------------------------------------------------------------------------------------------

def pbmc68k_immune() -> ad.AnnData:
    """scanpy's bundled ``pbmc68k_reduced`` as raw counts with Ensembl ids: the human "Immune" organ.

    The file stores log1p(counts / n_counts * 10,000) for 765 genes; counts are recovered as
    rint(expm1(raw.X) * n_counts / 10,000) and checked to be integers. Symbols are mapped to Ensembl ids with
    :func:`mixgf.vocab.symbol_map`; unmapped symbols are dropped (their number is in ``uns['pbmc68k']``).
    ``obs['n_counts']`` keeps the cell's original library size (over all genes, not only the 765 kept), which is
    what Geneformer's normalisation needs. ``cell_type`` = the FACS label ``bulk_labels``.
    """
    p = _pbmc68k_raw()
    logn = p.raw.X.toarray() if sp.issparse(p.raw.X) else np.asarray(p.raw.X)
    n_counts = p.obs["n_counts"].to_numpy(np.float64)
    exact = np.expm1(logn.astype(np.float64)) * n_counts[:, None] / 1e4
    counts = np.rint(exact)
    off = float(np.abs(exact - counts).max())
    if off > 0.25:
        raise ValueError(f"pbmc68k_reduced: expm1(raw.X) * n_counts / 1e4 is {off:.2f} away from integers; "
                         "the bundled file is not the expected normalisation")
    to_id = symbol_map("human")
    symbols = p.raw.var_names.to_numpy()
    mapped = np.array([s in to_id for s in symbols])
    var = pd.DataFrame({"symbol": symbols[mapped], "ortholog": ""},
                       index=pd.Index([to_id[s] for s in symbols[mapped]], name="ensembl_id"))
    pairs = orthologs().set_index("human_id").mouse_id
    var["ortholog"] = var.index.map(pairs).fillna("").astype(str)
    obs = pd.DataFrame({
        "organ": IMMUNE, "cell_type": p.obs["bulk_labels"].astype(str).to_numpy(), "species": "human",
        "disease": "normal", "n_counts": n_counts, "source": "pbmc68k_reduced",
    }, index=[f"human_{IMMUNE}_{c}" for c in p.obs_names])
    a = ad.AnnData(sp.csr_matrix(counts[:, mapped].astype(np.float32)), obs=obs, var=var)
    a.uns["pbmc68k"] = {"n_genes_file": int(len(symbols)), "n_unmapped": int((~mapped).sum()),
                        "max_rounding": off}
    return a
