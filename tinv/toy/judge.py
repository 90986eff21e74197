"""The judge: a small CNN that reads a toy-world image's shape, colour and background.

Its pooled features also serve as the image space for `reconstruction` (cosine similarity between samples and
training images), the toy analogue of the paper's CLIP image similarity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import world

# every attribute the world renders, the novel shapes included
HEADS = {"shape": len(world.ALL_SHAPES), "colour": len(world.COLOURS), "background": len(world.BACKGROUNDS)}


class Judge(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(block(3, width), nn.MaxPool2d(2), block(width, width * 2), nn.MaxPool2d(2),
                                  block(width * 2, width * 4))
        self.heads = nn.ModuleDict({k: nn.Linear(width * 4, n) for k, n in HEADS.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images: float (n, 3, 32, 32) in [-1, 1] -> (n, 4*width) pooled features."""
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {k: head(f) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3) attribute indices (shape, colour, background)."""
        logits = self(images)
        return torch.stack([logits[k].argmax(-1) for k in HEADS], dim=1)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float (n, 3, 32, 32) in [-1, 1], resized to the world's size if needed."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != world.SIZE or x.shape[-2] != world.SIZE:
        x = F.interpolate(x, size=(world.SIZE, world.SIZE), mode="area")
    return x


def load_judge(path: Path) -> Judge:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"toy judge weights {path} are missing; run `tinv-toy pretrain` to make them")
    judge = Judge()
    judge.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return judge.eval().requires_grad_(False)
