"""What a run trains: a set of parts, each bringing its parameters, optimizer groups, resumable state and files.

The loop, the optimizer and the state file see parts only through this interface, so a new kind of trainable
weights is a new part and a config entry, not a change to the loop. The parts tinv has live in tinv/trained:
the token's vectors (tinv.trained.token.TokenVectors) and method=pivotal's LoRA (tinv.trained.lora.LoraWeights).
Parts are chosen in config: `parts.<name>._target_` (conf/train.yaml holds the default, the token's vectors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn


@dataclass
class MicroBatch:
    """What a part's loss term may look at: this micro-batch's noised latents, their timesteps, the batch (SDXL's
    size conditioning), the model's prediction for them (with gradients) and the masks this step used (at the
    latents' size; None without masks)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    batch: dict
    prediction: torch.Tensor | None = None
    masks: torch.Tensor | None = None


class TrainablePart(Protocol):
    def setup(self, run) -> None:
        """After the frozen models load: create the trainable weights and put them where they act."""

    def parameters(self) -> list[nn.Parameter]:
        """Every trained tensor (gradients are averaged, clipped and checked over these)."""

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups; a group may set its own "lr"."""

    def loss_term(self, micro: MicroBatch) -> torch.Tensor | float:
        """Added to the diffusion loss of each micro-batch (a regulariser), or 0.0."""

    def after_step(self) -> None:
        """After a good optimizer step (e.g. a norm constraint)."""

    def trains(self, step: int, max_steps: int) -> bool:
        """Whether the step with this 0-based index trains the part (its phase); a part that stops gets no
        gradients, so the optimizer leaves it as it is (no update, no weight decay)."""

    def metrics(self) -> dict[str, float]:
        """Logged with the training loss."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs to continue exactly."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def write(self, run, suffix: str) -> dict[str, Path]:
        """Write this part's files for `<output_name><suffix>`; returns {summary key: path}."""
