"""The training set: every usable image of every subset, its bucket, caption and augmentations.

One epoch holds each image `num_repeats` times. `BucketBatchSampler` forms the batches: a batch never mixes
datasets or buckets, and each dataset uses its own batch size.
"""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..choices import BadMask
from ..errors import ConfigError
from ..seeds import derive_seed
from .buckets import closest_bucket, fit_to_bucket, make_buckets, no_upscale_bucket
from .captions import CaptionProcessor, raw_caption
from .images import list_images, load_rgb, probe, read_caption, read_metadata
from .masks import MaskSource, find_mask, mask_problem, read_mask
from .prompts import PromptBuilder
from .spec import DatasetSpec, SubsetSpec, defaults_from_config, from_folder, from_toml, validate

log = logging.getLogger(__name__)


@dataclass
class Sample:
    path: Path
    caption: str  # prefix/suffix applied; shuffling and dropout happen per step
    size: tuple[int, int]  # (width, height) as displayed
    bucket: tuple[int, int]  # (width, height) it trains at
    subset: int
    dataset: int
    mask: MaskSource | None = None  # which pixels are the subject (tinv.data.masks); None: every pixel counts


# PIL resampling filter for each Interpolation value (kohya's names)
RESAMPLING = {"lanczos": "LANCZOS", "nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC",
              "area": "BOX", "box": "BOX", "hamming": "HAMMING"}


def _interpolation(name: str | None):
    from PIL import Image

    return getattr(Image.Resampling, RESAMPLING[name or "lanczos"])


MAX_EPOCH = 1_000_000  # images in one epoch, repeats counted


