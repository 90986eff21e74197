"""Structured-config schemas: the primary config is typed, so a misspelled key or a value outside its allowed set
fails when Hydra composes it.

Group choices live as small YAML files in `conf/`; these dataclasses give each node its keys, types and limits.
Allowed values are the enums of tinv.choices; lower limits sit on the fields (`at_least`) and `check_values`
enforces them with the key named. The data keys are derived from the kohya dataset spec (tinv.data.spec), so a new
kohya key is one field there. `optimizer`, `scheduler`, `parts` and `callbacks` stay open (`_target_` plus that
callable's own arguments), checked against the callable when the run is built, before any model loads.
"""

# No postponed annotations here: the dataclass field types must be real types (OmegaConf and check_values read them).
import logging
import math
import re
import secrets
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from typing import Any, Dict, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, OmegaConf, open_dict

from .choices import (BackgroundWith, BadMask, Family, InitFrom, LoraFormat, LrScale, MissingToken, Mode, Precision,
                      PredictionType, PreserveWith, Reduce, SaveFormat, Sampler, SubjectKind, TemplateKind, TokenNorm,
                      TrackerMode, TrainEncoders)
from .data.spec import DatasetSpec, SubsetSpec, keys_of
from .errors import ConfigError
from .sweeping.jobs import job_folder_name

log = logging.getLogger(__name__)

NAME_WORD = re.compile(r"[^\W][\w.+-]*")  # output_name: a file name and the word written in prompts
FILE_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")


# `_target_` paths that moved when tinv/ was laid out by purpose: a config of one's own that still names one fails at
# composition with one line naming the new path
MOVED_TARGETS = {"tinv.parts.TokenVectors": "tinv.trained.token.TokenVectors",
                 "tinv.lora.LoraWeights": "tinv.trained.lora.LoraWeights",
                 "tinv.report.AnnounceBestJob": "tinv.sweeping.best.AnnounceBestJob"}


