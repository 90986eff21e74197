"""`tinv-bench`: time real training steps and the irreducible work inside them.

    tinv-bench model=sd15_shape data.resolution=256 train.batch_size=1 bench.steps=10
    tinv-bench model=tiny_sdxl train.mixed_precision=bf16

Takes every `tinv-train` override plus `bench.steps` / `bench.warmup`. Steps run through the real trainer
(`Trainer.step`). The floor is the work no trainer can avoid on the same shapes and dtype: one micro-batch's loss
(text encoders and UNet) forward and backward, from a batch already in memory; overhead = step time / floor time.
Results print as a table and go to bench.json in the run dir.
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .. import config as _config  # noqa: F401 - schemas and resolvers
from ..atomic import write_text_atomic
from ..commandline import CONF, command_line, import_from_cwd
from ..errors import ConfigError, refuse
from ..run import open_run
from ..tracking import Tracker
from ..train import prepare
from .machine_bench import main as machine_main

log = logging.getLogger("tinv.bench")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TimedBatches:
    """Wraps the run's batch iterator and adds up the time spent waiting for data."""

    def __init__(self, batches):
        self.batches, self.wait = batches, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.batches)
        self.wait += time.perf_counter() - start
        return batch


class _InMemory:
    """Latents already computed: what the floor measurement trains from."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    def of(self, batch: dict) -> torch.Tensor:
        return self.latents


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return peak_kb * (1 if sys.platform == "darwin" else 1024)


def measure(job, steps: int, warmup: int) -> dict:
    run, trainer = open_run(job), job.trainer
    acc, bb = run.accelerator, run.backbone
    device = acc.device
    # the floor's input: a batch already in memory, its latents too (no VAE work even when they are not cached)
    batch = next(run.batches())
    in_memory = replace(run, latents=_InMemory(run.latents.of(batch)))
    params = run.parameters()

    def floor_once() -> float:
        """One micro-batch's loss (prompts encoded, text encoders, UNet), forward and backward, nothing else."""
        _sync(device)
        start = time.perf_counter()
        trainer.micro_batch_loss(in_memory, batch).backward()
        _sync(device)
        elapsed = time.perf_counter() - start
        for p in params:
            p.grad = None
        return elapsed

    batches = _TimedBatches(run.batches())
    for _ in range(warmup):
        trainer.step(run, batches)
        floor_once()
    _sync(device)
    batches.wait, vae_before = 0.0, bb.vae_calls
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, floor = [], []
    for _ in range(steps):  # interleaved, so both see the same machine state (caches, clocks, allocator)
        start = time.perf_counter()
        trainer.step(run, batches)
        _sync(device)
        times.append(time.perf_counter() - start)
        floor.append(floor_once())
    data_wait, vae_calls = batches.wait, bb.vae_calls - vae_before

    optimizer_state = sum(t.numel() * t.element_size() for state in run.optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t))
    step_s, floor_s = statistics.median(times), statistics.median(floor)
    samples = len(batch["prompts"]) * acc.gradient_accumulation_steps * acc.num_processes
    widths = sum(e.width for e in bb.encoders)
    return {
        "step_s": step_s, "floor_s": floor_s, "overhead": step_s / floor_s, "steps_per_s": 1 / step_s,
        "samples_per_s": samples / step_s, "peak_mem_bytes": _peak_memory(device),
        "optimizer_state_bytes": optimizer_state,
        "optimizer_state_limit_bytes": 3 * run.token.num_vectors * widths * 4,
        "vae_calls_per_step": vae_calls / steps, "data_wait_frac": data_wait / sum(times),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "host": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "step_times_s": times, "floor_times_s": floor,
        "images": len(run.dataset.samples), "cache_build_s": run.latents.build_s,
    }


