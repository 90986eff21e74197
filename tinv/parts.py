"""What a run trains: a set of parts, each bringing its parameters, optimizer groups, resumable state and files.

The loop, the optimizer and the state file see parts only through this interface, so a new kind of trainable
weights (a LoRA beside the vectors) is a new part and a config entry, not a change to the loop. Parts are chosen
in config: `parts.<name>._target_` (conf/train.yaml holds the default, the token's vectors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .embedding import EmbeddingMeta, save_embedding


class TrainablePart(Protocol):
    def setup(self, run) -> None:
        """After the frozen models load: create the trainable weights and put them where they act."""

    def parameters(self) -> list[nn.Parameter]:
        """Every trained tensor (gradients are averaged, clipped and checked over these)."""

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups; a group may set its own "lr"."""

    def loss_term(self) -> torch.Tensor | float:
        """Added to the diffusion loss (a regulariser), or 0.0."""

    def after_step(self) -> None:
        """After a good optimizer step (e.g. a norm constraint)."""

    def metrics(self) -> dict[str, float]:
        """Logged with the training loss."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs to continue exactly."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def write(self, run, suffix: str) -> dict[str, Path]:
        """Write this part's files for `<output_name><suffix>`; returns {summary key: path}."""


class TokenVectors:
    """The token's N vectors per text encoder, spliced into the frozen token lookup (tinv.embedding), written as an
    embedding file every UI loads."""

    def __init__(self):
        self.token = None

    def setup(self, run) -> None:
        self.token = run.token
        self.token.install(run.backbone.encoders, run.seed)  # after the dtype cast: the vectors stay fp32

    def parameters(self) -> list[nn.Parameter]:
        return self.token.parameters()

    def param_groups(self) -> list[dict]:
        return [{"params": self.parameters()}]

    def loss_term(self) -> torch.Tensor | float:
        return self.token.regularizer()

    def after_step(self) -> None:
        self.token.after_step()

    def metrics(self) -> dict[str, float]:
        return {f"embedding/{key}/norm_{i}": norm for key, vectors in self.token.vectors().items()
                for i, norm in enumerate(vectors.norm(dim=1).tolist())}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.token.vectors()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.token.load_vectors(state)

    def write(self, run, suffix: str) -> dict[str, Path]:
        ext = "safetensors" if run.save_format == "safetensors" else "pt"
        path = run.run_dir / f"{run.output_name}{suffix}.{ext}"
        meta = EmbeddingMeta(self.token.string, run.backbone.family, run.backbone.source, run.step)
        save_embedding(path, self.token.vectors(), meta, run.save_format)
        return {"embedding": path}
