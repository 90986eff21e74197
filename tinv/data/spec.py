"""What to train on: datasets and their subsets, from our `data.*` keys, kohya's folder convention or kohya's TOML.

A kohya dataset config is read unchanged: `[general]`, `[[datasets]]`, `[[datasets.subsets]]`. A key set on a
subset wins over its dataset, which wins over `[general]`, which wins over our own `data.*` / `train.batch_size`.
Unknown keys fail with the key and the file named; kohya keys that do not apply to textual inversion are refused
(is_reg) or ignored with a warning, never silently.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

from ..choices import Interpolation
from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

FOLDER_PATTERN = re.compile(r"^(\d+)_(.*)$")  # kohya: "<repeats>_<class tokens>"


@dataclass
class SubsetSpec:
    """A folder of images and how its captions and pixels are treated. Every field is a kohya subset key (also
    allowed at dataset and [general] level) and, with the same name and default, a `data.*` key (tinv.config derives
    the data keys from these fields: a new kohya key is one field here)."""

    image_dir: Optional[str] = None
    metadata_file: Optional[str] = None  # kohya fine-tuning metadata JSON {image: {caption, tags}} for image_dir
    num_repeats: int = 1  # times each image appears per epoch
    caption_extension: str = ".txt"
    class_tokens: Optional[str] = None  # caption of images without a caption file
    # caption processing (kohya semantics)
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: Optional[str] = None
    enable_wildcard: bool = False
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    caption_tag_dropout_rate: float = 0.0
    # augmentation (random_crop and color_aug turn latent caching off)
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    resize_interpolation: Optional[Interpolation] = None  # None = lanczos
    # masks (tinv.data.masks): which pixels are the subject; -masklabel.png files beside the images need no key
    alpha_mask: bool = False  # the image's alpha channel
    mask_dir: Optional[str] = None  # masks named as the images (kohya's conditioning_data_dir in a TOML)
    source: str = field(default="data.image_dir", metadata={"internal": True})  # where it was defined, for messages


@dataclass
class DatasetSpec:
    """Subsets that share a training size and batch size. Fields are kohya dataset keys (and `data.*` keys, except
    `batch_size`, which is `train.batch_size` there, and `subsets`)."""

    resolution: tuple[int, int] = (512, 512)  # (width, height); data.resolution defaults to the model's size
    batch_size: int = 1
    enable_bucket: bool = False  # aspect-ratio buckets of about the training area
    min_bucket_reso: Optional[int] = None  # None = half the resolution
    max_bucket_reso: Optional[int] = None  # None = twice the resolution
    bucket_reso_steps: int = 64  # 64 for SD1/SD2; SDXL allows 32
    bucket_no_upscale: bool = False
    resize_interpolation: Optional[Interpolation] = None
    subsets: list[SubsetSpec] = field(default_factory=list, metadata={"internal": True})
    source: str = field(default="data", metadata={"internal": True})  # "data" (our keys) or the TOML table


def keys_of(spec: type) -> list[str]:
    """The user-facing keys of a spec, in field order."""
    return [f.name for f in fields(spec) if not f.metadata.get("internal")]


SUBSET_KEYS = set(keys_of(SubsetSpec))
DATASET_KEYS = set(keys_of(DatasetSpec))
# kohya keys we read but cannot use for textual inversion: key -> why (a warning; the run goes on)
IGNORED = {
    "caption_dropout_rate": "caption dropout would drop the token from the prompt; kohya's TI script refuses it too",
    "caption_dropout_every_n_epochs": "caption dropout would drop the token from the prompt",
    "network_multiplier": "it applies to LoRA networks, not embeddings",
    "validation_split": "not used by this trainer's data pipeline",
    "validation_seed": "not used by this trainer's data pipeline",
    "face_crop_aug_range": "face-crop augmentation is not supported",
    "token_warmup_min": "token warm-up is not supported",
    "token_warmup_step": "token warm-up is not supported",
    "cache_info": "image sizes are read directly",
    "custom_attributes": "custom attributes are not used",
}


def _resolution(value, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):  # list, tuple, OmegaConf ListConfig
        value = list(value)
        if len(value) == 2 and all(isinstance(v, int) for v in value):
            return (int(value[0]), int(value[1]))
    raise ConfigError(f"{_named(where, 'resolution', repr(value))} must be an integer or [width, height]")


def defaults_from_config(data_cfg, batch_size: int) -> tuple[dict, dict]:
    """Our `data.*` keys as the lowest level of kohya's precedence: (dataset-level, subset-level) values."""
    dataset = {k: data_cfg[k] for k in DATASET_KEYS if k in data_cfg and k not in ("resolution", "batch_size")}
    dataset["resolution"] = data_cfg["resolution"]
    dataset["batch_size"] = batch_size
    subset = {k: data_cfg[k] for k in SUBSET_KEYS if k in data_cfg}
    return dataset, subset