def generated_images(out_dir: Path, count: int, resolution) -> Path:
    """`count` captioned images at the training resolution (a coloured box on a coloured ground, random per image),
    for timing the latent cache against dataset size."""
    from PIL import Image, ImageDraw

    width, height = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        ground, box = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        image = Image.new("RGB", (width, height), tuple(int(c) for c in ground))
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        ImageDraw.Draw(image).rectangle([x0, y0, x0 + width // 3, y0 + height // 3], fill=tuple(int(c) for c in box))
        image.save(out_dir / f"{i:05d}.png")
        (out_dir / f"{i:05d}.txt").write_text(f"a box, image {i}\n", encoding="utf-8")
    return out_dir


def format_table(result: dict, settings: dict) -> str:
    rows = [("model", settings["model"]), ("resolution", settings["resolution"]),
            ("batch", settings["batch_size"]), ("precision", settings["mixed_precision"]),
            ("vectors", settings["num_vectors"]), ("device", result["device"]),
            ("step (median)", f"{result['step_s'] * 1000:.1f} ms"), ("floor (median)", f"{result['floor_s'] * 1000:.1f} ms"),
            ("overhead", f"{result['overhead']:.3f}"), ("steps/s", f"{result['steps_per_s']:.2f}"),
            ("samples/s", f"{result['samples_per_s']:.2f}"), ("peak memory", f"{result['peak_mem_bytes'] / 2**20:.0f} MiB"),
            ("optimizer state", f"{result['optimizer_state_bytes']} B (limit {result['optimizer_state_limit_bytes']} B)"),
            ("VAE calls/step", f"{result['vae_calls_per_step']:.2f}"), ("data wait", f"{result['data_wait_frac']:.2%}")]
    if result["cache_build_s"] is not None:
        rows.append(("latent cache", f"{result['cache_build_s']:.2f} s for {result['images']} images "
                                     f"({result['cache_build_s'] / result['images'] * 1000:.1f} ms each)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="train")
def bench_main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if cfg.bench.cache_images > 0:
            cfg.data.image_dir = str(generated_images(run_dir / "images", cfg.bench.cache_images, cfg.data.resolution))
        job = prepare(cfg, run_dir, tracker=Tracker())
        if job is None:
            return 0.0
        result = measure(job, cfg.bench.steps, cfg.bench.warmup)
    except ConfigError as err:
        sys.exit(refuse("tinv-bench", err))
    settings = {"model": HydraConfig.get().runtime.choices.get("model"), "resolution": cfg.data.resolution,
                "batch_size": cfg.train.batch_size, "mixed_precision": cfg.train.mixed_precision,
                "num_vectors": job.token.num_vectors, "cache_latents": cfg.train.cache_latents,
                "steps": cfg.bench.steps, "warmup": cfg.bench.warmup, "cache_images": cfg.bench.cache_images,
                "config": OmegaConf.to_container(cfg, resolve=True)}
    write_text_atomic(run_dir / "bench.json", json.dumps({**result, "settings": settings}, indent=2, default=str))
    print(format_table(result, settings))
    return result["step_s"]


HELP = """tinv-bench: time real training steps, and how tinv shares a machine.

  tinv-bench model=sd15_shape data.resolution=256 train.batch_size=1 bench.steps=6 bench.warmup=2
  tinv-bench -m model=tiny_sd15 data.resolution=64,128,256 bench.steps=8    # a scaling table, one job each
  tinv-bench threads WORK_DIR      # default threads against fixed counts, on an idle and a busy machine
  tinv-bench sharing WORK_DIR      # toy runs one after another, side by side, and as a joblib sweep

Timing steps takes every tinv-train override (`tinv-train --help` lists the groups and keys) and:
  bench.steps            timed optimizer steps (default 10)
  bench.warmup           untimed steps first (default 3)
  bench.cache_images     > 0: train on this many generated images and time the latent cache
It prints a table (step, floor = one micro-batch's loss forward and backward, overhead = step / floor, memory,
optimizer state, VAE calls per step, data wait) and writes bench.json in the run folder.
`tinv-bench threads --help` and `tinv-bench sharing --help` list their options. The measured tables: docs/measurements.md."""


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] in ("threads", "sharing"):
        sys.exit(machine_main(args))
    if "--help" in args or "-h" in args:
        print(HELP)
        sys.exit(0)
    import_from_cwd()
    if not any(arg.startswith("scorer=") for arg in args):  # steps are timed, not judged
        args = ["scorer=none", *args]
    sys.argv[1:] = command_line("tinv-bench", args)
    bench_main()


if __name__ == "__main__":
    main()
