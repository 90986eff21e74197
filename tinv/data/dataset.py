"""The training set: every usable image of every subset, its bucket, caption and augmentations.

One epoch holds each image `num_repeats` times. `BucketBatchSampler` forms the batches: a batch never mixes
datasets or buckets, and each dataset uses its own batch size.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .buckets import closest_bucket, fit_to_bucket, make_buckets, no_upscale_bucket
from .captions import CaptionProcessor, raw_caption
from .images import list_images, load_rgb, probe, read_caption, read_metadata
from .spec import DatasetSpec, SubsetSpec, defaults_from_config, from_folder, from_toml, validate

log = logging.getLogger(__name__)

MISSING_TOKEN_MODES = ("prepend", "warn", "error")


@dataclass
class Sample:
    path: Path
    caption: str  # prefix/suffix applied; shuffling and dropout happen per step
    size: tuple[int, int]  # (width, height) as displayed
    bucket: tuple[int, int]  # (width, height) it trains at
    subset: int
    dataset: int


def _interpolation(name: str | None):
    from PIL import Image

    r = Image.Resampling
    return {"lanczos": r.LANCZOS, "nearest": r.NEAREST, "bilinear": r.BILINEAR, "bicubic": r.BICUBIC,
            "area": r.BOX, "box": r.BOX, "hamming": r.HAMMING}[name or "lanczos"]


class TrainingSet(Dataset):
    def __init__(self, specs: list[DatasetSpec], seed: int = 0, missing_token: str = "prepend",
                 cache_dir: str | None = None, vae_batch_size: int = 4, num_workers: int = 0, debug: bool = False):
        if missing_token not in MISSING_TOKEN_MODES:
            raise ConfigError(f"data.missing_token={missing_token!r}; use one of {', '.join(MISSING_TOKEN_MODES)}")
        self.specs = specs
        self.subsets: list[SubsetSpec] = [sub for ds in specs for sub in ds.subsets]
        self.missing_token, self.debug = missing_token, debug
        self.cache_dir, self.vae_batch_size, self.num_workers = cache_dir, vae_batch_size, num_workers
        self.processors = [CaptionProcessor(sub) for sub in self.subsets]
        self.seed = seed
        self.prompts = None  # PromptBuilder, set by the trainer: items then carry their training prompt
        self.samples: list[Sample] = []
        self.order: list[int] = []  # epoch positions -> sample index, repeats expanded
        subset_index = 0
        for d, ds in enumerate(specs):
            for sub in ds.subsets:
                for sample in self._scan(sub, ds, subset_index, d):
                    self.order += [len(self.samples)] * sub.num_repeats
                    self.samples.append(sample)
                subset_index += 1
        if not self.samples:
            raise ConfigError("no usable image in " + ", ".join(s.source for s in self.subsets) +
                              "; add png, jpg, jpeg, webp or bmp files")
        self.cached = False  # set by the latent cache: items then carry no pixels

    # ---- scanning ---------------------------------------------------------------------------------------------------

    def _scan(self, sub: SubsetSpec, ds: DatasetSpec, subset_index: int, dataset_index: int) -> list[Sample]:
        root = Path(sub.image_dir).expanduser()
        if not root.is_dir():
            raise ConfigError(f"{sub.source}: image_dir={str(root)!r} does not exist or is not a folder")
        captions = read_metadata(sub.metadata_file, sub.caption_separator) if sub.metadata_file else None
        paths = list_images(root)
        if captions is not None:
            paths = [p for p in paths if str(p) in captions or p.stem in captions or
                     str(p.relative_to(root)) in captions]
        if not paths:
            raise ConfigError(f"{sub.source}: image_dir={str(root)!r} holds no images (png, jpg, jpeg, webp, bmp)")
        buckets = self._bucket_list(ds)
        samples, skipped = [], 0
        for path in paths:
            size = probe(path)
            if size is None:
                skipped += 1
                continue
            if captions is not None:
                text = captions.get(str(path), captions.get(str(path.relative_to(root)), captions.get(path.stem)))
            else:
                text = read_caption(path, sub.caption_extension)
            if text is None:
                text = sub.class_tokens or ""
            samples.append(Sample(path, raw_caption(text, sub), size, self._bucket(size, ds, buckets),
                                  subset_index, dataset_index))
        if skipped:
            log.warning("%s: skipped %d of %d files that are not readable images", sub.source, skipped, len(paths))
        return samples

    @staticmethod
    def _bucket_list(ds: DatasetSpec) -> list[tuple[int, int]] | None:
        if not ds.enable_bucket or ds.bucket_no_upscale:
            return None
        step = ds.bucket_reso_steps
        low = ds.min_bucket_reso or min(ds.resolution) // 2
        high = ds.max_bucket_reso or max(ds.resolution) * 2
        low, high = max(step, -(-low // step) * step), max(step, high // step * step)  # whole steps, as kohya does
        return make_buckets(ds.resolution, low, high, step)

    @staticmethod
    def _bucket(size, ds: DatasetSpec, buckets) -> tuple[int, int]:
        if not ds.enable_bucket:
            return ds.resolution
        if ds.bucket_no_upscale:
            return no_upscale_bucket(size, ds.resolution, ds.bucket_reso_steps)
        return closest_bucket(size, buckets)

    # ---- samples ----------------------------------------------------------------------------------------------------

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self.samples]

    def batch_size_of(self, sample: int) -> int:
        return self.specs[self.samples[sample].dataset].batch_size

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """`key` = (epoch, position) from the batch sampler, or a bare position (epoch 0).

        Every random choice of a sample (flip, crop, caption shuffle, template) comes from an RNG seeded by
        (seed, epoch, position): the same sample gets the same choices on any process, after any resume.
        """
        epoch, position = key if isinstance(key, tuple) else (0, key)
        rng = random.Random(f"{self.seed}:{epoch}:{position}")
        index = self.order[position]
        sample, sub = self.samples[index], self.subsets[self.samples[index].subset]
        flip = sub.flip_aug and rng.random() < 0.5
        resized, (top, left) = fit_to_bucket(sample.size, sample.bucket)
        if sub.random_crop:
            top = rng.randint(0, resized[1] - sample.bucket[1])
            left = rng.randint(0, resized[0] - sample.bucket[0])
        pixels = None if self.cached else self.pixels(index, flip, (top, left), rng)
        if flip:  # SDXL's crop conditioning describes the image it sees, i.e. the mirrored one
            left = resized[0] - sample.bucket[0] - left
        caption = self.processors[sample.subset](sample.caption, rng)
        return {"pixel_values": pixels, "sample": index, "flip": flip, "caption": caption,
                "prompt": self.prompts(caption, rng) if self.prompts else caption,
                "original_size": (sample.size[1], sample.size[0]), "crop_top_left": (top, left),
                "target_size": (sample.bucket[1], sample.bucket[0])}

    def pixels(self, index: int, flip: bool, crop: tuple[int, int] | None = None,
               rng: random.Random | None = None) -> torch.Tensor:
        """The sample's image scaled to cover its bucket, cropped (centre unless `crop`), maybe mirrored, in [-1, 1]."""
        from PIL import Image

        sample = self.samples[index]
        sub, ds = self.subsets[sample.subset], self.specs[sample.dataset]
        resized, centre = fit_to_bucket(sample.size, sample.bucket)
        top, left = crop or centre
        img = load_rgb(sample.path)
        img = img.resize(resized, _interpolation(sub.resize_interpolation or ds.resize_interpolation))
        img = img.crop((left, top, left + sample.bucket[0], top + sample.bucket[1]))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if sub.color_aug:
            img = self._shift_hue(img, rng or random.Random(0))
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    @staticmethod
    def _shift_hue(img, rng: random.Random):
        from PIL import Image

        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + rng.randint(-20, 20)) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")

    def hold_out(self, fraction: float, seed: int) -> list[int]:
        """Take round(fraction x images) images (at least one) out of training; returns their sample indices."""
        count = max(1, round(fraction * len(self.samples)))
        if count >= len(self.samples):
            raise ConfigError(f"val.split={fraction} would hold out all {len(self.samples)} images; lower it")
        held = sorted(random.Random(f"holdout:{seed}").sample(range(len(self.samples)), count))
        self.order = [i for i in self.order if i not in set(held)]
        return held

    # ---- checks and debugging ---------------------------------------------------------------------------------------

    def check_token(self, token, template_kind: str) -> None:
        """Caption training: captions without the token are prepended to, warned about, or refused."""
        if template_kind != "caption":
            return
        missing = [s for s in self.samples if not token.contains_token(s.caption)]
        if not missing:
            return
        if self.missing_token == "error":
            raise ConfigError(f"{missing[0].path}: its caption {missing[0].caption!r} lacks the token "
                              f"{token.string!r} ({len(missing)} of {len(self.samples)} captions do); add it, or set "
                              "data.missing_token=prepend")
        action = "it is put first in those" if self.missing_token == "prepend" else \
            "those images teach the token nothing"
        log.warning("%d of %d captions do not contain the token %r; %s", len(missing), len(self.samples),
                    token.string, action)


