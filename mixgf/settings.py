"""Package-wide knobs, in one place (as ``scanpy.settings``): threads and progress bars."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Settings:
    """``n_threads``: threads a process may use for its own parallel loops (default: the usable cores);
    ``progress``: show progress bars (tqdm) on interactive terminals."""

    n_threads: int = field(default_factory=_usable_cores)
    progress: bool = True

    def __post_init__(self):
        if self.n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {self.n_threads}")


settings = Settings()