def _check_keys(table: dict, allowed: set[str], where: str, path: Path) -> dict:
    table = dict(table)
    if "conditioning_data_dir" in table:  # kohya's masked loss reads a subset's conditioning images as its masks
        if "mask_dir" in table:
            raise ConfigError(f"{path}: {where} sets both conditioning_data_dir and mask_dir; keep one (both name "
                              "the folder of masks)")
        table["mask_dir"] = table.pop("conditioning_data_dir")
    kept = {}
    for key, value in table.items():
        if key in IGNORED:
            log.warning("%s: %s=%r is ignored: %s", path, key, value, IGNORED[key])
        elif key == "is_reg":
            if value:
                raise ConfigError(f"{path}: {where} has is_reg=true; regularization images do not apply to textual "
                                  "inversion - remove that subset")
        elif key not in allowed:
            raise ConfigError(f"{path}: unknown key {key!r} in {where}; see docs/data.md for the "
                              "keys tinv reads")
        else:
            kept[key] = value
    return kept


def _make_dataset(values: dict, subsets: list[SubsetSpec], where: str) -> DatasetSpec:
    values = dict(values)
    values["resolution"] = _resolution(values.get("resolution"), where)
    return DatasetSpec(**{k: v for k, v in values.items() if k in DATASET_KEYS}, subsets=subsets, source=where)


def from_toml(path: str | Path, dataset_defaults: dict, subset_defaults: dict) -> list[DatasetSpec]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.dataset_config={str(path)!r} does not exist; give the path of a kohya dataset TOML")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    for key in doc:
        if key not in ("general", "datasets"):
            raise ConfigError(f"{path}: unknown top-level table {key!r}; use [general] and [[datasets]]")
    general = _check_keys(doc.get("general", {}), DATASET_KEYS | SUBSET_KEYS, "[general]", path)
    datasets = doc.get("datasets") or []
    if not datasets:
        raise ConfigError(f"{path}: no [[datasets]] table; add one with at least one [[datasets.subsets]]")
    # our data.image_dir is not a default for TOML subsets: each names its own folder
    inherited = {k: v for k, v in subset_defaults.items() if k not in ("image_dir", "metadata_file")}
    specs = []
    for i, ds in enumerate(datasets):
        where = f"[[datasets]] #{i + 1}"
        ds = dict(ds)
        subsets_raw = ds.pop("subsets", [])
        ds = _check_keys(ds, DATASET_KEYS | SUBSET_KEYS, where, path)
        if not subsets_raw:
            raise ConfigError(f"{path}: {where} has no [[datasets.subsets]]; add one with image_dir")
        subsets = []
        for j, sub in enumerate(subsets_raw):
            sub_where = f"{where} subset #{j + 1}"
            sub = _check_keys(sub, SUBSET_KEYS, sub_where, path)
            merged = {**inherited, **{k: v for k, v in general.items() if k in SUBSET_KEYS},
                      **{k: v for k, v in ds.items() if k in SUBSET_KEYS}, **sub}
            if not merged.get("image_dir"):
                raise ConfigError(f"{path}: {sub_where} has no image_dir")
            subsets.append(SubsetSpec(**merged, source=f"{path} {sub_where}"))
        dataset_values = {**dataset_defaults, **{k: v for k, v in general.items() if k in DATASET_KEYS},
                          **{k: v for k, v in ds.items() if k in DATASET_KEYS}}
        specs.append(_make_dataset(dataset_values, subsets, f"{path} {where}"))
    return specs


