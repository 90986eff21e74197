"""A run's folder has one owner at a time.

A run holds an exclusive lock on `<run dir>/.tinv-lock` from before it writes anything there until its files are
closed. The lock is the kernel's (flock): it goes when the process ends, however it ends, so a killed run never keeps
its folder, and it works across machines on shared storage that supports locks (NFSv4, Lustre, GPFS). Another run
in that folder, a second resume of it, or `resume=latest` meeting it finds it held and says who holds it. Within one
process the lock is re-entrant: the command line takes it before Hydra writes, the run takes it again.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError

LOCK_NAME = ".tinv-lock"
# what a run leaves in its folder: a folder holding any of these holds a run, which a new one must not overwrite
RUN_FILES = ("state", "summary.json", "metrics.jsonl", ".hydra")

_held: dict[Path, list] = {}  # folder -> [open lock file, how many holds]


def holder(folder: Path) -> str | None:
    """Who holds `folder` ("pid 123 on host, since 12:00:01"), or None when no other process does."""
    folder = Path(folder).resolve()
    if folder in _held or not (folder / LOCK_NAME).is_file():
        return None
    try:
        with open(folder / LOCK_NAME, "r+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "another process"
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


def hold(folder: Path, what: str = "hydra.run.dir") -> None:
    """Take `folder` for this process (made if missing); a ConfigError naming the holder if another process has it.
    `what` names the setting that chose the folder, for that message."""
    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder][1] += 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / LOCK_NAME, "a+")
    for _ in range(5):  # holder() elsewhere takes the lock for an instant to look: try again shortly
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(0.05)
    else:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise in_use(folder, what, owner)
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    _held[folder] = [lock, 1]


def in_use(folder: Path, what: str, owner: str) -> ConfigError:
    return ConfigError(f"{what}={Path(folder).resolve()} is in use by another tinv run ({owner}); wait for it to end "
                       "or stop it (Ctrl-C saves its work), or give another folder")


def let_go(folder: Path) -> None:
    """Undo one hold(); the last one gives the folder up."""
    folder = Path(folder).resolve()
    entry = _held.get(folder)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[folder]
        entry[0].close()  # closing the file gives up the lock


@contextmanager
def owned(folder: Path, what: str = "hydra.run.dir"):
    hold(folder, what)
    try:
        yield Path(folder)
    finally:
        let_go(folder)


def holds_a_run(folder: Path) -> bool:
    """Whether `folder` holds a run's files (its state, summary, metrics, Hydra's record, or an embedding)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return any((folder / name).exists() for name in RUN_FILES) or any(folder.glob("*.safetensors")) or \
        any(folder.glob("*.pt"))
