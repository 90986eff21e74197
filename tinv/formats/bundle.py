"""A1111's bundle: a kohya-layout LoRA with the embedding inside, `bundle_emb.<token>.<emb_params|clip_l|clip_g>`,
one file for A1111/Forge's Lora folder (diffusers refuses its keys and ComfyUI does not read them)."""

from __future__ import annotations

import re

import torch

from ..errors import ConfigError
from .keys import BUNDLE_PREFIX, SD_KEY, SDXL_KEYS


def bundle(lora: dict[str, torch.Tensor], token: str, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya-layout LoRA with the embedding bundled in, as A1111 reads it."""
    return {**lora, **{f"{BUNDLE_PREFIX}{token}.{key}": value.float().contiguous() for key, value in vectors.items()}}


def unbundle(tensors: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], str, dict]:
    """(the LoRA's own tensors, the bundled token, its vectors by encoder key) of a bundle file's tensors."""
    embedded: dict[str, dict[str, torch.Tensor]] = {}
    lora = {}
    for key, value in tensors.items():
        m = re.fullmatch(rf"{re.escape(BUNDLE_PREFIX)}(.+)\.(?:string_to_param\.)?({SD_KEY}|clip_l|clip_g|\*)", key)
        if m:
            embedded.setdefault(m.group(1), {})[SD_KEY if m.group(2) == "*" else m.group(2)] = value
        elif not key.startswith(BUNDLE_PREFIX):
            lora[key] = value
    if len(embedded) != 1:
        raise ConfigError(f"{where}: holds {len(embedded)} bundled embeddings ({', '.join(embedded) or 'none'}); "
                          "expected one, under bundle_emb.<token>.<emb_params|clip_l|clip_g>")
    (token, vectors), = embedded.items()
    if set(vectors) not in ({SD_KEY}, set(SDXL_KEYS)):
        raise ConfigError(f"{where}: the bundled {token!r} has keys {sorted(vectors)}; expected emb_params or "
                          "clip_l + clip_g")
    return lora, token, vectors
