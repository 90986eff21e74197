"""The diffusion loss, one definition for training, validation and the toy model's pretraining.

The caller passes the draws (noise, timesteps) in: training draws them per step from the run's seed, validation
fixes them per image, pretraining draws them from its own stream. What happens to them is the same everywhere:
noise the latents at the timesteps, predict, compare with the model's target (epsilon or velocity) in fp32.

With masks (tinv.data.masks, at the latents' size) each element's error is weighted by
`mask_weight + (1 - mask_weight) x mask`: the subject counts fully, the background by the floor `mask_weight`
(0 = kohya's masked loss, 0.1 = OneTrainer's). `normalize_area` divides a sample's loss by its mean weight, so a
small subject trains as strongly as a large one; `unmasked_prob` is the share of samples that train without their
mask. A batch without masks takes none of these paths: its loss is exactly the plain one.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noisy latents, timesteps) -> model output


def predict_and_target(predict: Predict, scheduler, prediction_type: str, latents: torch.Tensor,
                       noise: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's prediction for the noised latents and what it should be (the noise, or the velocity)."""
    pred = predict(scheduler.add_noise(latents, noise, timesteps), timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    return pred, target


def squared_error(predict: Predict, scheduler, prediction_type: str, latents: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
    """Element-wise squared error (fp32) between the prediction for the noised latents and its target."""
    pred, target = predict_and_target(predict, scheduler, prediction_type, latents, noise, timesteps)
    return F.mse_loss(pred.float(), target.float(), reduction="none")


def per_sample(error: torch.Tensor, mask: torch.Tensor | None = None, mask_weight: float = 0.0,
               normalize_area: bool = False) -> torch.Tensor:
    """Each sample's mean of the element-wise `error`; with a (B, 1, h, w) mask, weighted as the module says."""
    if mask is None:
        return error.mean(dim=(1, 2, 3))
    weights = mask_weight + (1.0 - mask_weight) * mask.to(error.dtype)
    weighted = (error * weights).mean(dim=(1, 2, 3))
    if normalize_area:
        weighted = weighted / weights.mean(dim=(1, 2, 3)).clamp_min(1e-6)
    return weighted


class DiffusionLoss:
    """Mean over samples of the per-sample mean squared error, optionally Min-SNR weighted; the draws come from a
    generator over the timestep range."""

    def __init__(self, noise_offset: float = 0.0, min_snr_gamma: float | None = None, min_timestep: int = 0,
                 max_timestep: int | None = None, mask_weight: float = 0.0, unmasked_prob: float = 0.0,
                 normalize_area: bool = False):
        self.noise_offset, self.min_snr_gamma = noise_offset, min_snr_gamma
        self.min_timestep, self.max_timestep = min_timestep, max_timestep
        self.mask_weight, self.unmasked_prob, self.normalize_area = mask_weight, unmasked_prob, normalize_area

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

    def mask_for_step(self, gen: torch.Generator, masks: torch.Tensor | None, num_processes: int = 1,
                      rank: int = 0) -> torch.Tensor | None:
        """The masks this step uses: each sample drops its mask (all ones) with probability unmasked_prob, drawn
        after `draw` from the same generator for the whole global batch (so a run without masks draws nothing
        more)."""
        if masks is None or not self.unmasked_prob:
            return masks
        local = masks.shape[0]
        dropped = (torch.rand(local * num_processes, generator=gen) < self.unmasked_prob)[rank * local:(rank + 1) * local]
        return torch.where(dropped.to(masks.device)[:, None, None, None], torch.ones_like(masks), masks)

    def __call__(self, predict: Predict, scheduler, prediction_type: str, latents: torch.Tensor,
                 noise: torch.Tensor, timesteps: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        return self.with_prediction(predict, scheduler, prediction_type, latents, noise, timesteps, masks)[0]

    def with_prediction(self, predict: Predict, scheduler, prediction_type: str, latents: torch.Tensor,
                        noise: torch.Tensor, timesteps: torch.Tensor,
                        masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss, the model's prediction): a part's loss term may compare the prediction with another one."""
        pred, target = predict_and_target(predict, scheduler, prediction_type, latents, noise, timesteps)
        error = F.mse_loss(pred.float(), target.float(), reduction="none")
        loss = per_sample(error, masks, self.mask_weight, self.normalize_area)
        if self.min_snr_gamma:
            alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
            snr = alphas / (1 - alphas)
            denominator = snr + 1 if prediction_type != "epsilon" else snr
            loss = loss * (torch.clamp(snr, max=self.min_snr_gamma) / denominator)
        return loss.mean(), pred
