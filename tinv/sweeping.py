"""Which sweep a job belongs to: its folder's name and its identity inside a multirun (what a finished sweep says
is tinv.report's; the resumable Optuna sweeper lives in hydra_plugins/tinv_sweeper)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

# A job folder's name keeps what reads safely everywhere (a path, a shell, a URL, another OS): letters, digits and
# . , = + ~ @ -. Quotes and escapes go; anything else (`/` above all, which would nest the folder) becomes `_`.
_QUOTING = re.compile(r"['\"\\]")
_UNSAFE_IN_NAME = re.compile(r"[^\w.,=+~@-]+")
NAME_BYTES = 200  # file systems allow 255 bytes a name; room left for Hydra's and wandb's own suffixes


def job_folder_name(num, overrides: str) -> str:
    """A sweep job's folder: `<job number>_<its overrides>`, always one flat name whatever the values hold (a path,
    `=`, `,`, spaces, quotes). Deterministic, so a sweep started again finds its jobs' folders; a name too long is
    cut and ends in a digest of the whole. The number alone keeps names unique within a sweep."""
    readable = _UNSAFE_IN_NAME.sub("_", _QUOTING.sub("", str(overrides))).strip("_")
    name = f"{num}_{readable}"
    if len(name.encode()) > NAME_BYTES:
        digest = hashlib.sha256(str(overrides).encode()).hexdigest()[:10]
        name = name.encode()[:NAME_BYTES - len(digest) - 1].decode(errors="ignore").rstrip("_") + f"-{digest}"
    return name


def sweep_identity() -> dict:
    """Inside a multirun job: the sweep's name (the sweep= choice, or "multirun"), its folder, and this job's
    number and overrides. Empty outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return {}
    sweep_dir = Path(hc.sweep.dir)
    name = hc.runtime.choices.get("sweep") or "multirun"
    return {"sweep": name, "group": f"{name}-{sweep_dir.parent.name}-{sweep_dir.name}", "sweep_dir": str(sweep_dir),
            "job_num": hc.job.num, "job_name": hc.job.override_dirname or f"job{hc.job.num}",
            "overrides": list(hc.overrides.task)}
