"""Masks: which pixels of a training image are the subject, so the loss can leave the background alone.

Three ways to give them, matching the tools users come from:
- `mask_dir` (kohya's `conditioning_data_dir` in a dataset TOML): a folder of masks named as the images (same
  relative path and stem, any image extension); the mask's R channel (or its one channel) is the weight;
- `alpha_mask: true` (kohya's subset key): the image's own alpha channel;
- OneTrainer's `<image stem>-masklabel.png` beside an image: found without a key. Such files are never training images.

A mask is 0..1 (255 = subject) at its image's size. It is checked when the folder is scanned, before any model loads:
a mask that is missing, unreadable, of another size or all black gets one warning naming the file, and the image
is skipped or trains unmasked (`data.bad_mask`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .images import IMAGE_EXTENSIONS, MASKLABEL, open_image, regular_file


@dataclass(frozen=True)
class MaskSource:
    """Where one image's mask comes from: a mask file, or (`path` = the image) its alpha channel."""

    path: Path
    alpha: bool = False

    def fingerprint(self) -> str:
        """What the latent cache keys on: the mask file's bytes (an alpha mask is in the image's own bytes)."""
        if self.alpha:
            return "alpha"
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def find_mask(image: Path, root: Path, mask_dir: Path | None, alpha: bool) -> MaskSource | None:
    """The mask an image has, if any: the subset's mask folder first, then a -masklabel.png beside it, then (with
    alpha_mask) its alpha channel. None when it has none."""
    if mask_dir is not None:
        relative = image.relative_to(root).with_suffix("")
        for ext in IMAGE_EXTENSIONS:
            for candidate in (mask_dir / relative.with_suffix(ext), mask_dir / relative.with_suffix(ext.upper())):
                if candidate.exists() and regular_file(candidate):
                    return MaskSource(candidate)
        return None
    beside = image.with_name(image.stem + MASKLABEL)
    if beside.exists() and regular_file(beside):
        return MaskSource(beside)
    return MaskSource(image, alpha=True) if alpha else None


def read_mask(source: MaskSource, max_pixels: int | None = None):
    """The mask as an 8-bit one-channel PIL image at its image's displayed size (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    with open_image(source.path, max_pixels) as img:
        img = ImageOps.exif_transpose(img)
        if source.alpha:
            if img.mode not in ("RGBA", "LA", "PA") and not (img.mode == "P" and "transparency" in img.info):
                raise ValueError("the image has no alpha channel (alpha_mask=true needs a PNG or WebP with "
                                 "transparency)")
            return img.convert("RGBA").getchannel("A")
        if img.mode in ("L", "1", "P"):
            return img.convert("L")
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(img, dtype=np.float32)
            scale = 257.0 if array.max() > 255 else 1.0
            return Image.fromarray(np.clip(array / scale, 0, 255).astype(np.uint8), "L")
        return img.convert("RGB").getchannel("R")  # kohya reads the R channel of an RGB mask


def mask_problem(source: MaskSource, size: tuple[int, int], max_pixels: int | None = None) -> str | None:
    """Why this mask cannot be used for an image of `size` (width, height), or None when it can."""
    try:
        mask = read_mask(source, max_pixels)
    except (OSError, ValueError, SyntaxError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"cannot be read ({text})" if not source.alpha else text
    if mask.size != size:
        return (f"is {mask.size[0]}x{mask.size[1]}, its image {size[0]}x{size[1]}; a mask must have its image's "
                "size")
    if mask.getextrema()[1] == 0:
        return "is all black: no pixel is the subject, nothing would train"
    return None


def to_latent_size(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) pixel masks shrunk to the latents' (h, w) by area: a latent cell weighs the share of its pixels
    that are the subject."""
    return F.interpolate(masks.float(), size=size, mode="area")
