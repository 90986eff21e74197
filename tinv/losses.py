"""The diffusion training loss: noise, timesteps, the model's target, and the weighting options."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_loss(backbone, latents: torch.Tensor, input_ids: list[torch.Tensor], batch: dict,
                   gen: torch.Generator, num_processes: int = 1, rank: int = 0, *, noise_offset: float = 0.0,
                   min_snr_gamma: float | None = None, min_timestep: int = 0,
                   max_timestep: int | None = None) -> torch.Tensor:
    """MSE (in fp32) between the UNet's prediction and its target (epsilon or velocity).

    Noise and timesteps are drawn for the whole global batch from `gen` on the CPU and this process takes its slice:
    the same sample gets the same draws whatever the process count.
    """
    sched = backbone.noise_scheduler
    local = latents.shape[0]
    shape = (local * num_processes, *latents.shape[1:])
    noise = torch.randn(shape, generator=gen)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=gen)
    top = max_timestep if max_timestep is not None else sched.config.num_train_timesteps
    t = torch.randint(min_timestep, top, (shape[0],), generator=gen)
    mine = slice(rank * local, (rank + 1) * local)
    noise, t = noise[mine].to(latents.device), t[mine].to(latents.device)

    noisy = sched.add_noise(latents, noise, t)
    pred = backbone.predict(noisy.to(backbone.unet.dtype), t, input_ids, batch)
    target = noise if backbone.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        alphas = sched.alphas_cumprod.to(t.device)[t]
        snr = alphas / (1 - alphas)
        weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if backbone.prediction_type != "epsilon" else snr)
        per_sample = per_sample * weight
    return per_sample.mean()
