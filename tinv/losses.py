"""The diffusion loss, one definition for training, validation and the toy model's pretraining.

The caller passes the draws (noise, timesteps) in: training draws them per step from the run's seed, validation
fixes them per image, pretraining draws them from its own stream. What happens to them is the same everywhere:
noise the latents at the timesteps, predict, compare with the model's target (epsilon or velocity) in fp32.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noisy latents, timesteps) -> model output


def squared_error(predict: Predict, scheduler, prediction_type: str, latents: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
    """Element-wise squared error (fp32) between the prediction for the noised latents and its target."""
    pred = predict(scheduler.add_noise(latents, noise, timesteps), timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    return F.mse_loss(pred.float(), target.float(), reduction="none")


class DiffusionLoss:
    """Mean over samples of the per-sample mean squared error, optionally Min-SNR weighted; the draws come from a
    generator over the timestep range."""

    def __init__(self, noise_offset: float = 0.0, min_snr_gamma: float | None = None, min_timestep: int = 0,
                 max_timestep: int | None = None):
        self.noise_offset, self.min_snr_gamma = noise_offset, min_snr_gamma
        self.min_timestep, self.max_timestep = min_timestep, max_timestep

    def draw(self, gen: torch.Generator, shape: tuple[int, ...], num_train_timesteps: int, num_processes: int = 1,
             rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (with the offset, if any) and timesteps for `shape`, this process's slice of the global batch.

        Drawn on the CPU for the whole global batch (num_processes x shape[0]) and sliced, so the same sample gets
        the same draws whatever the process count."""
        local = shape[0]
        full = (local * num_processes, *shape[1:])
        noise = torch.randn(full, generator=gen)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((full[0], full[1], 1, 1), generator=gen)
        top = self.max_timestep if self.max_timestep is not None else num_train_timesteps
        timesteps = torch.randint(self.min_timestep, top, (full[0],), generator=gen)
        mine = slice(rank * local, (rank + 1) * local)
        return noise[mine], timesteps[mine]

    def __call__(self, predict: Predict, scheduler, prediction_type: str, latents: torch.Tensor,
                 noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        per_sample = squared_error(predict, scheduler, prediction_type, latents, noise, timesteps).mean(dim=(1, 2, 3))
        if self.min_snr_gamma:
            alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
            snr = alphas / (1 - alphas)
            denominator = snr + 1 if prediction_type != "epsilon" else snr
            per_sample = per_sample * (torch.clamp(snr, max=self.min_snr_gamma) / denominator)
        return per_sample.mean()
