"""Check the inputs of a paper-scale run before any work: paths, formats, columns and vocabularies, without training.

Every check returns a list of :class:`Problem` (the file, what is wrong, how to fix it); an empty list means the
input is usable. The checks call the readers the pipeline itself runs — :func:`mixgf.perturb.load_cells` for
Geneformer-format corpora, :func:`mixgf.vocab.load_pickle_dict` for the dictionaries, and the tokenizer's own
per-file validation (counts, gene ids, obs columns) for the organ and heart files — so an input that passes here is
read the same way by the stages. Only metadata and a sample of rows are read: a check of the full paper inputs takes
seconds, not a pass over 48.7 M cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mixgf.demo import ORGANS
from mixgf.readers import InputError
from mixgf.vocab import (ENSEMBL_PREFIX, GeneVocab, Medians, default_medians, geneformer_v1_vocab, load_pickle_dict,
                         unified_vocab)

GOAL, START = "normal", "disease"  # the heart files' obs 'disease' states the perturbation stages use


@dataclass(frozen=True)
class Problem:
    """One unusable input: ``key`` names it (e.g. ``genecorpus_30m``), ``path`` the file, then what and how to fix."""

    key: str
    path: str
    problem: str
    fix: str

    def line(self) -> str:
        return f"{self.key}: {self.path}: {self.problem}\n    fix: {self.fix}"


@dataclass(frozen=True)
class PaperInputs:
    """The files a paper-scale run reads (SPEC §9); ``mouse_medians`` None means computed, which the paper lacks."""

    genecorpus_30m: Path
    mouse_genecorpus_20m: Path
    mouse_token_dictionary: Path
    mouse_medians: Path | None
    organs: Path
    heart: Path
    human_medians: Path | None = None  # None: Geneformer V1's, bundled


@dataclass
class CheckResult:
    problems: list[Problem] = field(default_factory=list)
    summary: dict = field(default_factory=dict)  # what was found: cells per corpus, vocabulary size, files

    @property
    def ok(self) -> bool:
        return not self.problems


def check_token_dictionary(path: Path, *, key: str, species: str = "mouse", source: str = "") -> tuple[GeneVocab | None, list[Problem]]:
    """A Geneformer-style ``{gene: id}`` pickle (read safely): ids 0..n-1, ``<pad>`` = 0, ``<mask>`` = 1, genes of
    ``species``. Returns the vocabulary it defines (None if unusable)."""
    fix = f"use the original file{f' ({source})' if source else ''}"
    if not Path(path).exists():
        return None, [Problem(key, str(path), "no such file", f"download it{f' ({source})' if source else ''}")]
    try:
        tokens = load_pickle_dict(path)
        vocab = GeneVocab.from_token_dict(tokens, name=Path(path).stem)
    except (OSError, ValueError) as err:
        return None, [Problem(key, str(path), f"not a usable token dictionary: {err}", fix)]
    problems = []
    if vocab.tokens[:2] != ("<pad>", "<mask>"):
        problems.append(Problem(key, str(path), f"ids 0 and 1 are {vocab.tokens[:2]}, not ('<pad>', '<mask>')", fix))
    genes = [t for t in vocab.tokens[2:]]
    share = np.mean([g.startswith(ENSEMBL_PREFIX[species]) for g in genes]) if genes else 0.0
    if share < 0.9:
        problems.append(Problem(key, str(path), f"only {share:.0%} of its {len(genes):,} genes are {species} Ensembl ids "
                                f"({ENSEMBL_PREFIX[species]}...)", f"give the {species} token dictionary; {fix}"))
    return (vocab if not problems else None), problems


def check_medians(path: Path | None, *, key: str, species: str, source: str = "") -> tuple[Medians | None, list[Problem]]:
    """Gene medians of ``species``: a Geneformer-style pickle or a TSV (ensembl_id, median); all positive.
    ``path`` None means the bundled ones (human only)."""
    if path is None:
        try:
            return default_medians(species), []
        except FileNotFoundError as err:
            return None, [Problem(key, "(computed)", f"no {species} medians: {err}",
                                  f"give Mouse-Geneformer's mouse_gene_median_dictionary.pkl{f' ({source})' if source else ''}")]
    fix = f"use the original file{f' ({source})' if source else ''}, or a TSV with columns ensembl_id, median"
    if not Path(path).exists():
        return None, [Problem(key, str(path), "no such file", fix)]
    try:
        if Path(path).suffix == ".pkl":
            medians = Medians(pd.Series(load_pickle_dict(path), dtype="float64"), name=Path(path).stem)
        else:
            medians = Medians.read(path)
    except (OSError, ValueError) as err:
        return None, [Problem(key, str(path), f"not a usable median dictionary: {err}", fix)]
    values = medians.values
    if not len(values) or not (values > 0).all():
        bad = values.index[~(values > 0)][:1].tolist()
        return None, [Problem(key, str(path), f"medians must be positive and present (e.g. {bad})", fix)]
    if np.mean(values.index.str.startswith(ENSEMBL_PREFIX[species])) < 0.9:
        return None, [Problem(key, str(path), f"its genes are not {species} Ensembl ids (e.g. {values.index[0]})", fix)]
    return medians, []


def check_token_corpus(path: Path, vocab: GeneVocab, *, key: str, max_len: int, source: str = "",
                       sample: int = 1000) -> tuple[int | None, list[Problem]]:
    """A pretraining corpus: a mixgf token dataset, or a Geneformer-format ``save_to_disk`` folder with
    ``input_ids`` and ``length`` made with ``vocab``. Checks ``sample`` evenly spaced rows: ids inside the
    vocabulary, ``length`` equal to the number of ids, at most ``max_len`` genes. Returns the number of cells."""
    from mixgf.perturb import load_cells

    get = f"download it{f' ({source})' if source else ''}"
    if not Path(path).exists():
        return None, [Problem(key, str(path), "no such folder", f"{get}, or point the path at where it is")]
    try:
        dataset, meta = load_cells(path, vocab)
    except (FileNotFoundError, ValueError) as err:
        return None, [Problem(key, str(path), f"not a Geneformer-format token dataset: {err}",
                              f"give the folder that `datasets.load_from_disk` opens (with state.json and *.arrow); {get}")]
    problems = []
    if meta["vocab"]["hash"] != vocab.hash:
        problems.append(Problem(key, str(path), f"was tokenized with vocabulary {meta['vocab']['name']!r}, not "
                                f"{vocab.name!r}", "give the corpus made with this dictionary, or retokenize it"))
    n = len(dataset)
    if n == 0:
        return 0, problems + [Problem(key, str(path), "holds no cells", get)]
    rows = np.unique(np.linspace(0, n - 1, min(n, sample)).astype(np.int64))
    table = dataset.select(rows).with_format("arrow")[:]  # the selected rows only; writes no cache beside the data
    offsets = table.column("input_ids").combine_chunks().offsets.to_numpy()
    ids = table.column("input_ids").combine_chunks().flatten().to_numpy()
    counts, lengths = np.diff(offsets), table.column("length").to_numpy()
    if ids.size and (ids.min() < 0 or ids.max() >= len(vocab)):
        problems.append(Problem(key, str(path), f"token ids reach {int(ids.max())}, outside the {len(vocab):,}-token "
                                f"vocabulary {vocab.name!r}", "give the token dictionary that made this corpus"))
    if not np.array_equal(counts, lengths):
        bad = int(rows[np.flatnonzero(counts != lengths)[0]])
        problems.append(Problem(key, str(path), f"row {bad}: 'length' is not the number of input_ids",
                                "recompute the length column (len(input_ids)) or download the corpus again"))
    if counts.size and counts.max() > max_len:
        problems.append(Problem(key, str(path), f"cells hold up to {int(counts.max())} genes, more than "
                                f"tokenize.max_len = {max_len}", f"use the {max_len}-token version, or raise max_len"))
    return n, problems


def check_cells(path: Path, species: str, vocab: GeneVocab, medians: Medians, *, key: str, needs: str,
                states: tuple[str, ...] = ()) -> list[Problem]:
    """An organ or heart file as the ``atlas`` and ``tokenize`` stages read it: raw integer counts in X, gene ids
    that map to ``vocab`` (the tokenizer's own checks on the first 256 cells), an obs column ``needs`` with at least
    two values, and every one of ``states`` among them."""
    from mixgf.tokenize import _plan_file  # the tokenizer's per-file validation, without tokenizing

    if not Path(path).exists():
        return [Problem(key, str(path), "no such file",
                        f"write the {species} cells there as .h5ad (raw counts in X, obs '{needs}')")]
    try:
        *_, obs = _plan_file(path, species, vocab, medians, max_len=2048, obs_keys=(needs,), counts="X",
                             gene_column=None, normalized=False, sum_duplicates=False, min_mapped=0.25, threads=1)
    except (InputError, OSError) as err:
        return [Problem(key, str(path), str(err).removeprefix(f"{path}: "),
                        "rewrite the file with raw integer counts in X and Ensembl ids (var['ensembl_id'] or the index)")]
    values = set(obs[needs].astype(str))
    problems = []
    if len(values) < 2:
        problems.append(Problem(key, str(path), f"obs '{needs}' has one value only ({', '.join(values)})",
                                f"label the cells' {needs.replace('_', ' ')} in obs '{needs}'"))
    missing = [s for s in states if s not in values]
    if missing:
        problems.append(Problem(key, str(path), f"obs '{needs}' lacks the state(s) {', '.join(map(repr, missing))}; its "
                                f"values are {', '.join(sorted(values)[:6])}",
                                f"relabel obs '{needs}' to {START!r} / {GOAL!r} (e.g. Geneformer's human_dcm_hcm_nf: "
                                "nf -> normal, dcm and hcm -> disease)"))
    return problems


def check_paper_inputs(inputs: PaperInputs, *, max_len: int = 2048, sources: dict | None = None,
                       sample: int = 1000) -> CheckResult:
    """Every input of a paper-scale run, each problem listed (nothing stops at the first). ``sources`` maps each
    field of :class:`PaperInputs` to where users get it, for the messages."""
    src = sources or {}
    result = CheckResult()
    mouse_tokens, problems = check_token_dictionary(inputs.mouse_token_dictionary, key="mouse_token_dictionary",
                                                    source=src.get("mouse_token_dictionary", ""))
    result.problems += problems
    medians = {}
    for species, path in (("human", inputs.human_medians), ("mouse", inputs.mouse_medians)):
        medians[species], problems = check_medians(path, key=f"{species}_medians", species=species,
                                                   source=src.get(f"{species}_medians", ""))
        result.problems += problems
    for key, vocab in (("genecorpus_30m", geneformer_v1_vocab()), ("mouse_genecorpus_20m", mouse_tokens)):
        path = getattr(inputs, key)
        if vocab is None and not Path(path).exists():
            result.problems.append(Problem(key, str(path), "no such folder", f"download it ({src.get(key, '')})"))
            continue
        if vocab is None:
            result.problems.append(Problem(key, str(path), "not checked: its token dictionary is unusable (above)",
                                           "fix the mouse token dictionary first"))
            continue
        n, problems = check_token_corpus(path, vocab, key=key, max_len=max_len, source=src.get(key, ""), sample=sample)
        result.problems += problems
        result.summary[f"{key}_cells"] = n
    human = geneformer_v1_vocab()
    vocab = human if mouse_tokens is None else unified_vocab(human, mouse_tokens.tokens[2:])
    result.summary["vocab_size"] = len(vocab)
    files = {species: [(Path(inputs.organs) / f"{species}_{organ}.h5ad", "organs", "cell_type", ()) for organ in organs]
             + [(Path(inputs.heart) / f"{species}_heart.h5ad", "heart", "disease", (START, GOAL))]
             for species, organs in ORGANS.items()}
    for key, folder in (("organs", inputs.organs), ("heart", inputs.heart)):
        if not Path(folder).is_dir():
            names = [f.name for group in files.values() for f, k, *_ in group if k == key]
            result.problems.append(Problem(key, str(folder), f"no such folder; it must hold {', '.join(names)}",
                                           f"put the raw-count .h5ad files there ({src.get(key, '')})"))
    for species, group in files.items():
        usable = medians[species] is not None and (species == "human" or mouse_tokens is not None)
        for path, key, needs, states in group:
            if not Path(path.parent).is_dir():
                continue  # reported once above
            if usable:
                result.problems += check_cells(path, species, vocab, medians[species], key=key, needs=needs, states=states)
            elif not path.exists():  # the dictionary or medians problem is above; still name every missing file
                result.problems += check_cells(path, species, vocab, None, key=key, needs=needs)
    result.summary["organ_files"] = sum(len(o) for o in ORGANS.values())
    return result
