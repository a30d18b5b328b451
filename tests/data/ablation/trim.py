"""Trim a real `dvc exp show --json` to what tests/test_ablation.py reads: python trim.py full.json > exp_show.json.

exp_show.json came from a tiny-profile copy of the repository (`dvc repro`, commit, then `dvc exp run -S
simcse.tau=0.1`, `dvc exp run --queue -S simcse.tau=0.02,0.05,0.1`, `dvc exp run --queue -S simcse.weight=0.5`,
`dvc queue start`, and one more queued and not started, `dvc exp run --queue -S simcse.pooling=mean`).
"""

import json
import sys

PARAMS = ("profile", "seed", "simcse", "pretrain", "profiles")
METRICS = ("logs/pretrain/mixgf/metrics.json", "metrics/pretrain/mixgf.json", "metrics/compare/mouse.json",
           "metrics/compare/human.json", "metrics/cross_species.json")


def trim_data(data: dict) -> dict:
    params = data["params"]["params.yaml"]["data"]
    metrics = data.get("metrics") or {}
    kept = {path: metrics[path] for path in METRICS if path in metrics}
    for path in ("metrics/compare/mouse.json", "metrics/compare/human.json"):  # the summary, not every organ
        if path in kept:
            kept[path] = {"data": {k: kept[path]["data"][k] for k in ("species", "baseline", "summary")}}
    return {"rev": data["rev"], "params": {"params.yaml": {"data": {k: params[k] for k in PARAMS if k in params}}},
            "metrics": kept}


def trim(entry: dict) -> dict:
    out = {**entry, "data": trim_data(entry["data"]) if entry.get("data") else entry.get("data")}
    if entry.get("experiments"):
        out["experiments"] = [{**x, "executor": x["executor"] and {"state": x["executor"]["state"]},
                               "revs": [trim(r) for r in x["revs"]]} for x in entry["experiments"]]
    return out


if __name__ == "__main__":
    json.dump([trim(e) for e in json.load(open(sys.argv[1]))], sys.stdout, indent=1)
    sys.stdout.write("\n")
