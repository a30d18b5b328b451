"""What every stage shares: the resolved parameters of the active profile.

``params.yaml`` holds the demo values at the top level and, under ``profiles.<name>``, what another profile
changes. ``profile: paper`` (or ``dvc exp run -S profile=paper``) switches scale with one key; any top-level key
can still be set on its own (``-S simcse.tau=0.1``), and applies unless the active profile overrides it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_params(path: str | Path = ROOT / "params.yaml") -> dict:
    """params.yaml with the active profile's overrides applied."""
    params = yaml.safe_load(Path(path).read_text())
    profiles = params.pop("profiles", {}) or {}
    name = params.get("profile", "demo")
    if name != "demo" and name not in profiles:
        sys.exit(f"params.yaml: unknown profile {name!r}; choose demo or one of: {', '.join(profiles)}")
    return _merge(params, profiles.get(name, {}))
