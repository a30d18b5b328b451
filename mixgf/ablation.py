"""Ablations: every configuration that `dvc exp show --json` lists, reduced to the numbers the ablation report draws.

`dvc exp show --json` nests the workspace, the baseline commit and each experiment with its params and metrics files.
`configurations` flattens that into one record per configuration, `varied` finds the params that differ between the
finished ones, and `tidy` takes from each the Mix-GF numbers of ``MEASURES``: one row per configuration and measure.
Pure functions of the parsed JSON, so the report is testable on a captured `dvc exp show --json`.
"""

from __future__ import annotations

import math

import pandas as pd

# measure: (metrics file, key of the estimate, keys of its 95% interval or None, unit). The files are the pipeline's
# (dvc.yaml); an experiment older than one of them gets NaN, not an error. %: accuracy, points: paired difference.
MEASURES = {
    "pretraining loss (last logged)": ("logs/pretrain/mixgf/metrics.json", "loss", None, "loss"),
    **{f"held-out MLM gain, {s} (nats)": (
        "metrics/pretrain/mixgf.json", f"{s}.gain", (f"{s}.gain_low", f"{s}.gain_high"), "nats")
       for s in ("human", "mouse")},
    **{f"Table {n} ({s}): Mix-GF mean accuracy": (
        f"metrics/compare/{s}.json", "summary.mixgf.mean_accuracy", ("summary.mixgf.low", "summary.mixgf.high"), "%")
       for n, s in ((1, "mouse"), (2, "human"))},
    **{f"Table {n} ({s}): Mix-GF − {baseline}": (
        f"metrics/compare/{s}.json", "summary.mixgf_minus_baseline.mean_difference",
        ("summary.mixgf_minus_baseline.low", "summary.mixgf_minus_baseline.high"), "points")
       for n, s, baseline in ((1, "mouse", "Mouse-Geneformer"), (2, "human", "Geneformer"))},
    **{f"cross-species {s} → {t}, {name}": (
        "metrics/cross_species.json", f"{s}_to_{t}.mixgf.{how}.accuracy",
        (f"{s}_to_{t}.mixgf.{how}.accuracy_low", f"{s}_to_{t}.mixgf.{how}.accuracy_high"), "%")
       for s, t in (("mouse", "human"), ("human", "mouse")) for how, name in (("classifier", "classifier"),
                                                                               ("knn", "k-NN"))},
    **{f"cross-species {s} → {t}, ortholog logistic regression": (  # the bar a foundation model must clear
        "metrics/cross_species.json", f"{s}_to_{t}.ortholog_logreg.accuracy",
        (f"{s}_to_{t}.ortholog_logreg.accuracy_low", f"{s}_to_{t}.ortholog_logreg.accuracy_high"), "%")
       for s, t in (("mouse", "human"), ("human", "mouse"))},
}


def configurations(exp_show: list) -> list[dict]:
    """One record per entry of `dvc exp show --json`: ``name``, ``rev``, ``kind`` (workspace, baseline or
    experiment), ``state`` (success, queued, running, failed; the workspace and baselines count as success when
    DVC read them without error), ``params`` (params.yaml flattened to dotted keys) and ``metrics`` (file -> data)."""
    records = []
    for entry in exp_show:
        kind = "workspace" if entry["rev"] == "workspace" else "baseline"
        records.append(_record(entry, kind, "failed" if entry.get("error") else "success"))
        for exp in entry.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state") or "success"
            records.append(_record(exp["revs"][0], "experiment", state, exp.get("name")))
    return records


def _record(entry: dict, kind: str, state: str, name: str | None = None) -> dict:
    data = entry.get("data") or {}
    params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
    metrics = {path: m.get("data", {}) for path, m in (data.get("metrics") or {}).items()}
    return {"name": name or entry.get("name") or entry["rev"][:7], "rev": entry["rev"], "kind": kind, "state": state,
            "params": _flatten(params), "metrics": metrics}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def finished(records: list[dict]) -> list[dict]:
    """The configurations with results: succeeded, and the workspace only when it is not a copy of another (`dvc exp
    run` without --temp or --queue leaves its experiment's params and metrics in the workspace)."""
    done = [r for r in records if r["state"] == "success"]
    others = [r for r in done if r["kind"] != "workspace"]
    return [r for r in done if r["kind"] != "workspace"
            or not any(r["params"] == o["params"] and r["metrics"] == o["metrics"] for o in others)]


