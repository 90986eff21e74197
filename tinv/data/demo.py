"""The built-in demo set: a few generated images of one concept with captions, so a run needs no input.

The concept is a red disc with a white ring, drawn at varied sizes and places on four backgrounds. The images are
written once to $TINV_CACHE/demo/<version> and then read like any image folder.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

from ..backbone.tiny import cache_root
from .dataset import TrainingSet, build_training_set

DEMO_VERSION = "v1"
BACKGROUNDS = {"blue": (40, 70, 200), "green": (40, 160, 70), "gray": (128, 128, 128), "yellow": (230, 200, 40)}


def write_demo_images(out_dir: Path, count: int = 8, size: int = 96, seed: int = 0) -> Path:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        for i in range(count):
            name, colour = list(BACKGROUNDS.items())[i % len(BACKGROUNDS)]
            img = Image.new("RGB", (size, size), colour)
            draw = ImageDraw.Draw(img)
            radius = rng.uniform(0.22, 0.36) * size
            cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(220, 30, 30),
                         outline=(255, 255, 255), width=max(2, size // 32))
            img.save(staging / f"{i:03d}.png")
            (staging / f"{i:03d}.txt").write_text(f"a red circle on a {name} background\n", encoding="utf-8")
        try:
            os.replace(staging, out_dir)
        except OSError:
            if not out_dir.is_dir():  # a parallel job may have written it first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def demo_images_dir() -> Path:
    path = cache_root() / "demo" / DEMO_VERSION
    if not path.is_dir():
        write_demo_images(path)
    return path


def demo_dataset(image_dir: str | None = None, **kwargs) -> TrainingSet:
    """The training set of the demo images (or of `image_dir` when one is given), with every data.* key honoured."""
    return build_training_set(image_dir=image_dir or str(demo_images_dir()), **kwargs)
