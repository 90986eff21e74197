"""Images with captions, resized and cropped to the training resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .images import list_images, load_rgb, read_caption


class ImageCaptionDataset(Dataset):
    """One sample per image and repeat: pixels in [-1, 1], the caption, and the size/crop SDXL conditions on."""

    def __init__(self, image_dir: str | None, resolution: int, caption_extension: str = ".txt", num_repeats: int = 1,
                 center_crop: bool = True, num_workers: int = 0):
        if not image_dir:
            raise ConfigError("data.image_dir is not set; pass data.image_dir=/path/to/images (or use data=demo)")
        self.image_dir = Path(image_dir).expanduser()
        if not self.image_dir.is_dir():
            raise ConfigError(f"data.image_dir={str(self.image_dir)!r} does not exist or is not a folder")
        self.images = list_images(self.image_dir)
        if not self.images:
            raise ConfigError(f"data.image_dir={str(self.image_dir)!r} holds no images (png, jpg, jpeg, webp, bmp)")
        self.captions = [read_caption(p, caption_extension) for p in self.images]
        self.resolution = int(resolution)
        self.num_repeats = num_repeats
        self.center_crop = center_crop
        self.num_workers = num_workers
        self.cached_meta: dict[int, tuple] | None = None

    def use_cached_pixels(self, meta: dict[int, tuple]) -> None:
        """Latents are cached: stop decoding images; serve each image's (original size, crop) instead."""
        self.cached_meta = meta

    def __len__(self) -> int:
        return len(self.images) * self.num_repeats

    def image_index(self, index: int) -> int:
        return index % len(self.images)

    def __getitem__(self, index: int) -> dict:
        i = self.image_index(index)
        if self.cached_meta is not None:
            pixels, (original, crop) = None, self.cached_meta[i]
        else:
            pixels, original, crop = self._prepare(load_rgb(self.images[i]))
        return {"pixel_values": pixels, "caption": self.captions[i], "image_index": i,
                "original_size": original, "crop_top_left": crop, "target_size": (self.resolution,) * 2}

    def _prepare(self, img):
        """Resize the short side to the resolution, then crop the centre square (or squash without cropping)."""
        from PIL import Image

        w, h = img.size
        res = self.resolution
        if self.center_crop:
            scale = res / min(w, h)
            rw, rh = max(res, round(w * scale)), max(res, round(h * scale))
            img = img.resize((rw, rh), Image.Resampling.BICUBIC)
            top, left = (rh - res) // 2, (rw - res) // 2
            img = img.crop((left, top, left + res, top + res))
        else:
            img = img.resize((res, res), Image.Resampling.BICUBIC)
            top = left = 0
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (h, w), (top, left)


def collate_images(items: list[dict]) -> dict:
    return {
        "pixel_values": None if items[0]["pixel_values"] is None else torch.stack([it["pixel_values"] for it in items]),
        "captions": [it["caption"] for it in items],
        "image_index": torch.tensor([it["image_index"] for it in items]),
        "original_size": torch.tensor([it["original_size"] for it in items], dtype=torch.float32),
        "crop_top_left": torch.tensor([it["crop_top_left"] for it in items], dtype=torch.float32),
        "target_size": torch.tensor([it["target_size"] for it in items], dtype=torch.float32),
    }