def check_moved_targets(node, key: str = "") -> None:
    """Every `_target_` in a config (a plain container) that names a moved path is one line naming the new one."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str) and target in MOVED_TARGETS:
            where = f"{key}._target_" if key else "_target_"
            raise ConfigError(f"{where}={target} has moved to {MOVED_TARGETS[target]}; write that in your config")
        for name, value in node.items():
            check_moved_targets(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_moved_targets(value, f"{key}[{i}]")


def at_least(minimum: int, default: Any) -> Any:
    """A field whose value (when set) must be >= minimum; `check_values` says so naming the key."""
    return field(default=default, metadata={"min": minimum})


def within(low: float, high: float, default: Any, high_open: bool = False) -> Any:
    """A number field in [low, high] ([low, high) with high_open); `check_values` says so naming the key."""
    return field(default=default, metadata={"min": low, "max": (high, high_open)})


def moved_to(new_key: str) -> Any:
    """A deprecated key: still accepted (its value goes to `new_key`, with a warning), shown as where it went."""
    return field(default=f"moved to {new_key}", metadata={"moved_to": new_key})


@dataclass
class ModelConfig:
    _target_: str = "tinv.backbone.Backbone.from_pretrained"
    name: Optional[str] = None  # the model= choice (each conf/model file sets it); embedding files record it
    family: Family = MISSING
    path: str = MISSING  # hub id, local diffusers folder, or single .safetensors/.ckpt file (original layout)
    config_dir: Optional[str] = None  # single files: local diffusers folder of the same family (configs, tokenizers)
    vae: Optional[str] = None  # replacement VAE: diffusers folder or single file
    v_parameterization: bool = False  # kohya's flag: same as prediction_type=v_prediction
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. fp16 weights in a hub repo
    resolution: int = 512  # the model's native resolution; data.resolution defaults to it
    prediction_type: Optional[PredictionType] = None  # None = from the model's scheduler config
    clip_skip: int = at_least(1, 1)  # SD1/SD2: 2 = penultimate layer + final layer norm (A1111 convention)


@dataclass
class TokenConfig:
    string: str = "mychar"  # the trigger word; must be new to every tokenizer of the model
    init_word: Optional[str] = None  # seed the vectors from this word's token embeddings
    num_vectors: Optional[int] = at_least(1, None)  # None = 1, or the row count of token.weights
    weights: Optional[str] = None  # continue from an existing embedding file
    norm: TokenNorm = "none"  # keep the vectors near real word embeddings
    norm_weight: float = 0.01  # l2_to_init: weight of ||v - v_init||^2 in the loss
    init_from: InitFrom = "output"  # init_word's encoder output (Cross Initialization) or its token embedding
    context_weight: float = 0.0  # > 0: keep the rest of a prompt's encoding as with init_word (needs init_word)
    context_prompts: Optional[list[str]] = None  # prompts with "{}" for the token and other content; None = built-in
    train_encoders: TrainEncoders = "both"  # SDXL: one encoder only; the other keeps its initial vectors
    stop_frac: float = 1.0  # the vectors train for this fraction of train.max_steps, then stay (method=pivotal: 0.5)


@dataclass
class LoraConfig:
    """lora.*: the LoRA that method=pivotal trains beside the vectors (tinv/trained/lora.py); method=ti ignores these."""

    rank: int = at_least(1, 4)
    alpha: Optional[float] = None  # None = rank (scale alpha/rank = 1)
    dropout: float = within(0.0, 1.0, 0.0, high_open=True)  # on the LoRA's input, training steps only
    lr: float = 1e-4  # its own learning rate (the vectors keep optimizer.lr)
    text_encoder: bool = False  # also LoRA in the text encoders' attention
    text_encoder_lr: Optional[float] = None  # None = lora.lr
    unet_targets: Optional[list[str]] = None  # module-name endings; None = every attention projection (to_q, to_k,
    # to_v, to_out.0: tinv.trained.lora.UNET_TARGETS)
    unet_levels: Optional[list[int]] = None  # only these resolution levels (0 = the latent's size, 1 = halved once..)
    text_encoder_targets: Optional[list[str]] = None  # None = q_proj, k_proj, v_proj, out_proj
    start_frac: float = within(0.0, 1.0, 0.0)  # the LoRA trains from this fraction of train.max_steps ...
    stop_frac: float = within(0.0, 1.0, 1.0)  # ... to this one
    background_prior: float = at_least(0, 10.0)  # with masks: where the mask is off, pull the prediction to the
    # model's own without the LoRA (the vectors kept), so the LoRA learns nothing of the background (10 and the
    # margin 0.2: measured on the toy world, docs/measurements.md; no masks, no term)
    background_with: BackgroundWith = "caption"  # the prompts the prior holds: caption = the batch's own; context =
    # lora.preserve_prompts with the token (e.g. "a {} on a gray background"): the background stays the prompt's
    background_margin: float = within(0.0, 0.5, 0.2)  # the prior leaves a band this wide (a fraction of the
    # latent's shorter side) around the subject free: the LoRA may draw an outline there the vectors cannot
    preserve_weight: float = at_least(0, 0.0)  # > 0: keep the UNet's output for preserve_prompts as the frozen model's
    preserve_prompts: Optional[list[str]] = None  # "{}" = token.init_word; None = token.context_prompts
    preserve_with: PreserveWith = "word"  # word: the init word's prompts, the frozen model as teacher; token: the
    # token's prompts, the vectors without the LoRA as teacher; edit: what the prompts' other words change against
    # "a <token>", the vectors without the LoRA as teacher; context: no UNet pass, the cross-attention keys and values
    # of every position but the token's in the prompts ("{}" = the token), relative (needs attn2.to_k/to_v targets)


@dataclass
class TemplateConfig:
    kind: TemplateKind = "object"
    templates: Optional[list[str]] = None  # custom prompt list with "{}" for the token; None = the built-in list


@dataclass
class DataOptions:
    """The data.* keys that are tinv's own: how captions without the token are treated and how data loads."""

    dataset_config: Optional[str] = None  # a kohya dataset TOML; its datasets/subsets replace image_dir
    missing_token: MissingToken = "prepend"  # a caption lacks the token (template=caption)
    cache_dir: Optional[str] = None  # disk latent cache (train.cache_latents_to_disk); None = $TINV_CACHE/latents
    vae_batch_size: int = at_least(1, 4)
    # images with more pixels are skipped with a warning (decompression bombs); None = Pillow's limit (89.5 Mpx)
    max_image_pixels: Optional[int] = at_least(1, None)
    num_workers: int = 0
    bad_mask: BadMask = "unmasked"  # an image whose mask is missing or unusable trains unmasked, or is skipped
    debug: bool = False  # print the first samples' captions, token ids and buckets, then exit


