"""A run: the pieces built from config before any weights load (`Job`), then loaded and placed (`open_run`) into the
one context object that the loop, the parts, the callbacks and the state file see (`Run`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from .cache import cache_root
from .callbacks import Callbacks
from .config import recorded_config
from .data import BucketBatchSampler, Latents, TrainingSet, collate
from .diskspace import check_room, planned_writes
from .memory import check_memory
from .trained.token import ConceptToken
from .errors import ConfigError
from .resources import ThreadShare, pick_gpu
from .state import RunState, find_state, load_state, save_state
from .tracking import Tracker

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Job:
    """Everything a run is made of, built and checked from the config while nothing heavy has loaded yet."""

    cfg: DictConfig  # the composed config: train.*, data.* loading keys, save.*, resume
    run_dir: Path
    backbone: object  # tinv.backbone.Backbone, tokenizers only until open_run
    token: ConceptToken
    dataset: TrainingSet  # after the callbacks' on_dataset (validation's hold-out)
    parts: dict  # name -> tinv.parts.TrainablePart
    callbacks: Callbacks
    tracker: Tracker
    trainer: object  # tinv.trainer.Trainer
    make_optimizer: Callable  # param groups -> optimizer
    make_lr_scheduler: Callable  # (optimizer, num_training_steps) -> scheduler


@dataclass
class Run:
    """The public surface of a running job."""

    accelerator: object  # accelerate.Accelerator
    backbone: object
    dataset: TrainingSet
    token: ConceptToken
    parts: dict
    optimizer: object  # prepared by accelerate
    lr_scheduler: object
    latents: Latents
    loader: DataLoader
    state: RunState
    tracker: Tracker
    callbacks: Callbacks
    run_dir: Path
    output_name: str
    save_format: str
    max_steps: int
    seed: int
    threads: ThreadShare | None = None  # this run's share of the CPU cores
    started: tuple[float, float] = (0.0, 0.0)  # (time.perf_counter(), time.time()) when the run began to load

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def elapsed_s(self) -> float:
        """Wall time of the whole run: earlier invocations (from the state) and this one."""
        return self.state.elapsed_s + time.perf_counter() - self.started[0]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for part in self.parts.values() for p in part.parameters()]

    def training_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters of the parts whose phase includes the step about to run; the others' gradients are
        switched off, so the optimizer skips them."""
        active = []
        for part in self.parts.values():
            on = part.trains(self.step, self.max_steps) if hasattr(part, "trains") else True
            for p in part.parameters():
                p.requires_grad_(on)
            active += part.parameters() if on else []
        return active

    def input_ids(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids per text encoder for these prompts, the token expanded to all its names."""
        return self.backbone.tokenize([self.token.expand(p) for p in prompts])

    def batches(self) -> Iterator[dict]:
        """Batches from where the state says, epoch after epoch, counting the position for resume."""
        sampler = self.loader.batch_sampler
        while True:
            sampler.epoch, sampler.start = self.state.epoch, self.state.position
            for batch in self.loader:
                self.state.position += 1
                yield batch
            self.state.epoch, self.state.position = self.state.epoch + 1, 0

    def log(self, metrics: dict) -> None:
        """Record metrics at the current step (metrics.jsonl, the dashboard) and tell the callbacks."""
        self.tracker.log(metrics, self.step)
        self.callbacks.call("on_log", self, metrics)

    def write_files(self, suffix: str, notify: bool = True) -> dict[str, Path]:
        """Every part's files for `<output_name><suffix>` (main process only); {summary key: path}. The callbacks
        hear of them (on_files) unless `notify` is off."""
        if not self.is_main:
            return {}
        written = {}
        for part in self.parts.values():
            written.update(part.write(self, suffix))
        for path in written.values():
            log.info("saved %s (step %d)", path, self.step)
        if notify:
            self.callbacks.call("on_files", self, written)
        return written

    def save_state(self) -> None:
        if self.is_main:
            save_state(self)


def open_run(job: Job) -> Run:
    """Load the frozen models, put the parts in place, build optimizer, schedule, latents and batches, resume if
    asked, start the tracker."""
    cfg, train = job.cfg, job.cfg.train
    started = (time.perf_counter(), time.time())
    threads = ThreadShare(train.num_threads)
    threads.claim()
    accelerator = _accelerator(train.mixed_precision, train.gradient_accumulation, train.cpu)
    run_dir, state_dir = job.run_dir, None
    if cfg.resume:
        run_dir, state_dir = find_state(cfg.resume, job.run_dir)
    _load_models(job.backbone, accelerator.device, train)
    run = Run(accelerator=accelerator, backbone=job.backbone, dataset=job.dataset, token=job.token, parts=job.parts,
              optimizer=None, lr_scheduler=None, latents=None, loader=None, state=RunState(), tracker=job.tracker,
              callbacks=job.callbacks, run_dir=run_dir, output_name=cfg.output_name or job.token.string,
              save_format=cfg.save.format, max_steps=train.max_steps, seed=train.seed, threads=threads,
              started=started)
    for part in run.parts.values():
        part.setup(run)
    _speed_options(run, train)
    optimizer = job.make_optimizer([g for part in run.parts.values() for g in part.param_groups()])
    _scale_lr(optimizer, train.lr_scale, job.dataset, train.gradient_accumulation, accelerator.num_processes)
    run.lr_scheduler = job.make_lr_scheduler(optimizer=optimizer, num_training_steps=train.max_steps)
    run.optimizer = accelerator.prepare(optimizer)
    if run.is_main:
        check_room(planned_writes(run, cfg))  # before the latents are encoded and the first step runs
    cache = train.cache_latents or train.cache_latents_to_disk
    if train.check_memory:  # the largest bucket's encoding and step, before either runs
        check_memory(job.backbone, job.dataset, accelerator.device, cfg.data.vae_batch_size, cache,
                     train.gradient_checkpointing)
    disk = (cfg.data.cache_dir or str(cache_root() / "latents")) if train.cache_latents_to_disk else None
    run.latents = Latents.prepare(job.dataset, job.backbone, accelerator.device, cache, disk,
                                  cfg.data.vae_batch_size)
    if run.latents.cached:
        run.dataset = job.dataset.without_pixels()
    sampler = BucketBatchSampler(run.dataset, train.seed, accelerator.num_processes, accelerator.process_index)
    run.loader = DataLoader(run.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers)
    if state_dir is not None:
        run.state = load_state(state_dir, run)
        run.tracker.set_summary(resumed_at_step=run.step)
        log.info("resumed %s at step %d", run.run_dir, run.step)
    run.tracker.start(run.run_dir, recorded_config(cfg), enabled=run.is_main,
                      resume_id=run.state.tracker_id, resume_step=run.step)
    run.state.tracker_id = run.tracker.run_id
    vectors, processes = run.token.num_vectors, accelerator.num_processes
    saved_as = f", saved as {run.output_name}" if run.output_name != run.token.string else ""
    log.info("training %s (%d floats; token %r%s, %d vector%s) on %s: %d process%s, %s, precision %s; %d "
             "images, %d samples per epoch", ", ".join(run.parts), sum(p.numel() for p in run.parameters()),
             run.token.string, saved_as, vectors, "s"[:vectors > 1], accelerator.device.type, processes,
             "es"[:2 * (processes > 1)], threads.describe(),
             {"no": "fp32"}.get(train.mixed_precision, train.mixed_precision), len(set(run.dataset.order)),
             len(run.dataset))
    return run


def _accelerator(mixed_precision: str, gradient_accumulation: int, cpu: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin

    # accelerate keeps process-wide singletons; several runs in one process (Hydra's basic multirun launcher,
    # tests) may differ in precision or accumulation. The distributed state (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    pick_gpu()
    no_gpu = not torch.cuda.is_available()
    accelerator = Accelerator(
        mixed_precision=str(mixed_precision), cpu=cpu or no_gpu,  # cpu=True: real gloo DDP on CPUs
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=gradient_accumulation,
                                                                sync_with_dataloader=False))
    if mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; on the CPU use train.mixed_precision=bf16 or no")
    return accelerator


def _load_models(backbone, device: torch.device, train) -> None:
    dtype = DTYPES[train.mixed_precision]
    no_half_vae = backbone.keeps_vae_fp32 if train.no_half_vae is None else train.no_half_vae
    backbone.load_models(device, dtype, torch.float32 if no_half_vae else dtype)


def _speed_options(run: Run, train) -> None:
    """Gradient checkpointing, torch.compile, and caching the outputs of a frozen SDXL encoder."""
    if train.gradient_checkpointing:
        run.backbone.enable_gradient_checkpointing()
    if train.compile:
        run.backbone.unet = torch.compile(run.backbone.unet)
    if train.cache_text_encoder_outputs:
        if not run.token.frozen_keys():
            raise ConfigError("train.cache_text_encoder_outputs: an encoder whose vectors train cannot be cached, "
                              "and every encoder trains here; for SDXL set token.train_encoders=clip_l or clip_g to "
                              "cache the other one")
        run.backbone.cache_outputs_of(run.token.frozen_keys())


def _scale_lr(optimizer, lr_scale: str, dataset: TrainingSet, accumulation: int, processes: int) -> None:
    """train.lr_scale=batch, the original TI rule: lr grows with the samples per optimizer step."""
    if lr_scale != "batch":
        return
    sizes = {ds.batch_size for ds in dataset.specs}  # a kohya TOML may set its own
    if len(sizes) > 1:
        log.warning("train.lr_scale=batch: datasets have batch sizes %s; scaling by the largest", sorted(sizes))
    for group in optimizer.param_groups:
        group["lr"] *= max(sizes) * accumulation * processes