class TrainingSet(Dataset):
    """Immutable once built: `without()` and `without_pixels()` return new sets that share the scanned samples, so
    sample indices (the latent cache's keys, validation's picks) mean the same image in all of them."""

    def __init__(self, specs: list[DatasetSpec], seed: int = 0, prompts: PromptBuilder | None = None,
                 max_image_pixels: int | None = None, bad_mask: BadMask = "unmasked"):
        if bad_mask not in BadMask.values():
            raise ConfigError(f"data.bad_mask={bad_mask!r}: use one of {', '.join(BadMask.values())}")
        self.specs = specs
        self.max_image_pixels = max_image_pixels  # None: Pillow's limit
        self.bad_mask = bad_mask
        self.subsets: list[SubsetSpec] = [sub for ds in specs for sub in ds.subsets]
        self.processors = [CaptionProcessor(sub) for sub in self.subsets]
        self.seed = seed
        self.prompts = prompts  # items carry their training prompt (token unexpanded); None = the caption itself
        self.samples: list[Sample] = []
        scanned, subset_index = [], 0
        for d, ds in enumerate(specs):
            for sub in ds.subsets:
                scanned.append((sub, self._scan(sub, ds, subset_index, d)))
                subset_index += 1
        if not any(found for _, found in scanned):
            raise ConfigError("no usable image in " + ", ".join(s.source for s in self.subsets) +
                              "; add png, jpg, jpeg, webp or bmp files")
        positions = sum(len(found) * sub.num_repeats for sub, found in scanned)
        if positions > MAX_EPOCH:  # the epoch's order is a list in memory, reshuffled every epoch
            worst = max(scanned, key=lambda pair: len(pair[1]) * pair[0].num_repeats)[0]
            raise ConfigError(f"num_repeats={worst.num_repeats} ({worst.source}) makes one epoch {positions:,} "
                              f"images, over tinv's {MAX_EPOCH:,}; repeats weigh subsets against each other, so "
                              "their ratio is what counts: lower them (e.g. 10 and 1)")
        order: list[int] = []  # epoch positions -> sample index, repeats expanded
        for sub, found in scanned:
            for sample in found:
                order += [len(self.samples)] * sub.num_repeats
                self.samples.append(sample)
        self.order: tuple[int, ...] = tuple(order)
        self.has_masks = any(sample.mask is not None for sample in self.samples)
        self.load_pixels = True  # False once the latents are cached: items then carry no pixels
        if prompts is not None:
            prompts.check_captions(self.samples)

    def _derive(self, **changes) -> "TrainingSet":
        derived = copy.copy(self)
        derived.__dict__.update(changes)
        return derived

    def without(self, held: list[int]) -> "TrainingSet":
        """The same set with these samples taken out of every epoch (held out for validation)."""
        held = set(held)
        return self._derive(order=tuple(i for i in self.order if i not in held))

    def without_pixels(self) -> "TrainingSet":
        """The same set whose items skip reading images (their latents come from a cache)."""
        return self._derive(load_pixels=False)

    # ---- scanning ---------------------------------------------------------------------------------------------------

    def _scan(self, sub: SubsetSpec, ds: DatasetSpec, subset_index: int, dataset_index: int) -> list[Sample]:
        root = Path(sub.image_dir).expanduser()
        if not root.is_dir():
            raise ConfigError(f"{self._where(sub, root)} does not exist or is not a folder")
        captions = read_metadata(sub.metadata_file, sub.caption_separator) if sub.metadata_file else None
        mask_dir = Path(sub.mask_dir).expanduser() if sub.mask_dir else None
        if mask_dir is not None and not mask_dir.is_dir():
            raise ConfigError(f"{_named_mask_dir(sub, mask_dir)} does not exist or is not a folder; give the folder "
                              "of masks named as the images")
        paths = list_images(root, mask_dir)
        if captions is not None:
            paths = [p for p in paths if str(p) in captions or p.stem in captions or
                     str(p.relative_to(root)) in captions]
        if not paths:
            raise ConfigError(f"{self._where(sub, root)} holds no images (png, jpg, jpeg, webp, bmp)")
        buckets = self._bucket_list(ds)
        samples, skipped = [], 0
        for path in paths:
            size = probe(path, self.max_image_pixels)
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
                                  subset_index, dataset_index, find_mask(path, root, mask_dir, sub.alpha_mask)))
        if skipped:
            log.warning("%s: skipped %d of %d image files that cannot be used (each named above)", sub.source, skipped,
                        len(paths))
        return self._check_masks(samples, sub, mask_dir)

    def _check_masks(self, samples: list[Sample], sub: SubsetSpec, mask_dir: Path | None) -> list[Sample]:
        """Every mask of a subset that has masks is read once here, before any model loads; an image whose mask is
        missing or unusable gets one warning and trains unmasked or is left out (data.bad_mask)."""
        if not (mask_dir or sub.alpha_mask or any(s.mask for s in samples)):
            return samples
        where = (f"in {mask_dir}" if mask_dir else "(alpha_mask=true)" if sub.alpha_mask else
                 "(<name>-masklabel.png beside it, as its neighbours have)")
        skip, kept, bad = self.bad_mask == "skip", [], 0
        for sample in samples:
            problem = (f"has no mask {where}" if sample.mask is None else
                       mask_problem(sample.mask, sample.size, self.max_image_pixels))
            if problem and sample.mask is not None:
                problem = (f"its alpha channel {problem}" if sample.mask.alpha else
                           f"its mask {sample.mask.path} {problem}")
            if problem:
                bad += 1
                log.warning("%s: %s; %s", sample.path, problem,
                            "the image is left out (data.bad_mask=skip)" if skip else
                            "it trains unmasked (data.bad_mask=skip leaves it out)")
                if skip:
                    continue
                sample = replace(sample, mask=None)
            kept.append(sample)
        log.info("%s: %d of %d images masked", sub.source, len(samples) - bad, len(samples))
        return kept

    @staticmethod
    def _where(sub: SubsetSpec, root: Path) -> str:
        """The subset's folder as the user gave it (named once)."""
        return sub.source if str(root) in sub.source else f"{sub.source}: image_dir={str(root)!r}"

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

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """`key` = (epoch, position) from the batch sampler, or a bare position (epoch 0).

        Every random choice of a sample (flip, crop, caption shuffle, template) comes from an RNG seeded by
        (seed, epoch, position): the same sample gets the same choices on any process, after any resume.
        """
        epoch, position = key if isinstance(key, tuple) else (0, key)
        return self._item(self.order[position], random.Random(f"{self.seed}:{epoch}:{position}"), augment=True)

    def fixed_item(self, index: int, rng: random.Random) -> dict:
        """Sample `index` unflipped and centre-cropped, its caption and prompt drawn from `rng` (validation)."""
        return self._item(index, rng, augment=False)

    def _item(self, index: int, rng: random.Random, augment: bool) -> dict:
        sample, sub = self.samples[index], self.subsets[self.samples[index].subset]
        flip = augment and sub.flip_aug and rng.random() < 0.5
        resized, (top, left) = fit_to_bucket(sample.size, sample.bucket)
        if augment and sub.random_crop:
            top = rng.randint(0, resized[1] - sample.bucket[1])
            left = rng.randint(0, resized[0] - sample.bucket[0])
        pixels = self.pixels(index, flip, (top, left), rng if augment else None) if self.load_pixels else None
        mask = self.mask(index, flip, (top, left)) if self.load_pixels and self.has_masks else None
        if flip:  # SDXL's crop conditioning describes the image it sees, i.e. the mirrored one
            left = resized[0] - sample.bucket[0] - left
        caption = self.processors[sample.subset](sample.caption, rng)
        return {"pixel_values": pixels, "mask": mask, "sample": index, "flip": flip, "caption": caption,
                "prompt": self.prompts(caption, rng) if self.prompts else caption,
                "original_size": (sample.size[1], sample.size[0]), "crop_top_left": (top, left),
                "target_size": (sample.bucket[1], sample.bucket[0])}

    def pixels(self, index: int, flip: bool, crop: tuple[int, int] | None = None,
               rng: random.Random | None = None) -> torch.Tensor:
        """The sample's image scaled to cover its bucket, cropped (centre unless `crop`), maybe mirrored, in [-1, 1];
        with `rng`, the subset's colour jitter too."""
        from PIL import Image

        sample = self.samples[index]
        sub, ds = self.subsets[sample.subset], self.specs[sample.dataset]
        resized, centre = fit_to_bucket(sample.size, sample.bucket)
        top, left = crop or centre
        img = load_rgb(sample.path, self.max_image_pixels, keep_transparent=sub.alpha_mask)
        img = img.resize(resized, _interpolation(sub.resize_interpolation or ds.resize_interpolation))
        img = img.crop((left, top, left + sample.bucket[0], top + sample.bucket[1]))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if sub.color_aug and rng is not None:
            img = self._shift_hue(img, rng)
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def mask(self, index: int, flip: bool, crop: tuple[int, int] | None = None) -> torch.Tensor:
        """The sample's mask through the same resize, crop and flip as its pixels: (1, height, width) in [0, 1];
        all ones for an image without a mask."""
        from PIL import Image

        sample = self.samples[index]
        if sample.mask is None:
            return torch.ones(1, sample.bucket[1], sample.bucket[0])
        resized, centre = fit_to_bucket(sample.size, sample.bucket)
        top, left = crop or centre
        img = read_mask(sample.mask, self.max_image_pixels).resize(resized, Image.Resampling.BILINEAR)
        img = img.crop((left, top, left + sample.bucket[0], top + sample.bucket[1]))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None].contiguous()

    @staticmethod
    def _shift_hue(img, rng: random.Random):
        from PIL import Image

        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + rng.randint(-20, 20)) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")

    def held_out(self, fraction: float, seed: int) -> list[int]:
        """round(fraction x images) sample indices (at least one), picked by seed, to keep out of training."""
        count = max(1, round(fraction * len(self.samples)))
        if count >= len(self.samples):
            raise ConfigError(f"val.split={fraction} would hold out all {len(self.samples)} images; lower it")
        return sorted(random.Random(f"holdout:{seed}").sample(range(len(self.samples)), count))


