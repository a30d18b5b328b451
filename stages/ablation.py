"""The ablation report: every DVC experiment of this repository and, per varied parameter, its effect on Mix-GF.

Runs `dvc exp show --json` (the workspace, the baseline commit and every experiment on it; queued, running and
failed ones are named as left out), writes what the report reads to <out>/ablation.json and runs
notebooks/ablation.ipynb with papermill (executed copy: <out>/ablation.ipynb), which writes <out>/ablation.md and
<out>/ablation_<param>.png. Not a DVC stage: a stage cannot depend on the experiments around it.

    python stages/ablation.py [--out reports] [--exp-show saved.json]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import papermill

from common import ROOT

from mixgf.ablation import prepare
from mixgf.io import write_json_atomic


def exp_show(repo: Path) -> list:
    run = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo, capture_output=True,
                         text=True)
    if run.returncode != 0:
        sys.exit(f"`dvc exp show --json` failed in {repo}:\n{run.stderr}")
    return json.loads(run.stdout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    parser.add_argument("--exp-show", type=Path, help="a saved `dvc exp show --json` instead of running it")
    args = parser.parse_args(argv)
    data = prepare(json.loads(args.exp_show.read_text()) if args.exp_show else exp_show(ROOT))
    out = args.out.resolve()
    write_json_atomic(out / "ablation.json", data)
    tmp = out / ".ablation.tmp.ipynb"
    papermill.execute_notebook(ROOT / "notebooks" / "ablation.ipynb", tmp, parameters={  # paths as the repository's
        "ablation": os.path.relpath(out / "ablation.json", ROOT), "out": os.path.relpath(out, ROOT)}, cwd=ROOT,
        progress_bar=False)
    os.replace(tmp, out / "ablation.ipynb")
    print(f"{len(data['varied'])} varied parameter(s) ({', '.join(data['varied']) or 'none'}) over "
          f"{len({r['name'] for r in data['rows']})} configuration(s) -> {out / 'ablation.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
