"""Room on disk for what a run will write, checked before the latents are encoded and the first step runs: a full
disk is a one-line error at the start rather than a failed write hours in.

The estimate is an upper bound built from the config and the trained parameters: every file set the run saves
(end, best, save.every_n_steps), the resumable state (twice while a new one replaces the old), previews, metrics
and, with train.cache_latents_to_disk, the latent cache.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from .errors import ConfigError

MARGIN = 1.1  # the estimate leaves this much room over itself
SLACK = 2 * 2**20  # and this: logs, summaries, Hydra's own files


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def planned_writes(run, cfg) -> dict[str, dict[str, int]]:
    """{folder: {what: bytes}} that this run will write at most."""
    params = sum(p.numel() * 4 for p in run.parameters())  # saved in fp32 at most
    steps = run.max_steps - run.step
    saves = 1 + ("best" in cfg.callbacks) + (steps // cfg.save.every_n_steps if cfg.save.every_n_steps else 0)
    previews = (steps // cfg.sample.every_n_steps if cfg.sample.every_n_steps else 0) + bool(cfg.sample.at_start)
    prompts = cfg.sample.prompts
    per_preview = len(prompts) if OmegaConf.is_list(prompts) else 4  # a prompts file: a handful
    width = cfg.sample.width or _side(cfg.model.resolution, 0)
    height = cfg.sample.height or _side(cfg.model.resolution, 1)
    run_dir = {
        "files": saves * 2 * params + saves * 65536,  # x2: a LoRA's bundle repeats it; headers and metadata
        "state": 2 * 3 * params + 65536,  # parameters and two optimizer moments, old and new during the swap
        "previews": previews * 2 * max(per_preview, 1) * width * height * 3,  # images and their grid, as raw RGB
        "metrics": (steps // max(cfg.train.log_every_n_steps, 1) + 1) * 512,
    }
    plan = {str(run.run_dir): run_dir}
    subsets = run.dataset.subsets if cfg.train.cache_latents_to_disk else []
    if subsets and not any(s.random_crop or s.color_aug for s in subsets):  # changing pixels are never cached
        from .cache import cache_root

        channels = run.backbone.vae.config.latent_channels
        flips = 2 if any(sub.flip_aug for sub in subsets) else 1
        latents = sum(flips * channels * (s.bucket[0] // 8) * (s.bucket[1] // 8) * 4 + 4096
                      for s in run.dataset.samples)
        plan.setdefault(cfg.data.cache_dir or str(cache_root() / "latents"), {})["latent cache"] = latents
    return plan


def _side(resolution, index: int) -> int:
    if isinstance(resolution, int):
        return resolution
    return int(list(resolution)[index])


def _existing(path: Path) -> Path:
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_room(plan: dict[str, dict[str, int]]) -> None:
    """ConfigError naming the folder, its free space and what the run would write there, if it does not fit."""
    devices: dict[int, tuple[Path, int, list[str]]] = {}
    for folder, parts in plan.items():
        root = _existing(Path(folder))
        device = os.stat(root).st_dev
        where, need, names = devices.get(device, (Path(folder), 0, []))
        devices[device] = (where, need + sum(parts.values()), names + [f"{k} {human(v)}" for k, v in parts.items()])
    for device, (where, need, names) in devices.items():
        free = shutil.disk_usage(_existing(where)).free
        if free < need * MARGIN + SLACK:
            raise ConfigError(f"not enough disk space: {where} has {human(free)} free and this run writes up to "
                              f"{human(need * MARGIN + SLACK)} there ({', '.join(names)}); free some space, write "
                              "elsewhere (hydra.run.dir=..., data.cache_dir=...), or save less "
                              "(save.every_n_steps, sample.every_n_steps)")