def _named_mask_dir(sub: SubsetSpec, mask_dir: Path) -> str:
    """The mask folder as the user gave it: data.mask_dir=... or the TOML subset's key."""
    if sub.source.startswith("data.image_dir") or sub.source == str(Path(sub.image_dir or "").expanduser()):
        return f"data.mask_dir={str(mask_dir)!r}"
    return f"{sub.source}: mask_dir={str(mask_dir)!r}"


def collate(items: list[dict]) -> dict:
    pixels, masks = [it["pixel_values"] for it in items], [it.get("mask") for it in items]
    return {
        "pixel_values": None if pixels[0] is None else torch.stack(pixels),
        "mask": None if masks[0] is None else torch.stack(masks),
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
        rng = random.Random(derive_seed(self.seed, epoch))
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


def build_training_set(*, family: str, batch_size: int, seed: int = 0, prompts: PromptBuilder | None = None,
                       image_dir: str | None = None, dataset_config: str | None = None,
                       max_image_pixels: int | None = None, bad_mask: BadMask = "unmasked", **keys) -> TrainingSet:
    """Hydra's entry for `data=folder`: our keys, then the kohya TOML or folder layout on top."""
    dataset_defaults, subset_defaults = defaults_from_config({**keys, "image_dir": image_dir}, batch_size)
    if dataset_config:
        specs = from_toml(dataset_config, dataset_defaults, subset_defaults)
    else:
        specs = from_folder(dataset_defaults, subset_defaults)
    validate(specs, family)
    return TrainingSet(specs, seed=seed, prompts=prompts, max_image_pixels=max_image_pixels, bad_mask=bad_mask)
