"""Deterministic validation loss: fixed images, fixed prompts, fixed noise and timesteps spread over the schedule.

The same embedding always scores the same, so steps, runs and sweep trials compare fairly.
"""

from __future__ import annotations

import logging
import random

import torch
import torch.nn.functional as F

from .data.buckets import fit_to_bucket

log = logging.getLogger(__name__)


class Validator:
    def __init__(self, samples: list[int], every_n_steps: int, num_timesteps: int = 8, seed: int = 0):
        self.samples, self.every_n_steps = samples, every_n_steps
        self.num_timesteps, self.seed = num_timesteps, seed

    @classmethod
    def for_dataset(cls, dataset, every_n_steps: int, split: float = 0.0, max_images: int = 16,
                    num_timesteps: int = 8, seed: int = 0) -> "Validator":
        """Hold out `split` of the images (removed from training), or score a fixed subset of the training images."""
        if split > 0:
            samples = dataset.hold_out(split, seed)
            log.info("validation: %d images held out of training", len(samples))
        else:
            count = len(dataset.samples)
            samples = sorted({round(i * count / min(max_images, count)) for i in range(min(max_images, count))})
        return cls(samples[:max_images], every_n_steps, num_timesteps, seed)

    @torch.no_grad()
    def loss(self, trainer) -> float:
        bb, data, token = trainer.backbone, trainer.dataset, trainer.token
        sched = bb.noise_scheduler
        top = sched.config.num_train_timesteps
        t = torch.linspace(0, top - 1, self.num_timesteps).round().long().to(trainer.accelerator.device)
        total = 0.0
        for index in self.samples:
            sample = data.samples[index]
            rng = random.Random(f"val:{self.seed}:{index}")
            caption = data.processors[sample.subset](sample.caption, rng)
            prompt = token.expand(data.prompts(caption, rng) if data.prompts else caption)
            if trainer.latent_cache is not None:
                latent = trainer.latent_cache.get(torch.tensor([index]), torch.tensor([False]))
            else:
                latent = bb.encode_latents(data.pixels(index, False)[None]).float().to(t.device)
            latents = latent.expand(self.num_timesteps, *latent.shape[1:])
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            noise = torch.randn(latents.shape, generator=gen).to(t.device)
            _, crop = fit_to_bucket(sample.size, sample.bucket)
            k = self.num_timesteps
            batch = {"original_size": torch.tensor([[sample.size[1], sample.size[0]]] * k, dtype=torch.float32),
                     "crop_top_left": torch.tensor([list(crop)] * k, dtype=torch.float32),
                     "target_size": torch.tensor([[sample.bucket[1], sample.bucket[0]]] * k, dtype=torch.float32)}
            with trainer.accelerator.autocast():
                pred = bb.predict(sched.add_noise(latents, noise, t).to(bb.unet.dtype), t,
                                  bb.tokenize([prompt] * k), batch)
            target = noise if bb.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
            total += F.mse_loss(pred.float(), target.float()).item()
        return total / len(self.samples)
