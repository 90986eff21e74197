"""The scorer models: CLIP (image and text embeddings) and DINO (the CLS feature of a ViT), by hub id or local
folder, each with its own processor. Found before any weights load; loaded for one scoring, on the run's device in
its precision, and released after it so the training gets its memory back."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import torch

from ..config import ScoreConfig
from ..errors import ConfigError

DEFAULT_CLIP, DEFAULT_DINO = ScoreConfig.clip, ScoreConfig.dino


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


# what each scorer must be (config.json's model_type): CLIP for CLIP-I and CLIP-T, a plain ViT (DINO) for DINO
SCORER_TYPES = {"clip": ("clip",), "dino": ("vit", "dinov2")}


def locate(key: str, name: str, default: str, kind: str, off: str = "turn scoring off (scorer=none)") -> str:
    """`name` as transformers will load it: a local model folder, or a hub id (offline: one already in the Hugging
    Face cache), whose config says it is the `kind` of model asked for. Anything else is one line naming `key`
    and the fix (`off`: how to do without scoring)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    if not name:
        raise ConfigError(f"{key} is empty; give a hub id (the default is {default}) or a local model folder")
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}={name!r}: no model folder there (no config.json); give a folder written by "
                              f"save_pretrained, or a hub id like {default}")
        config = path / "config.json"
    else:
        try:
            config = try_to_load_from_cache(name, "config.json")
        except HFValidationError:
            raise ConfigError(f"{key}={name!r} is neither a folder nor a hub id like {default}") from None
        if not isinstance(config, str) and _offline():
            raise ConfigError(f"{key}={name!r}: no folder of that name here, and as a hub id it is not in the Hugging "
                              f"Face cache with HF_HUB_OFFLINE set; run `hf download {name}` once online, give a "
                              f"local folder{', or ' + off if off else ''}")
    if isinstance(config, (str, Path)):  # known here: check it is the scorer asked for (online, the download tells)
        found = json.loads(Path(config).read_text()).get("model_type")
        if found not in SCORER_TYPES[kind]:
            raise ConfigError(f"{key}={name!r} is a {found!r} model; {key} needs a {' or '.join(SCORER_TYPES[kind])} "
                              f"model such as {default}")
    return name if not path.exists() else str(path)


def scorer_dtype(device: torch.device, mixed_precision: str) -> torch.dtype:
    """The run's precision on a GPU; float32 on the CPU (half precision there is slow and inexact)."""
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _normalised(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    return (features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu()


class ScorerModels:
    """CLIP and DINO for one scoring: `with ScorerModels(...) as scorers:` loads them, leaving drops them (no
    reference is kept, the GPU's cache is emptied). Features come back L2-normalised, float32, on the CPU."""

    def __init__(self, clip: str, dino: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 8):
        self.clip_name, self.dino_name = clip, dino
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, max(1, batch_size)
        self.models: dict = {}

    def __enter__(self) -> "ScorerModels":
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

        # DINO's ViT has no pooling head: its feature is the CLS position, so none is built (or reported missing)
        vit = {"add_pooling_layer": False} if AutoConfig.from_pretrained(self.dino_name).model_type == "vit" else {}
        self.models = {
            "clip": CLIPModel.from_pretrained(self.clip_name, dtype=self.dtype).to(self.device).eval(),
            "clip_images": AutoImageProcessor.from_pretrained(self.clip_name),
            "clip_text": AutoTokenizer.from_pretrained(self.clip_name),
            "dino": AutoModel.from_pretrained(self.dino_name, dtype=self.dtype, **vit).to(self.device).eval(),
            "dino_images": AutoImageProcessor.from_pretrained(self.dino_name),
        }
        return self

    def __exit__(self, *exc) -> None:
        self.models.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _batches(self, items: list):
        for start in range(0, len(items), self.batch_size):
            yield items[start:start + self.batch_size]

    def _pixels(self, processor: str, images: list) -> torch.Tensor:
        pixels = self.models[processor](images=[im.convert("RGB") for im in images], return_tensors="pt")
        return pixels["pixel_values"].to(self.device, self.dtype)

    @torch.no_grad()
    def clip_images(self, images: list) -> torch.Tensor:
        """CLIP's image embedding of each PIL image (CLIP-I, and CLIP-T's image side)."""
        return torch.cat([_normalised(self.models["clip"].get_image_features(
            pixel_values=self._pixels("clip_images", batch)).pooler_output) for batch in self._batches(images)])

    @torch.no_grad()
    def clip_texts(self, texts: list[str]) -> torch.Tensor:
        """CLIP's text embedding of each text (CLIP-T's text side)."""
        out = []
        for batch in self._batches(texts):
            tokens = self.models["clip_text"](batch, padding=True, truncation=True, return_tensors="pt")
            out.append(_normalised(self.models["clip"].get_text_features(**tokens.to(self.device)).pooler_output))
        return torch.cat(out)

    @torch.no_grad()
    def dino_images(self, images: list) -> torch.Tensor:
        """DINO's CLS feature of each PIL image (the last layer's first position, as DreamBench takes it)."""
        return torch.cat([_normalised(self.models["dino"](pixel_values=self._pixels("dino_images", batch))
                                      .last_hidden_state[:, 0]) for batch in self._batches(images)])
