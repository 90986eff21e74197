"""The training loop: data -> text encoders -> UNet -> loss -> step, for every model family.

Everything family-specific sits behind `Backbone`; everything token-specific behind `ConceptToken`. accelerate
places tensors, runs autocast and the fp16 grad scaler, and counts gradient-accumulation micro-batches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from .backbone.tiny import cache_root
from .data import BucketBatchSampler, LatentCache, collate
from .embedding import ConceptToken, EmbeddingMeta, save_embedding
from .errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    embedding: Path
    step: int
    final_loss: float
    trainer: "Trainer"


class Trainer:
    def __init__(self, backbone, dataset, token: ConceptToken, prompts, optimizer, lr_scheduler, tracker,
                 run_dir: str | Path, output_name: str, save_format: str = "safetensors",
                 save_every_n_steps: int = 0, run_config: dict | None = None, *, max_steps: int = 500,
                 batch_size: int = 4, gradient_accumulation: int = 1, seed: int = 42, mixed_precision: str = "no",
                 gradient_checkpointing: bool = False, cache_latents: bool = True,
                 cache_latents_to_disk: bool = False, no_half_vae: bool | None = None,
                 max_grad_norm: float | None = None, log_every_n_steps: int = 1, cpu: bool = False):
        self.backbone, self.dataset, self.token, self.prompts = backbone, dataset, token, prompts
        self.make_optimizer, self.make_lr_scheduler, self.tracker = optimizer, lr_scheduler, tracker
        self.run_dir, self.output_name = Path(run_dir), output_name
        self.save_format, self.save_every_n_steps = save_format, save_every_n_steps
        # a plain dict for the trackers (Hydra hands kwargs over as DictConfig)
        self.config = OmegaConf.to_container(run_config) if isinstance(run_config, DictConfig) else run_config or {}
        self.max_steps, self.seed = max_steps, seed  # batch_size lives in train.* but the data pipeline uses it
        self.gradient_accumulation, self.mixed_precision = gradient_accumulation, mixed_precision
        self.gradient_checkpointing = gradient_checkpointing
        self.cache_latents, self.cache_latents_to_disk = cache_latents or cache_latents_to_disk, cache_latents_to_disk
        self.no_half_vae = backbone.family == "sdxl" if no_half_vae is None else no_half_vae
        self.max_grad_norm, self.log_every_n_steps, self.cpu = max_grad_norm, log_every_n_steps, cpu
        self.step = 0
        self.latent_cache = None

    # ---- setup ----------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import GradientAccumulationPlugin, set_seed

        # accelerate keeps process-wide singletons; several runs in one process (Hydra's basic multirun launcher,
        # tests) may differ in precision or accumulation. The distributed state (PartialState) is kept.
        AcceleratorState._reset_state()
        GradientState._reset_state()
        self.accelerator = Accelerator(
            mixed_precision=self.mixed_precision, cpu=self.cpu,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=self.gradient_accumulation,
                                                                    sync_with_dataloader=False))
        device = self.accelerator.device
        if self.accelerator.num_processes > 1:
            raise ConfigError("multi-process training is not supported yet: the vectors' gradients would not be "
                              "averaged across processes; launch one process")
        if self.mixed_precision == "fp16" and device.type == "cpu":
            raise ConfigError("train.mixed_precision=fp16 needs a GPU; on the CPU use train.mixed_precision=bf16 "
                              "or no")
        set_seed(self.seed)
        dtype = DTYPES[self.mixed_precision]
        self.backbone.load_models(device, dtype, torch.float32 if self.no_half_vae else dtype)
        self.token.install(self.backbone.encoders, self.seed)  # after the dtype cast: the vectors stay fp32
        if self.gradient_checkpointing:
            self.backbone.enable_gradient_checkpointing()

        params = self.token.parameters()
        self.optimizer = self.make_optimizer(params)
        self.lr_scheduler = self.make_lr_scheduler(optimizer=self.optimizer, num_training_steps=self.max_steps)
        self.optimizer = self.accelerator.prepare(self.optimizer)
        self.loader = DataLoader(self.dataset, batch_sampler=BucketBatchSampler(self.dataset, self.seed),
                                 collate_fn=collate, num_workers=self.dataset.num_workers,
                                 worker_init_fn=self.dataset.reseed_worker,
                                 generator=torch.Generator().manual_seed(self.seed))
        self.noise_gen = torch.Generator(device=device).manual_seed(self.seed + self.accelerator.process_index)
        if self.cache_latents:
            self._cache_latents(device)
        self.tracker.start(self.run_dir, self.config, enabled=self.accelerator.is_main_process)
        n = sum(p.numel() for p in params)
        log.info("training %d vectors (%d floats) of token %r on %s (%s); %d images, %d samples per epoch",
                 self.token.num_vectors, n, self.token.string, device, self.mixed_precision,
                 len(self.dataset.samples), len(self.dataset))

    def _cache_latents(self, device: torch.device) -> None:
        """Encode every image (and its mirror, with flip_aug) once; steps then do no VAE work."""
        blockers = sorted({k for sub in self.dataset.subsets for k in ("random_crop", "color_aug") if getattr(sub, k)})
        if blockers:
            log.warning("latent caching is off: %s change the pixels every step", " and ".join(blockers))
            return
        cache_dir = None
        if self.cache_latents_to_disk:
            cache_dir = self.dataset.cache_dir or str(cache_root() / "latents")
        self.latent_cache = LatentCache(self.dataset, self.backbone, cache_dir, self.dataset.vae_batch_size)
        self.latent_cache.build(device)
        self.dataset.cached = True
        self.backbone.vae.to("cpu")  # no longer needed on the accelerator

    # ---- the loop ---------------------------------------------------------------------------------------------------

    def latents(self, batch: dict) -> torch.Tensor:
        if self.latent_cache is not None:
            return self.latent_cache.get(batch["sample"], batch["flip"])
        with torch.no_grad():
            return self.backbone.encode_latents(batch["pixel_values"]).float()

    def training_loss(self, batch: dict) -> torch.Tensor:
        bb, sched = self.backbone, self.backbone.noise_scheduler
        latents = self.latents(batch)
        noise = torch.randn(latents.shape, generator=self.noise_gen, device=latents.device)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=self.noise_gen,
                          device=latents.device)
        noisy = sched.add_noise(latents, noise, t)
        input_ids = bb.tokenize([self.token.expand(self.prompts(c)) for c in batch["captions"]])
        with self.accelerator.autocast():
            pred = bb.predict(noisy.to(bb.unet.dtype), t, input_ids, batch)
        target = noise if bb.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        return F.mse_loss(pred.float(), target.float())

    def fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        ok = False
        try:
            self.setup()
            bar = tqdm(total=self.max_steps, initial=self.step, desc="tinv", dynamic_ncols=True,
                       disable=not self.accelerator.is_main_process)
            batches, losses, since, logged = self._batches(), [], time.perf_counter(), self.step
            while self.step < self.max_steps:
                with self.accelerator.accumulate():
                    loss = self.training_loss(next(batches))
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients:
                        grad_norm = self._grad_norm()
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach().float())
                if not self.accelerator.sync_gradients:
                    continue
                lr = self.lr_scheduler.get_last_lr()[0]  # the rate this step used
                self.lr_scheduler.step()
                self.step += 1
                self.last_loss = torch.stack(losses).mean().item()
                losses = []
                bar.update(1)
                bar.set_postfix(loss=f"{self.last_loss:.4f}")
                if self.step % self.log_every_n_steps == 0 or self.step == self.max_steps:
                    rate = (self.step - logged) / max(time.perf_counter() - since, 1e-9)
                    self._log(grad_norm, lr, rate)
                    since, logged = time.perf_counter(), self.step
                if self.save_every_n_steps and self.step % self.save_every_n_steps == 0:
                    self.save(f"-step{self.step:08d}")
            bar.close()
            path = self.save("")
            self.tracker.set_summary(final_loss=self.last_loss, step=self.step, embedding=str(path),
                                     base_model=self.backbone.source, family=self.backbone.family)
            ok = True
            return TrainResult(path, self.step, self.last_loss, self)
        finally:
            self.tracker.finish(ok)

    def _batches(self):
        while True:
            yield from self.loader

    def _grad_norm(self) -> torch.Tensor:
        params = self.token.parameters()
        if self.max_grad_norm:
            return self.accelerator.clip_grad_norm_(params, self.max_grad_norm)
        self.accelerator.unscale_gradients()
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))

    def _log(self, grad_norm: torch.Tensor, lr: float, steps_per_s: float) -> None:
        metrics = {"train/loss": self.last_loss, "train/lr": lr,
                   "train/grad_norm": grad_norm, "train/it_per_s": steps_per_s}
        for key, vectors in self.token.vectors().items():
            for i, norm in enumerate(vectors.norm(dim=1).tolist()):
                metrics[f"embedding/{key}/norm_{i}"] = norm
        self.tracker.log(metrics, self.step)

    def save(self, suffix: str) -> Path:
        ext = "safetensors" if self.save_format == "safetensors" else "pt"
        path = self.run_dir / f"{self.output_name}{suffix}.{ext}"
        if self.accelerator.is_main_process:
            meta = EmbeddingMeta(self.token.string, self.backbone.family, self.backbone.source, self.step)
            save_embedding(path, self.token.vectors(), meta, self.save_format)
            log.info("saved %s (step %d)", path, self.step)
        return path
