"""What every stage shares: the resolved parameters of the active profile.

``params.yaml`` holds the demo values at the top level and, under ``profiles.<name>``, what another profile
changes. ``profile: paper`` (or ``dvc exp run -S profile=paper``) switches scale with one key; any top-level key
can still be set on its own (``-S simcse.tau=0.1``), and applies unless the active profile overrides it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# dvc's log is a file: no per-load weight bars, and no load reports whose keys the README explains ("Loading
# elsewhere"; tests/test_model.py checks them). Set before any stage imports transformers.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_params(path: str | Path = ROOT / "params.yaml", profile: str | None = None) -> dict:
    """params.yaml with the overrides of ``profile`` (default: the active one, params ``profile``) applied."""
    params = yaml.safe_load(Path(path).read_text())
    profiles = params.pop("profiles", {}) or {}
    name = profile or params.get("profile", "demo")
    if name != "demo" and name not in profiles:
        sys.exit(f"{path}: unknown profile {name!r}; choose demo or one of: {', '.join(profiles)}")
    return _merge(params, profiles.get(name, {})) | {"profile": name}


WHERE = {  # what a paper-profile input is and where users get it (README, "Paper profile")
    "genecorpus_30m": "Genecorpus-30M tokenized with the V1 dictionary: Hugging Face dataset ctheodoris/Genecorpus-30M",
    "mouse_genecorpus_20m": "Mouse-Genecorpus-20M: Hugging Face dataset MPRG/Mouse-Genecorpus-20M",
    "mouse_token_dictionary": "MLM-re_token_dictionary_v1.pkl from MPRG/Mouse-Genecorpus-20M",
    "organs": "a folder of <species>_<Organ>.h5ad raw-count files with obs['cell_type'] (Tables 1-2)",
    "heart": "a folder with human_heart.h5ad and mouse_heart.h5ad, obs['disease'] = disease / normal",
}


def require_inputs(params: dict, *keys: str) -> dict[str, Path]:
    """The paper profile's input paths; one error naming every missing path and where to get it."""
    inputs = params.get("inputs", {})
    paths = {k: ROOT / inputs.get(k, f"<inputs.{k} not set>") for k in keys}
    missing = [f"  inputs.{k}: {p} -- {WHERE[k]}" for k, p in paths.items() if not p.exists()]
    if missing:
        sys.exit("the paper profile needs these inputs, which are missing (nothing is downloaded for you):\n"
                 + "\n".join(missing))
    return paths