def collate(items: list[dict]) -> dict:
    pixels = [it["pixel_values"] for it in items]
    return {
        "pixel_values": None if pixels[0] is None else torch.stack(pixels),
        "captions": [it["caption"] for it in items],
        "prompts": [it["prompt"] for it in items],
        "sample": torch.tensor([it["sample"] for it in items]),
        "flip": torch.tensor([it["flip"] for it in items]),
        "original_size": torch.tensor([it["original_size"] for it in items], dtype=torch.float32),
        "crop_top_left": torch.tensor([it["crop_top_left"] for it in items], dtype=torch.float32),
        "target_size": torch.tensor([it["target_size"] for it in items], dtype=torch.float32),
    }


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of one dataset and one bucket each, reshuffled every epoch from (seed, epoch).

    A batch here is global: with P processes it holds P x the dataset's batch size, and each process takes its own
    contiguous slice, so P processes see exactly what one process with the global batch would. Iteration starts at
    (`epoch`, `start`) - where a resumed run left off - and covers the rest of that epoch.
    """

    def __init__(self, data: TrainingSet, seed: int, num_processes: int = 1, rank: int = 0):
        self.data, self.seed, self.num_processes, self.rank = data, seed, num_processes, rank
        self.epoch, self.start = 0, 0

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        groups: dict[tuple, list[int]] = {}
        for position, index in enumerate(self.data.order):
            sample = self.data.samples[index]
            groups.setdefault((sample.dataset, sample.bucket), []).append(position)
        batches = []
        for (dataset, _), positions in sorted(groups.items()):
            rng.shuffle(positions)
            size = self.data.specs[dataset].batch_size * self.num_processes
            for i in range(0, len(positions), size):
                batch = positions[i:i + size]
                batch = batch[:len(batch) // self.num_processes * self.num_processes]  # equal slices per process
                if batch:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        for batch in self.batches(self.epoch)[self.start:]:
            share = len(batch) // self.num_processes
            yield [(self.epoch, p) for p in batch[self.rank * share:(self.rank + 1) * share]]

    def __len__(self) -> int:
        return len(self.batches(self.epoch)) - self.start


def build_training_set(*, family: str, batch_size: int, seed: int = 0, image_dir: str | None = None,
                       dataset_config: str | None = None, missing_token: str = "prepend", cache_dir: str | None = None,
                       vae_batch_size: int = 4, num_workers: int = 0, debug: bool = False, **keys) -> TrainingSet:
    """Hydra's entry for `data=folder`: our keys, then the kohya TOML or folder layout on top."""
    dataset_defaults, subset_defaults = defaults_from_config({**keys, "image_dir": image_dir}, batch_size)
    if dataset_config:
        specs = from_toml(dataset_config, dataset_defaults, subset_defaults)
    else:
        specs = from_folder(dataset_defaults, subset_defaults)
    validate(specs, family)
    return TrainingSet(specs, seed=seed, missing_token=missing_token, cache_dir=cache_dir,
                       vae_batch_size=vae_batch_size, num_workers=num_workers, debug=debug)
