"""The built-in demo set (`data=demo`): images of the toy world's demo concept, so a run needs no input.

The concept ("yellow triangle on a navy background", tinv.toy.world.DEMO_CONCEPT) was left out of the toy model's
pretraining: the token has to learn it from these images alone. They are rendered once into
$TINV_CACHE/demo/<version> with full captions and then read like any image folder; `data.image_dir` points the
same entry at another folder (e.g. one written by `tinv-toy render`).
"""

from __future__ import annotations

from pathlib import Path

from ..cache import cache_root, cached_folder
from ..data import TrainingSet, build_training_set
from .world import DEMO_CONCEPT, Concept, write_concept_images

DEMO_VERSION = "v2"
DEMO_IMAGES = 8


def demo_images_dir() -> Path:
    return cached_folder(cache_root() / "demo" / DEMO_VERSION,
                         lambda folder: write_concept_images(Concept(*DEMO_CONCEPT), DEMO_IMAGES, folder))


def demo_dataset(image_dir: str | None = None, **kwargs) -> TrainingSet:
    """The training set of the demo images (or of `image_dir` when one is given), with every data.* key honoured."""
    return build_training_set(image_dir=image_dir or str(demo_images_dir()), **kwargs)
