"""tinv's cache folder ($TINV_CACHE, default ~/.cache/tinv) and the folders written into it once: generated models,
the toy model, the demo images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .atomic import new_folder


def cache_root() -> Path:
    return Path(os.environ.get("TINV_CACHE", "~/.cache/tinv")).expanduser()


def cached_folder(path: Path, fill: Callable[[Path], None], done_when: str | None = None) -> Path:
    """`path`, filled by `fill(staging folder)` the first time it is asked for. The folder appears whole or not at
    all (staged beside it, then renamed), so parallel jobs that race to write it all end with the same complete
    folder. `done_when` names a file inside that marks it complete (default: the folder exists)."""
    def ready() -> bool:
        return (path / done_when).exists() if done_when else path.is_dir()

    if not ready():
        try:
            with new_folder(path) as staging:
                fill(staging)
        except (FileExistsError, OSError):
            if not ready():  # not a parallel job that finished it first
                raise
    return path
