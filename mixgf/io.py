"""Outputs appear whole or not at all: write to a temporary sibling, then rename."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a fresh temporary directory next to ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` atomically; gzip-compressed (without a timestamp, so reproducible) if the name ends in .gz."""
    data = text.encode()
    write_bytes_atomic(path, gzip.compress(data, mtime=0) if str(path).endswith(".gz") else data)


def write_json_atomic(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON through a temporary file and a rename."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path):
    with open(path) as fh:
        return json.load(fh)