def varied(records: list[dict]) -> list[str]:
    """The params (dotted keys) that take more than one value across ``records``, in params.yaml's order."""
    keys = dict.fromkeys(k for r in records for k in r["params"])
    return [k for k in keys if len({repr(r["params"].get(k)) for r in records}) > 1]


def overridden_by_profile(params: dict, key: str) -> bool:
    """Whether the active profile sets ``key`` itself, so that changing its top-level value changes nothing
    (stages/common.py applies ``profiles.<profile>`` over the top level)."""
    return f"profiles.{params.get('profile', 'demo')}.{key}" in params


def tidy(records: list[dict], params: list[str]) -> pd.DataFrame:
    """One row per configuration and measure of ``MEASURES``: name, rev, kind, the ``params`` (one column each),
    measure, unit, estimate, low, high (NaN where a file or interval is missing)."""
    rows = []
    for r in records:
        for measure, (path, key, interval, unit) in MEASURES.items():
            data = r["metrics"].get(path, {})
            low, high = (_get(data, k) for k in interval) if interval else (math.nan, math.nan)
            rows.append({"name": r["name"], "rev": r["rev"], "kind": r["kind"],
                         **{p: r["params"].get(p) for p in params},
                         "measure": measure, "unit": unit, "estimate": _get(data, key), "low": low, "high": high})
    return pd.DataFrame(rows)


def _get(data: dict, dotted: str) -> float:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return math.nan
        data = data[part]
    return float(data) if isinstance(data, (int, float)) else math.nan


def prepare(exp_show: list) -> dict:
    """What the ablation notebook reads: the finished configurations' measures (``rows``, from `tidy`), the varied
    params, those the active profile overrides, the reference configuration (the baseline commit) and the
    configurations left out because they have no results yet (queued, running) or failed."""
    records = configurations(exp_show)
    done = finished(records)
    params = varied(done)
    reference = next((r for r in done if r["kind"] == "baseline"), done[0]) if done else None
    rows = tidy(done, params)
    return {"profile": reference["params"].get("profile", "demo") if reference else "demo",
            "reference": reference["name"] if reference else None, "varied": params,
            "overridden": [p for p in params if overridden_by_profile(reference["params"], p)],
            "left_out": [{"name": r["name"], "state": r["state"]} for r in records if r["state"] != "success"],
            "rows": rows.astype(object).where(rows.notna(), None).to_dict("records")}


def effect(frame: pd.DataFrame, param: str, params: list[str], reference: str) -> tuple[pd.DataFrame, dict]:
    """A one-at-a-time ablation of ``param`` even when several params varied: of the groups of configurations that
    share every other varied param's value, the one with the most values of ``param`` (on ties, ``reference``'s
    group), ordered by ``param``; and those other params' values in it."""
    others = [p for p in params if p != param]
    group = frame[others].apply(lambda row: repr(list(row)), axis=1) if others else pd.Series("", index=frame.index)
    ref = group[frame["name"] == reference].iloc[0]
    best = max(group.unique(), key=lambda g: (frame.loc[group == g, param].map(repr).nunique(), g == ref))
    rows = frame[group == best]
    rows = rows.iloc[sorted(range(len(rows)), key=lambda i: _order(rows[param].iloc[i]))]
    return rows, {p: rows[p].iloc[0] for p in others}


def _order(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def table(rows: pd.DataFrame, params: list[str]) -> pd.DataFrame:
    """One line per configuration of ``rows`` (from `tidy`): the ``params``, its name, then every measure with its
    interval (accuracies and differences in %, gains in nats, "n/a" where missing)."""
    text = rows.assign(text=rows.apply(formatted, axis=1)).pivot(index="name", columns="measure", values="text")
    first = rows.drop_duplicates("name").set_index("name", drop=False)
    keys = first[[*params, "name"]].rename(columns={"name": "configuration"})
    return keys.join(text[list(MEASURES)]).reset_index(drop=True)


def formatted(row: pd.Series) -> str:
    """A measure as the tables write it."""
    e, low, high = row["estimate"], row["low"], row["high"]
    if pd.isna(e):
        return "n/a"
    if row["unit"] == "loss":
        return f"{e:.3f}"
    scale, fmt = (1, "+.3f") if row["unit"] == "nats" else (100, "+.1f" if row["unit"] == "points" else ".1f")
    interval = "" if pd.isna(low) else f" [{scale * low:{fmt}}, {scale * high:{fmt}}]"
    return f"{scale * e:{fmt}}{interval}"
