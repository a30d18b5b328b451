"""dvc.yaml declares, for every stage, each mixgf module its script runs: editing one reruns what it affects."""

import ast
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def code(path: Path) -> str:
    """A script's source; for a notebook, its code cells (magics and shell lines dropped)."""
    if path.suffix != ".ipynb":
        return path.read_text()
    cells = [c["source"] for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    lines = ("".join(c) if isinstance(c, list) else c for c in cells)
    return "\n".join(l for cell in lines for l in cell.splitlines() if not l.lstrip().startswith(("%", "!")))


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (lazy imports run too)."""
    names = set()
    for node in ast.walk(ast.parse(code(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from mixgf import tokens`
    return names


def source_files(script: Path) -> set[str]:
    """The stage script (or notebook) and every project file it runs, transitively: the stages' shared modules
    (stages/common.py, ...), mixgf/*.py and, for modules that read the bundled vocabulary files, mixgf/resources."""
    todo, seen = [script], set()
    while todo:
        path = todo.pop()
        rel = path.relative_to(ROOT).as_posix()
        if rel in seen:
            continue
        seen.add(rel)
        for name in imports(path):
            if (ROOT / "stages" / f"{name}.py").exists():
                todo.append(ROOT / "stages" / f"{name}.py")
            elif name.startswith("mixgf.") and (ROOT / (name.replace(".", "/") + ".py")).exists():
                todo.append(ROOT / (name.replace(".", "/") + ".py"))
        if "_resource(" in code(path) or "resources" in {n.split(".")[-1] for n in imports(path)}:
            seen.add("mixgf/resources")
    return seen


def test_the_package_init_runs_no_project_code():
    """Importing any mixgf module runs mixgf/__init__.py; it holds only a docstring and the version, so the stages
    need not depend on it."""
    assert not [n for n in imports(ROOT / "mixgf" / "__init__.py")]


def expanded(name: str) -> list[dict]:
    """The stage's cmd and deps once per foreach / matrix entry, with ``${key}`` and ``${item...}`` filled in."""
    stage = STAGES[name].get("do", STAGES[name])
    loop = STAGES[name].get("foreach") or [{}]
    entries = loop.items() if isinstance(loop, dict) else ((str(i), i) for i in loop)
    out = []
    for key, item in entries:
        def fill(text: str) -> str:
            text = text.replace("${key}", key)
            for k, v in (item.items() if isinstance(item, dict) else [("", item)]):
                text = text.replace(f"${{item.{k}}}" if k else "${item}", str(v))
            return text
        out.append({"cmd": fill(stage["cmd"]), "deps": [fill(d) for d in stage["deps"]]})
    return out


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_every_module_it_runs(name):
    for stage in expanded(name):
        check_stage(name, stage)


def check_stage(name: str, stage: dict) -> None:
    script = next(word for word in stage["cmd"].split() if word.startswith(("stages/", "notebooks/")))
    needed = source_files(ROOT / script)
    missing = sorted(needed - set(stage["deps"]))
    assert not missing, f"stage {name} runs {missing} but does not list them in its deps"
    unused = sorted(d for d in stage["deps"] if d.startswith(("mixgf/", "stages/", "notebooks/")) and d not in needed)
    assert not unused, f"stage {name} depends on {unused}, which its script never runs"
