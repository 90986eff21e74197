"""Deterministic validation loss: fixed images, fixed prompts, fixed noise and timesteps spread over the schedule.

The same embedding always scores the same, so steps, runs and sweep trials compare fairly. A callback
(`callbacks.validation`, configured by `val.*`): it logs `val/loss` every `every_n_steps`. With masks, each image's
loss is weighted by its mask as in training (loss.mask_weight, loss.normalize_area; never dropped).
"""

from __future__ import annotations

import logging
import random

import torch

from .callbacks import every
from .data import collate
from .losses import per_sample, squared_error
from .seeds import derive_seed

log = logging.getLogger(__name__)


class Validation:
    def __init__(self, every_n_steps: int = 0, split: float = 0.0, max_images: int = 16, num_timesteps: int = 8,
                 seed: int = 0, mask_weight: float = 0.0, normalize_area: bool = False):
        self.every_n_steps, self.split, self.max_images = every_n_steps, split, max_images
        self.mask_weight, self.normalize_area = mask_weight, normalize_area
        self.num_timesteps, self.seed = num_timesteps, seed
        self.samples: list[int] = []  # sample indices scored

    def on_dataset(self, dataset):
        """Hold out `split` of the images (training gets the rest), or score a fixed subset of the training images."""
        if not self.every_n_steps:
            return None
        if self.split > 0:
            held = dataset.held_out(self.split, self.seed)
            log.info("validation: %d images held out of training", len(held))
            self.samples = held[:self.max_images]
            return dataset.without(held)
        count = len(dataset.samples)
        wanted = min(self.max_images, count)
        self.samples = sorted({round(i * count / wanted) for i in range(wanted)})[:self.max_images]
        return None

    def on_step_end(self, run, step) -> None:
        if not step.skipped and every(step.step, self.every_n_steps):
            run.log({"val/loss": self.loss(run)})

    @torch.no_grad()
    def loss(self, run) -> float:
        bb, device, k = run.backbone, run.device, self.num_timesteps
        sched = bb.noise_scheduler
        t = torch.linspace(0, sched.config.num_train_timesteps - 1, k).round().long().to(device)
        total = 0.0
        for index in self.samples:
            item = run.dataset.fixed_item(index, random.Random(f"val:{self.seed}:{index}"))
            single = collate([item])
            latent = run.latents.of(single)
            masks = run.latents.masks_of(single, latent)
            latents = latent.expand(k, *latent.shape[1:])
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(derive_seed(self.seed, index)))
            batch = collate([item] * k)  # the same conditioning (SDXL: sizes and crop) at every timestep
            predict = bb.predictor(run.input_ids(batch["prompts"]), batch)
            with run.accelerator.autocast():
                error = squared_error(predict, sched, bb.prediction_type, latents, noise.to(device), t)
            if masks is None:
                total += error.mean().item()
            else:
                weighted = per_sample(error, masks.expand(k, *masks.shape[1:]), self.mask_weight, self.normalize_area)
                total += weighted.mean().item()
        return total / len(self.samples)
