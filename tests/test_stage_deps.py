"""dvc.yaml declares, for every stage, each mixgf module its script runs: editing one reruns what it affects."""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (lazy imports run too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from mixgf import tokens`
    return names


def source_files(script: Path) -> set[str]:
    """The stage script and every project file it runs, transitively: stages/common.py, mixgf/*.py and, for
    modules that read the bundled vocabulary files, mixgf/resources."""
    todo, seen = [script], set()
    while todo:
        path = todo.pop()
        rel = path.relative_to(ROOT).as_posix()
        if rel in seen:
            continue
        seen.add(rel)
        for name in imports(path):
            if name == "common":
                todo.append(ROOT / "stages" / "common.py")
            elif name.startswith("mixgf.") and (ROOT / (name.replace(".", "/") + ".py")).exists():
                todo.append(ROOT / (name.replace(".", "/") + ".py"))
        if "_resource(" in path.read_text() or "resources" in {n.split(".")[-1] for n in imports(path)}:
            seen.add("mixgf/resources")
    return seen


def test_the_package_init_runs_no_project_code():
    """Importing any mixgf module runs mixgf/__init__.py; it holds only a docstring and the version, so the stages
    need not depend on it."""
    assert not [n for n in imports(ROOT / "mixgf" / "__init__.py")]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_every_module_it_runs(name):
    stage = STAGES[name].get("do", STAGES[name])
    script = next(word for word in stage["cmd"].split() if word.startswith("stages/"))
    needed = source_files(ROOT / script)
    missing = sorted(needed - set(stage["deps"]))
    assert not missing, f"stage {name} runs {missing} but does not list them in its deps"
    unused = sorted(d for d in stage["deps"] if d.startswith(("mixgf/", "stages/")) and d not in needed)
    assert not unused, f"stage {name} depends on {unused}, which its script never runs"
