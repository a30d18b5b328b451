"""reports/README.md: one row per table and figure — what it shows, the profile it came from, this run's headline
numbers and the paper's beside them (never in their place).

The profile of each report is read from the report itself (the notice every report starts with, mixgf.report), so
the index also shows a report that was left from another run or that lacks the notice.
"""

from __future__ import annotations

import re

import pandas as pd

from mixgf.paper import MODEL_NAMES, TABLES
from mixgf.report import markdown, notice, pct, with_interval

EXPERIMENTS = ("mouse_delete", "human_overexpress_mouse_tuned", "human_overexpress_human_tuned")
PAPER_TABLE3 = ("mouse, delete: ALDOB 0.011 (p 1.56e-2), ALDH3B2 0.011 (p 9.03e-3); "
                "human, overexpress (mouse-tuned): MTRNR2L11 0.202 (p 0.0), NAP1L6 0.035 (p 1.66e-3)")
PAPER_FIG4 = "mean shift about 0.43 (human-tuned) and 0.05 (mouse-tuned)"
PAPER_FIG2 = "UMAPs judged by eye ('clusters separate to a degree'); no numbers"


def report_profile(text: str, head: int = 5) -> str:
    """The data a report says it came from, from its first ``head`` lines: ``demo`` (the demo and tiny profiles
    share one notice), the real profile's name, or ``not stated``."""
    top = "\n".join(text.splitlines()[:head])
    if "**Demo data.**" in top:
        return "demo"
    real = re.search(r"\*\*Real data\*\* \(profile `([^`]+)`\)", top)
    return real.group(1) if real else "not stated"


def _mean(compare: dict, model: str) -> str:
    s = compare["summary"][model]
    return with_interval(s["mean_accuracy"], s["low"], s["high"])


def _table_row(name: str, compare: dict) -> dict:
    species, baseline = compare["species"], compare["baseline"]
    d = compare["summary"]["mixgf_minus_baseline"]
    paper = TABLES[species].values()
    return {"shows": f"cell-type accuracy on {compare['summary']['n_organs']} {species} organs: {MODEL_NAMES[baseline]} "
                     "vs Mix-GF, random init and logistic regression controls, paired tests",
            "ours": f"mean of organs {MODEL_NAMES[baseline]} {_mean(compare, baseline)} → Mix-GF {_mean(compare, 'mixgf')}; "
                    f"difference {with_interval(d['mean_difference'], d['low'], d['high'], signed=True)} points "
                    f"(Wilcoxon p {d['wilcoxon_p']:.2g}); logistic regression {_mean(compare, 'logreg')}",
            "paper": f"mean of organs {sum(v[1] for v in paper) / len(paper):.1f} → {sum(v[2] for v in paper) / len(paper):.1f}"}


def _fig2_row(cross: dict) -> dict:
    parts = []
    for direction, result in cross.items():
        m, lr = result["mixgf"], result["ortholog_logreg"]
        parts.append(f"{direction.replace('_', ' ')}: Mix-GF classifier {pct(m['classifier']['accuracy'])}%, k-NN "
                     f"{pct(m['knn']['accuracy'])}%, ortholog logistic regression {pct(lr['accuracy'])}%")
    return {"shows": "cross-species: fine-tuned on one species' spleen, tested and embedded (UMAP) on the other's",
            "ours": "; ".join(parts), "paper": PAPER_FIG2}


def _table3_row(perturb: dict) -> dict:
    parts = [f"{e}: {m['n_significant']} of {m['n_genes']} genes at FDR < 0.05, top {m['top_gene']}"
             for e, m in perturb.items()]
    return {"shows": "in silico perturbation of heart disease cells toward normal: top genes, p-values, FDR, "
                     "recall of planted drivers (demo)", "ours": "; ".join(parts), "paper": PAPER_TABLE3}


def _fig4_row(perturb: dict) -> dict:
    parts = [f"{e} {m['mean_shift']:.3f}" for e, m in perturb.items()]
    return {"shows": "UMAP of perturbed cells before / after and the goal cells; distribution of mean shifts",
            "ours": "mean shift " + ", ".join(parts), "paper": PAPER_FIG4}


def index_table(texts: dict[str, str], *, compare: dict[str, dict], cross: dict, perturb: dict[str, dict]) -> pd.DataFrame:
    """One row per report. ``texts``: report file name (table1.md, ...) -> its Markdown; ``compare``: species ->
    stage compare's JSON; ``cross``: stage cross_species's JSON; ``perturb``: experiment -> stage perturb's JSON."""
    rows = {"table1.md": _table_row("Table 1", compare["mouse"]), "table2.md": _table_row("Table 2", compare["human"]),
            "fig2.md": _fig2_row(cross), "table3.md": _table3_row(perturb), "fig4.md": _fig4_row(perturb)}
    figures = {"fig2.md": ["fig2_mouse_to_human.png", "fig2_human_to_mouse.png"], "fig4.md": ["fig4_perturbation.png"]}
    out = []
    for name, row in rows.items():
        files = " ".join(f"[{f}]({f})" for f in [name, *figures.get(name, [])])
        out.append({"report": files, "shows": row["shows"], "data": report_profile(texts[name]),
                    "ours (this run)": row["ours"], "paper": row["paper"]})
    return pd.DataFrame(out)


def index_markdown(table: pd.DataFrame, profile: str, notebooks: list[str]) -> str:
    """The whole of reports/README.md: title, the demo / real notice, the table, the executed notebooks."""
    stale = sorted(set(table["data"]) - {"demo" if profile in ("demo", "tiny") else profile})
    warning = ([f"**Warning:** some reports do not say they come from this run's data ({', '.join(stale)}); "
                "rerun `dvc repro` before reading them.", ""] if stale else [])
    return "\n".join([
        "# Reports: every table and figure", "", notice(profile), "", *warning,
        f"Written by `dvc repro report_index` (profile `{profile}`) from the stages' metrics and the reports below; "
        "*data* is what each report says at its top it came from. The *paper* column quotes the published numbers "
        "(SPEC §5–7) for reference; accuracies are % with 95% bootstrap intervals.", "",
        markdown(table),
        "Executed notebooks (papermill, outputs included): " + ", ".join(f"[{n}]({n})" for n in notebooks) + ".", "",
    ])