# data.* keys that are read where the data loads, not by the dataset builder
LOADING_KEYS = ("missing_token", "cache_dir", "vae_batch_size", "num_workers", "debug")


def _data_config() -> type:
    """data.*: tinv's own keys, then every kohya subset and dataset key (batch_size is train.batch_size), with the
    model's resolution as the default size. Our data keys are the lowest level of kohya's precedence."""
    spec: list = [("_target_", str, field(default="tinv.data.build_training_set"))]
    spec += [(f.name, get_type_hints(DataOptions)[f.name], field(default=f.default, metadata=f.metadata))
             for f in fields(DataOptions)]
    seen = {"batch_size"}
    for cls in (SubsetSpec, DatasetSpec):
        hints, defaults = get_type_hints(cls), {f.name: f for f in fields(cls)}
        for key in keys_of(cls):
            if key in seen:
                continue
            seen.add(key)
            if key == "resolution":  # int or [width, height]
                spec.append((key, Any, field(default=II("model.resolution"))))
            else:
                assert defaults[key].default is not NO_DEFAULT, key
                spec.append((key, hints[key], field(default=defaults[key].default)))
    return make_dataclass("DataConfig", spec)


DataConfig = _data_config()


@dataclass
class TrainConfig:
    max_steps: int = at_least(1, 1000)
    batch_size: int = at_least(1, 4)
    gradient_accumulation: int = at_least(1, 1)
    seed: int = 42
    mixed_precision: Precision = "no"
    gradient_checkpointing: bool = False
    cache_latents: bool = True  # encode every image once, in memory
    cache_latents_to_disk: bool = False  # and keep them in data.cache_dir across runs
    no_half_vae: Optional[bool] = None  # keep the VAE fp32 under mixed precision; None = yes for SDXL
    max_grad_norm: Optional[float] = None  # over every trained tensor together
    log_every_n_steps: int = at_least(1, 1)
    cpu: bool = False  # force the CPU even when an accelerator is present
    num_threads: Optional[int] = at_least(1, None)  # CPU threads; None = the launcher's, or a share of the cores
    # loss options
    noise_offset: float = 0.0
    min_snr_gamma: Optional[float] = 5.0  # Min-SNR loss weighting (null: plain mean squared error)
    min_timestep: int = 0
    max_timestep: Optional[int] = None  # None = the schedule's length
    lr_scale: LrScale = "none"  # batch: lr x batch x accumulation x processes (the original TI rule)
    max_bad_steps: int = at_least(1, 10)  # consecutive non-finite steps before the run stops
    check_memory: bool = True  # refuse at start a resolution or batch the free memory cannot hold (tinv.memory)
    # speed and memory
    compile: bool = False  # torch.compile the UNet
    cache_text_encoder_outputs: bool = False  # SDXL with token.train_encoders=clip_l|clip_g: cache the frozen one


@dataclass
class LossConfig:
    """loss.*: how masks weigh the diffusion loss (tinv.losses); a run without masks ignores these."""

    mask_weight: float = within(0.0, 1.0, 0.1)  # the background's weight (the subject's is 1); 0 = kohya's masked loss
    unmasked_prob: float = within(0.0, 1.0, 0.0, high_open=True)  # share of samples trained without their mask
    normalize_area: bool = True  # divide each sample's loss by its mean weight: a small subject trains as a large one


# DreamBench's kinds of prompt for a subject (recontextualisation, property, accessory) and for a style
SUBJECT_PROMPTS = ["a {} in the jungle", "a {} on the beach", "a {} in the snow", "a {} on top of a wooden floor",
                   "a {} with a city in the background", "a red {}", "a shiny {}", "a {} wearing a red hat"]
STYLE_PROMPTS = ["a painting of a house in the style of {}", "a cat in the style of {}",
                 "a portrait of a woman in the style of {}", "a city street at night in the style of {}",
                 "a bowl of fruit in the style of {}", "a mountain lake in the style of {}",
                 "a ship at sea in the style of {}", "a dog in the style of {}"]


