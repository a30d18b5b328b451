"""The ablation report on a real `dvc exp show --json` (tests/data/ablation: a tiny-profile simcse.tau sweep)."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mixgf import ablation

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exp_show(test_data) -> list:
    return json.loads((test_data / "ablation" / "exp_show.json").read_text())


def _experiment(exp_show: list, name: str) -> dict:
    return next(x["revs"][0]["data"] for x in exp_show[1]["experiments"] if x["name"] == name)


def test_varied_params_and_values_of_the_finished_configurations(exp_show):
    data = ablation.prepare(exp_show)
    assert data["varied"] == ["simcse.tau", "simcse.weight"] and data["reference"] == "master"
    assert data["profile"] == "tiny" and data["overridden"] == []
    assert data["left_out"] == [{"name": "beady-kefs", "state": "queued"}]  # queued, not started: no results yet
    frame = pd.DataFrame(data["rows"])
    names = set(frame["name"])  # the workspace holds `dvc exp run`'s gamic-aces: counted once
    assert names == {"master", "shier-kine", "moody-loir", "epoxy-daws", "gamic-aces", "rummy-nims"}
    tau = frame.drop_duplicates("name").set_index("name")["simcse.tau"]
    assert tau["shier-kine"] == 0.02 and tau["master"] == 0.05 and tau["epoxy-daws"] == 0.1


def test_numbers_come_from_the_right_files(exp_show):
    frame = pd.DataFrame(ablation.prepare(exp_show)["rows"]).set_index(["name", "measure"])
    m = _experiment(exp_show, "shier-kine")["metrics"]
    row = frame.loc[("shier-kine", "pretraining loss (last logged)")]
    assert row["estimate"] == m["logs/pretrain/mixgf/metrics.json"]["data"]["loss"]
    gain = m["metrics/pretrain/mixgf.json"]["data"]["mouse"]
    row = frame.loc[("shier-kine", "held-out MLM gain, mouse (nats)")]
    assert (row["estimate"], row["low"], row["high"]) == (gain["gain"], gain["gain_low"], gain["gain_high"])
    summary = m["metrics/compare/human.json"]["data"]["summary"]
    mean = frame.loc[("shier-kine", "Table 2 (human): Mix-GF mean accuracy")]
    assert mean["estimate"] == summary["mixgf"]["mean_accuracy"]
    assert (frame.loc[("shier-kine", "Table 2 (human): Mix-GF − Geneformer")]["low"]
            == summary["mixgf_minus_baseline"]["low"])
    cross = m["metrics/cross_species.json"]["data"]["human_to_mouse"]["mixgf"]["knn"]
    assert frame.loc[("shier-kine", "cross-species human → mouse, k-NN")]["high"] == cross["accuracy_high"]


def test_effect_holds_the_other_varied_params_fixed(exp_show):
    data = ablation.prepare(exp_show)
    frame = pd.DataFrame(data["rows"])
    rows, fixed = ablation.effect(frame, "simcse.weight", data["varied"], data["reference"])
    # rummy-nims was queued from a workspace that `dvc exp run -S simcse.tau=0.1` had left at tau 0.1
    assert fixed == {"simcse.tau": 0.1} and list(rows.drop_duplicates("name")["simcse.weight"]) == [0.5, 1.0, 1.0]
    table = ablation.table(rows, ["simcse.weight"])
    assert list(table.columns[:2]) == ["simcse.weight", "configuration"] and len(table) == 3


def test_an_experiment_without_a_metrics_file_gets_na(exp_show):
    old = json.loads(json.dumps(exp_show[:2]))  # workspace and baseline: one configuration
    del old[1]["data"]["metrics"]["metrics/pretrain/mixgf.json"]
    old[1]["experiments"] = None
    old[0] = old[1] | {"rev": "workspace", "name": None}
    data = ablation.prepare(old)
    assert data["varied"] == [] and {r["name"] for r in data["rows"]} == {"master"}
    table = ablation.table(pd.DataFrame(data["rows"]), [])
    assert table.loc[0, "held-out MLM gain, human (nats)"] == "n/a"


def test_the_report_writes_a_table_per_varied_param(exp_show, tmp_path):
    run = subprocess.run([sys.executable, "stages/ablation.py", "--exp-show", "tests/data/ablation/exp_show.json",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    text = (tmp_path / "ablation.md").read_text()
    assert text.startswith("# Ablations") and "**Demo data.**" in text
    tau = text.split("## `simcse.tau`")[1].split("## ")[0]
    assert [line.split(" | ")[1] for line in tau.splitlines() if line.startswith("| 0.")] == [
        "shier-kine", "master", "moody-loir", "epoxy-daws", "gamic-aces"]
    shier = next(line for line in tau.splitlines() if "shier-kine" in line)
    gain = _experiment(exp_show, "shier-kine")["metrics"]["metrics/pretrain/mixgf.json"]["data"]["human"]
    assert f"{gain['gain']:+.3f} [{gain['gain_low']:+.3f}, {gain['gain_high']:+.3f}]" in shier
    assert "## `simcse.weight`" in text and "`beady-kefs` (queued)" in text
    assert all((tmp_path / f"ablation_simcse.{p}.png").stat().st_size > 0 for p in ("tau", "weight"))


def test_the_report_says_when_there_is_only_one_configuration(exp_show, tmp_path):
    baseline = {**exp_show[1], "experiments": None}
    one = [baseline | {"rev": "workspace", "name": None}, baseline]  # a fresh clone after `dvc repro`
    (tmp_path / "one.json").write_text(json.dumps(one))
    run = subprocess.run([sys.executable, "stages/ablation.py", "--exp-show", str(tmp_path / "one.json"),
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Only one configuration" in (tmp_path / "ablation.md").read_text()
