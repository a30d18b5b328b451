"""reports/README.md (mixgf.report_index): the profile each report states at its top, and the index's rows."""

import json
from pathlib import Path

from mixgf.report import notice
from mixgf.report_index import EXPERIMENTS, index_markdown, index_table, report_profile

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("table1.md", "table2.md", "fig2.md", "table3.md", "fig4.md")


def _metrics(name: str) -> dict:
    return json.loads((ROOT / "metrics" / name).read_text())


def _index(texts: dict):
    return index_table(texts, compare={s: _metrics(f"compare/{s}.json") for s in ("mouse", "human")},
                       cross=_metrics("cross_species.json"),
                       perturb={e: _metrics(f"perturb/{e}.json") for e in EXPERIMENTS})


def test_the_profile_is_read_from_the_notice_at_the_top():
    assert report_profile(f"# Table 1\n\n{notice('demo')}\n") == "demo"
    assert report_profile(f"# Table 1\n\n{notice('tiny')}\n") == "demo"
    assert report_profile(f"# Table 1\n\n{notice('paper')}\n") == "paper"
    assert report_profile("# Table 1\n\nno notice here\n" + "\n" * 10 + notice("demo")) == "not stated"


def test_the_index_has_a_row_per_report_with_ours_beside_the_papers():
    texts = {n: f"# {n}\n\n{notice('paper')}\n" for n in NAMES}
    table = _index(texts)
    assert len(table) == 5 and set(table["data"]) == {"paper"}
    table1 = table.iloc[0]
    assert "table1.md" in table1["report"] and "Mouse-Geneformer" in table1["ours (this run)"]
    assert table1["paper"] == "mean of organs 96.9 → 97.3"
    assert "ALDOB 0.011" in table.iloc[3]["paper"] and "0.43" in table.iloc[4]["paper"]
    text = index_markdown(table, "paper", ["table1_mouse.ipynb"])
    assert text.splitlines()[2] == notice("paper") and "Warning" not in text


def test_a_report_from_other_data_or_without_a_notice_is_flagged():
    texts = {n: f"# {n}\n\n{notice('demo')}\n" for n in NAMES} | {"fig4.md": "# Figure 4\n\nno notice\n"}
    text = index_markdown(_index(texts), "demo", [])
    assert "**Warning:**" in text and "not stated" in text