@dataclass
class ScoreConfig:
    """score.*: the fidelity scorer's settings (scorer=fidelity, tinv.scoring); it samples as sample.* says."""

    clip: str = "openai/clip-vit-base-patch32"  # hub id or folder: CLIP-I and CLIP-T (the TI paper's, DreamBench's)
    dino: str = "facebook/dino-vits16"  # hub id or folder: DINO (DreamBench's ViT-S/16)
    subject_prompts: list[str] = field(default_factory=lambda: list(SUBJECT_PROMPTS))  # template.kind object, caption
    style_prompts: list[str] = field(default_factory=lambda: list(STYLE_PROMPTS))  # template.kind style
    kind: Optional[SubjectKind] = None  # object | style prompts; None = template.kind's (caption scores as object)
    num_samples: int = at_least(1, 4)  # samples of "a photo of <token>" (subject fidelity), one seed each
    prompt_samples: int = at_least(1, 1)  # samples of each prompt (prompt fidelity)


# save.*, sample.* and val.* are the user-facing settings of the callbacks in conf/callbacks/default.yaml, which
# read them by interpolation; `callbacks.<name>.<key>=...` sets a callback's value directly.

@dataclass
class SaveConfig:
    format: SaveFormat = "safetensors"  # pt = A1111's torch layout
    every_n_steps: int = at_least(0, 0)  # 0 = only the final embedding
    state_every_n_steps: int = at_least(0, 0)  # resumable state in <run dir>/state (0 = off; Ctrl-C still writes it)
    lora_format: LoraFormat = "kohya"  # method=pivotal's <name>-lora file: kohya (A1111/ComfyUI/diffusers) or diffusers
    lora_bundle: bool = True  # also <name>-bundle: the kohya LoRA with the embedding inside (A1111/Forge)


@dataclass
class SampleConfig:
    every_n_steps: int = at_least(0, 0)  # preview images every N steps (0 = off)
    at_start: bool = False  # also before the first step
    prompts: Any = None  # a list of prompts, or a kohya-style prompts file; None = "a photo of <token>"
    sampler: Sampler = "euler_a"
    steps: int = at_least(1, 20)
    guidance_scale: float = 7.0
    negative_prompt: str = ""
    width: Optional[int] = None  # None = the model's resolution
    height: Optional[int] = None
    seed: int = 0


@dataclass
class ValConfig:
    every_n_steps: int = at_least(0, 0)  # deterministic val/loss every N steps (0 = off)
    split: float = 0.0  # fraction of the images held out for validation; 0 = validate on the training images
    max_images: int = at_least(1, 16)
    num_timesteps: int = at_least(1, 8)  # fixed timesteps spread over the schedule, each image scored at every one
    seed: int = 0
    # deprecated: the toy model's concept scoring is the callbacks.concept callback (conf/world/toy.yaml)
    judge: Any = moved_to("callbacks.concept.judge")
    concept: Any = moved_to("callbacks.concept.concept")
    num_samples: Any = moved_to("callbacks.concept.num_samples")
    guidance_scale: Any = moved_to("callbacks.concept.guidance_scale")


@dataclass
class ObjectiveConfig:
    """What the run reports as `objective` (summary.json, the sweep's return value, tinv-report's ranking)."""

    metric: str = "val/loss"  # any logged metric; a run that never logged it reports its final train/loss
    mode: Mode = "min"  # which way is better (Optuna's direction follows it)
    reduce: Reduce = "best"  # best: its best value over the run; last: its value at the end


@dataclass
class LoggerConfig:
    _target_: str = "tinv.tracking.WandbTracker"
    project: str = "tinv"
    mode: Optional[TrackerMode] = None  # None = online when an API key is set, else offline
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    log_embedding: bool = False  # upload the final embedding as a wandb artifact


