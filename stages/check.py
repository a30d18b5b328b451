"""Check a profile before a paper-scale run: params resolve, every input exists in the right format; nothing trains.

    python stages/check.py --profile paper [--gpus 8]

Not a DVC stage: it writes nothing and only reads params.yaml and the files under profiles.<profile>.inputs. It
builds the model and optimisation configs from the resolved parameters (so a typo in an override fails here, not
after hours of tokenizing), then checks each input with mixgf.check: the two corpora (Geneformer-format
save_to_disk datasets with input_ids and length, in their own vocabularies), the pickled dictionaries, every organ
file of Tables 1-2 (raw counts, obs cell_type) and the heart files (obs disease = disease / normal). Every problem is
listed, with its file and fix; the exit status is 1 if there is any.
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from common import ROOT, WHERE, load_params

from mixgf.check import PaperInputs, Problem, check_paper_inputs
from mixgf.classify import FinetuneConfig
from mixgf.model import PRESETS
from mixgf.pretrain import PretrainConfig

SOURCES = WHERE | {"mouse_medians": "mouse_gene_median_dictionary.pkl from MPRG/Mouse-Genecorpus-20M"}


def check_config(p: dict, where: str) -> list[Problem]:
    """The configs the stages build from these parameters, built here with a stand-in vocabulary."""
    problems = []
    meta = {"vocab": {"name": "check", "hash": "check", "size": 2}, "medians": {}, "max_len": p["tokenize"]["max_len"]}
    simcse = {f"simcse_{k}": v for k, v in p["simcse"].items() if k in ("loss", "tau", "weight")}
    simcse |= {k: v for k, v in p["simcse"].items() if k in ("pooling", "gather_negatives")}
    builds = {"model": lambda: PRESETS[p["model"]["preset"]](meta, **simcse, **p["model"]["overrides"]),
              "pretrain": lambda: PretrainConfig(**p["pretrain"], seed=p["seed"]),
              "finetune": lambda: FinetuneConfig(**p["finetune"], seed=p["seed"])}
    for section, build in builds.items():
        try:
            build()
        except (KeyError, TypeError, ValueError) as err:
            problems.append(Problem(section, where, f"{section}: {type(err).__name__}: {err}",
                                    f"fix the {section} keys of params.yaml or of its profile"))
    for species in ("human", "mouse"):
        choice = str(p["medians"][species])
        if choice == "computed":
            problems.append(Problem(f"{species}_medians", where, f"medians.{species} is 'computed', but this profile "
                                    "has no pretraining cells to compute them from (the corpora come tokenized)",
                                    f"set medians.{species} to the corpus's median dictionary (.pkl or .tsv)"))
        elif choice == "bundled" and species == "mouse":
            problems.append(Problem("mouse_medians", where, "medians.mouse is 'bundled', but no mouse medians are bundled",
                                    "set medians.mouse to Mouse-Geneformer's mouse_gene_median_dictionary.pkl"))
    for name, baseline in p["baselines"].items():
        if baseline.get("checkpoint") and not (ROOT / baseline["checkpoint"]).exists():
            problems.append(Problem(f"baselines.{name}.checkpoint", str(ROOT / baseline["checkpoint"]), "no such folder",
                                    "point it at a Hugging Face BertForMaskedLM folder, or set it to null to train"))
    return problems


def inputs_of(p: dict) -> tuple[PaperInputs | None, list[Problem]]:
    inputs = p.get("inputs") or {}
    keys = ("genecorpus_30m", "mouse_genecorpus_20m", "mouse_token_dictionary", "organs", "heart")
    unset = [Problem(k, "params.yaml", f"profiles.{p['profile']}.inputs.{k} is not set", f"set it to {WHERE[k]}")
             for k in keys if not inputs.get(k)]
    if unset:
        return None, unset
    medians = {s: str(p["medians"][s]) for s in ("human", "mouse")}
    path = {s: None if medians[s] in ("bundled", "computed") else ROOT / medians[s] for s in medians}
    return PaperInputs(**{k: ROOT / inputs[k] for k in keys}, mouse_medians=path["mouse"],
                       human_medians=path["human"]), []


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--gpus", type=int, default=8, help="processes of the planned run (for the step count)")
    parser.add_argument("--sample", type=int, default=1000, help="rows of each corpus checked")
    args = parser.parse_args(argv)
    p = load_params(args.params, args.profile)
    problems = check_config(p, str(args.params))
    paths, unset = inputs_of(p)
    problems += unset
    result = check_paper_inputs(paths, max_len=p["tokenize"]["max_len"], sources=SOURCES, sample=args.sample) if paths else None
    problems += result.problems if result else []
    names = {"mouse_medians": "medians.mouse", "human_medians": "medians.human"} | {k: f"inputs.{k}" for k in WHERE}
    problems = [replace(q, key=names.get(q.key, q.key)) for q in problems]
    if problems:
        sys.exit(f"profile {args.profile}: {len(problems)} problem(s); nothing was trained or written:\n"
                 + "\n".join(q.line() for q in problems))
    s = result.summary
    cells = s["genecorpus_30m_cells"] + s["mouse_genecorpus_20m_cells"]
    steps = -(-cells // (args.gpus * p["pretrain"]["batch_size"])) * p["pretrain"]["epochs"]
    print(f"profile {args.profile}: OK. Genecorpus-30M {s['genecorpus_30m_cells']:,} cells, Mouse-Genecorpus-20M "
          f"{s['mouse_genecorpus_20m_cells']:,} cells, unified vocabulary {s['vocab_size']:,} tokens, "
          f"{s['organ_files']} organ files and 2 heart files; Mix-GF pretraining on {args.gpus} processes x "
          f"{p['pretrain']['batch_size']} cells: {steps:,} optimizer steps ({p['pretrain']['epochs']} epochs)")


if __name__ == "__main__":
    main()