def from_folder(dataset_defaults: dict, subset_defaults: dict) -> list[DatasetSpec]:
    """`data.image_dir`: one subset, or one per kohya `<repeats>_<class tokens>` subfolder."""
    image_dir = subset_defaults.get("image_dir")
    if not image_dir:
        raise ConfigError("data.image_dir is not set; pass data.image_dir=/path/to/images (or data.dataset_config)")
    root = Path(image_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.image_dir={str(root)!r} does not exist or is not a folder")
    base = SubsetSpec(**subset_defaults)
    kohya = sorted(d for d in root.iterdir() if d.is_dir() and FOLDER_PATTERN.match(d.name))
    if kohya:
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp",
                                                                                  ".bmp")]
        if loose:
            log.warning("data.image_dir=%s uses <repeats>_<class tokens> subfolders; the %d images directly in it "
                        "are not used", root, len(loose))
        subsets = []
        for d in kohya:
            repeats, tokens = FOLDER_PATTERN.match(d.name).groups()
            subsets.append(replace(base, image_dir=str(d), num_repeats=int(repeats),
                                   class_tokens=tokens.strip() or base.class_tokens, source=str(d)))
    else:
        subsets = [replace(base, image_dir=str(root), source=f"data.image_dir={root}")]
    return [_make_dataset(dataset_defaults, subsets, "data")]


def _named(source: str, key: str, value) -> str:
    """A setting as the user gave it: `data.key=value` for our own keys, else the TOML table and the key."""
    if source == "data" or source.startswith("data.image_dir"):
        return f"data.{key}={value}"
    return f"{source}: {key}={value}"


def validate(specs: list[DatasetSpec], family: str) -> None:
    """Value checks naming the key where the user set it; run before any image or model is read."""
    for ds in specs:
        step = ds.bucket_reso_steps
        if step % 8 or step <= 0:
            raise ConfigError(f"{_named(ds.source, 'bucket_reso_steps', step)} must be a positive multiple of 8")
        if family != "sdxl" and step % 64:
            raise ConfigError(f"{_named(ds.source, 'bucket_reso_steps', step)} must be a multiple of 64 for {family} "
                              "models (32 is allowed for SDXL)")
        if min(ds.resolution) < 8 or any(r % 8 for r in ds.resolution):
            shown = ds.resolution[0] if ds.resolution[0] == ds.resolution[1] else list(ds.resolution)
            raise ConfigError(f"{_named(ds.source, 'resolution', shown)} must be a positive multiple of 8 on each side (e.g. 512)")
        if ds.batch_size < 1:
            raise ConfigError(f"{_named(ds.source, 'batch_size', ds.batch_size)} must be at least 1")
        for sub in [ds, *ds.subsets]:
            interp = sub.resize_interpolation
            if interp is not None and interp not in Interpolation.values():
                raise ConfigError(f"{_named(sub.source, 'resize_interpolation', repr(interp))}: use one of "
                                  f"{', '.join(Interpolation.values())}")
        for sub in ds.subsets:
            if not sub.caption_separator:
                raise ConfigError(f"{_named(sub.source, 'caption_separator', repr(''))}: it is empty; use e.g. ',' "
                                  "(the default)")
            if sub.num_repeats < 1:
                raise ConfigError(f"{_named(sub.source, 'num_repeats', sub.num_repeats)} must be at least 1")
            if not 0.0 <= sub.caption_tag_dropout_rate < 1.0:
                raise ConfigError(f"{_named(sub.source, 'caption_tag_dropout_rate', sub.caption_tag_dropout_rate)} "
                                  "must be in [0, 1)")
            if sub.keep_tokens < 0:
                raise ConfigError(f"{_named(sub.source, 'keep_tokens', sub.keep_tokens)} must be 0 or more")