@dataclass
class BenchConfig:
    steps: int = at_least(1, 10)  # timed optimizer steps
    warmup: int = at_least(0, 3)  # untimed steps first
    cache_images: int = 0  # > 0: train on this many generated images at data.resolution and time the latent cache


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    token: TokenConfig = field(default_factory=TokenConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    val: ValConfig = field(default_factory=ValConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)  # tinv-bench only
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    parts: Dict[str, Any] = field(default_factory=dict)  # what trains: name -> _target_ node (tinv.parts)
    callbacks: Dict[str, Any] = field(default_factory=dict)  # name -> _target_ node (tinv.callbacks)
    output_name: Optional[str] = None  # the files' stem and the word written in prompts; None = token.string
    resume: Optional[str] = None  # a run dir or its state dir, or "latest" (the newest state under outputs/)


def _fields_with(schema: type, node, meta: str, prefix: str = ""):
    """(key, parent node, field name, metadata value) for every field of the schema carrying `meta`, recursing."""
    present = set(node.keys())  # not `in node`, which resolves interpolations (and would write model folders)
    for f in fields(schema):
        if f.name not in present:
            continue
        if is_dataclass(f.type):
            yield from _fields_with(f.type, node[f.name], meta, f"{prefix}{f.name}.")
        elif meta in f.metadata:
            yield f"{prefix}{f.name}", node, f.name, f.metadata[meta]


def apply_deprecated(cfg) -> None:
    """Move each deprecated key's value, when one was given, to its new place (one warning line each)."""
    for old, node, name, new in _fields_with(RunConfig, cfg, "moved_to"):
        value = node[name]
        if value == f"moved to {new}":
            continue
        node[name] = f"moved to {new}"
        log.warning("%s is deprecated; use %s", old, new)
        owner = new.rsplit(".", 1)[0]
        if OmegaConf.select(cfg, owner) is None:
            if value is None:
                continue
            raise ConfigError(f"{old}={value}: that setting belongs to {owner}, which this config does not have "
                              f"(concept scoring comes with model=toy, from conf/world/toy.yaml)")
        if old == "val.judge" and value is None:  # val.judge=null turned concept scoring off
            with open_dict(cfg.callbacks):
                del cfg.callbacks["concept"]
            continue
        OmegaConf.update(cfg, new, value, force_add=True)


def recorded_config(cfg) -> dict:
    """The resolved config as plain data for the dashboard, each setting once (no deprecated keys)."""
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key, _, name, _ in _fields_with(RunConfig, cfg, "moved_to"):
        node = plain
        for part in key.split(".")[:-1]:
            node = node[part]
        node.pop(name, None)
    return plain


def _unknown_keys(schema: type, node, prefix: str = ""):
    """(key, its siblings in the schema) for keys of typed nodes that the schema does not have (added with `+`)."""
    known = {f.name: f for f in fields(schema)}
    for key in node.keys():
        if key not in known:
            yield f"{prefix}{key}", [f"{prefix}{k}" for k in known]
        elif is_dataclass(known[key].type):
            yield from _unknown_keys(known[key].type, node[key], f"{prefix}{key}.")


def _numbers(node, prefix: str = ""):
    """(key, value) for every number written in a plain config tree (interpolations are strings: left out)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(value, (dict, list)):
            yield from _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def check_values(cfg) -> None:
    """Keys the schema does not know, and value checks that types cannot express; raises ConfigError naming the
    key."""
    import difflib

    check_moved_targets(OmegaConf.to_container(cfg, resolve=False))
    for key, siblings in _unknown_keys(RunConfig, cfg):
        close = difflib.get_close_matches(key, siblings, n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "`tinv-train --cfg job` lists every key"
        raise ConfigError(f"{key} is not a key tinv reads, so it would do nothing; {hint}")
    for key, value in _numbers(OmegaConf.to_container(cfg, resolve=False)):
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")
        if key.rsplit(".", 1)[-1] in ("lr", "text_encoder_lr") and not 0 <= value <= 1000:  # 0: keep the start
            raise ConfigError(f"{key}={value} " + ("must be at least 0: a learning rate" if value < 0 else
                              "is above 1000: no optimizer trains at that step size (a typo?)"))
    if not 0.0 <= cfg.train.noise_offset <= 1.0:
        raise ConfigError(f"train.noise_offset={cfg.train.noise_offset} must be in [0, 1] (0.05 to 0.1 is usual): "
                          "the offset is added to noise of scale 1")
    highs = {key: high for key, _, _, high in _fields_with(RunConfig, cfg, "max")}  # within(): (high, open)
    for key, node, name, minimum in _fields_with(RunConfig, cfg, "min"):
        value, (high, high_open) = node[name], highs.get(key, (None, False))
        if value is None:
            continue
        if high is not None and not (minimum <= value and (value < high if high_open else value <= high)):
            raise ConfigError(f"{key}={value} must be in [{minimum}, {high}{')' if high_open else ']'}")
        if value < minimum:
            hint = " (0 = off)" if minimum == 0 and key.endswith(("every_n_steps", "weight")) else ""
            raise ConfigError(f"{key}={value} must be at least {minimum}{hint}")
    if not 0.0 <= cfg.val.split < 1.0:
        raise ConfigError(f"val.split={cfg.val.split} must be in [0, 1): the fraction of images held out")
    top = cfg.train.max_timestep if cfg.train.max_timestep is not None else 1000
    if not 0 < top <= 1000:
        raise ConfigError(f"train.max_timestep={top} must be in (0, 1000]: the schedule has 1000 timesteps")
    if not 0 <= cfg.train.min_timestep < top:
        raise ConfigError(f"train.min_timestep={cfg.train.min_timestep} must be in [0, train.max_timestep={top})")
    if not 0.0 < cfg.token.stop_frac <= 1.0:
        raise ConfigError(f"token.stop_frac={cfg.token.stop_frac} must be in (0, 1]: the fraction of train.max_steps "
                          "the vectors train for")
    last = max(cfg.token.stop_frac, cfg.lora.stop_frac if "lora" in cfg.parts else 0.0)
    if last < 1.0:
        raise ConfigError(f"token.stop_frac={cfg.token.stop_frac}" + (f" and lora.stop_frac={cfg.lora.stop_frac}"
                          if "lora" in cfg.parts else "") + ": nothing would train for the last steps; lower "
                          "train.max_steps instead")
    if "lora" in cfg.parts:
        if cfg.lora.start_frac >= cfg.lora.stop_frac:
            raise ConfigError(f"lora.start_frac={cfg.lora.start_frac} must be below lora.stop_frac="
                              f"{cfg.lora.stop_frac}: fractions of train.max_steps, the LoRA trains between them")
        if cfg.lora.unet_levels is not None and (not cfg.lora.unet_levels or min(cfg.lora.unet_levels) < 0):
            raise ConfigError(f"lora.unet_levels={list(cfg.lora.unet_levels)} must name levels >= 0 (0 = the latent's "
                              "own size, 1 = halved once, ...), or be null for every level")
        if cfg.token.stop_frac < cfg.lora.start_frac:
            raise ConfigError(f"token.stop_frac={cfg.token.stop_frac} < lora.start_frac={cfg.lora.start_frac}: "
                              "between the two nothing would train; let the phases meet or overlap")
        if cfg.lora.text_encoder and cfg.train.cache_text_encoder_outputs:
            raise ConfigError("train.cache_text_encoder_outputs caches a frozen encoder, and lora.text_encoder=true "
                              "trains every encoder; turn one of them off")
    name = cfg.output_name
    if not isinstance(name, str) or not NAME_WORD.fullmatch(name) or name.lower().endswith(FILE_SUFFIXES):
        key = "token.string" if name == cfg.token.string else "output_name"
        raise ConfigError(f"{key}={name!r}: the run's files are named after it and it is the word to write in prompts "
                          "(A1111 and ComfyUI take the file's name); use one word of letters, digits and _ - . + "
                          f"(not starting with . - or +, no file suffix: tinv adds it), e.g. {key}=mychar")
    if cfg.token.train_encoders != "both" and cfg.model.family != "sdxl":
        raise ConfigError(f"token.train_encoders={cfg.token.train_encoders} applies to SDXL only; "
                          f"{cfg.model.family} has one text encoder")


def _folder(function: str, *args: str) -> str:
    """`${folder:module.function,arg,...}` in a config: the path that function returns, e.g. a model folder it
    writes into the cache on first use (the tiny and toy models)."""
    from hydra.utils import get_method

    return str(get_method(function)(*args))


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    if not OmegaConf.has_resolver("folder"):
        OmegaConf.register_new_resolver("folder", _folder)
    if not OmegaConf.has_resolver("direction"):
        # `${direction:${objective.mode}}` = Optuna's name for it (minimize | maximize)
        OmegaConf.register_new_resolver("direction", lambda mode: f"{mode}imize")
    if not OmegaConf.has_resolver("job_folder"):  # hydra.sweep.subdir: one flat folder per sweep job
        OmegaConf.register_new_resolver("job_folder", job_folder_name)
    if not OmegaConf.has_resolver("unique"):  # hydra.run.dir: runs started in the same second get their own folders
        OmegaConf.register_new_resolver("unique", lambda: secrets.token_hex(3), use_cache=True)


register_configs()
