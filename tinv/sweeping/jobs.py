"""Which sweep a job belongs to (its folder's name, its identity inside a multirun), and a job that would repeat an
earlier one exactly, which gives that one's result instead of training again."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ..atomic import write_text_atomic
from ..console import number

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


def settings_digest(cfg: DictConfig) -> str:
    """What a run trains, as a digest: the resolved config without the keys its parts do not read (lora.* under
    method=ti), so two sweep jobs that differ only there have the same digest."""
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if "lora" not in plain.get("parts", {}):
        plain.pop("lora", None)
        for key in ("lora_format", "lora_bundle"):
            plain.get("save", {}).pop(key, None)
    plain.pop("resume", None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def same_as_earlier_job(cfg: DictConfig, job_dir: Path) -> dict | None:
    """In a sweep: the summary of a finished earlier job whose run this one would repeat exactly, else None."""
    sweep = sweep_identity()
    digest = settings_digest(cfg)
    for summary_file in sorted(Path(sweep["sweep_dir"]).glob("*/summary.json")):
        if summary_file.parent.resolve() == job_dir.resolve():
            continue
        summary = json.loads(summary_file.read_text())
        if summary.get("ok") and summary.get("settings") == digest:
            return {**summary, "same_as": summary_file.parent.name}
    return None


def reuse(earlier: dict, job_dir: Path) -> dict:
    """This job's summary.json: the earlier job's result under this job's number and overrides."""
    sweep = sweep_identity()
    summary = {**earlier, "job_num": sweep["job_num"], "overrides": sweep["overrides"]}
    job_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(job_dir / "summary.json", json.dumps(summary, indent=2))
    print(f"tinv-train: job {sweep['job_num']} would repeat job {earlier['same_as']} exactly (the keys it varies "
          f"are not read by this run's parts); its result: {earlier['objective_name']} = "
          f"{number(earlier['objective'])}", flush=True)
    return summary
