"""Structured-config schemas: the primary config is typed, so a misspelled key fails when Hydra composes it.

Group choices live as small YAML files in `conf/`; these dataclasses give each node its allowed keys and types.
`optimizer` and `scheduler` stay open (`_target_` plus that callable's own arguments); their arguments are checked
against the callable's signature at start-up, before any model loads (see tinv.optim).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, OmegaConf


@dataclass
class ModelConfig:
    _target_: str = "tinv.backbone.Backbone.from_pretrained"
    family: str = MISSING  # sd1 | sd2 | sdxl
    path: str = MISSING  # hub id, local diffusers folder, or single .safetensors/.ckpt file (original layout)
    config_dir: Optional[str] = None  # single files: local diffusers folder of the same family (configs, tokenizers)
    vae: Optional[str] = None  # replacement VAE: diffusers folder or single file
    v_parameterization: bool = False  # kohya's flag: same as prediction_type=v_prediction
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. fp16 weights in a hub repo
    resolution: int = 512  # the model's native resolution; data.resolution defaults to it
    prediction_type: Optional[str] = None  # epsilon | v_prediction; None = from the model's scheduler config
    clip_skip: int = 1  # SD1/SD2: 2 = penultimate layer + final layer norm (A1111 convention)


@dataclass
class TokenConfig:
    string: str = "mychar"  # the trigger word; must be new to every tokenizer of the model
    init_word: Optional[str] = None  # seed the vectors from this word's token embeddings
    num_vectors: Optional[int] = None  # None = 1, or the row count of token.weights
    weights: Optional[str] = None  # continue from an existing embedding file
    norm: str = "none"  # none | clamp_to_vocab_max | l2_to_init: keep the vectors near real word embeddings
    norm_weight: float = 0.01  # l2_to_init: weight of ||v - v_init||^2 in the loss
    train_encoders: str = "both"  # SDXL: both | clip_l | clip_g; an untrained encoder keeps its initial vectors


@dataclass
class TemplateConfig:
    kind: str = "object"  # object | style | caption
    templates: Optional[list[str]] = None  # custom prompt list with "{}" for the token; None = the built-in list


@dataclass
class DataConfig:
    """Our data keys double as the lowest level of kohya's precedence (subset > dataset > [general] > these)."""

    _target_: str = "tinv.data.build_training_set"
    image_dir: Optional[str] = None
    dataset_config: Optional[str] = None  # a kohya dataset TOML; its datasets/subsets replace image_dir
    metadata_file: Optional[str] = None  # kohya fine-tuning metadata JSON (captions) for image_dir
    caption_extension: str = ".txt"
    resolution: Any = II("model.resolution")  # int or [width, height]; defaults to the model's native size
    num_repeats: int = 1
    class_tokens: Optional[str] = None  # caption of images without a caption file
    missing_token: str = "prepend"  # caption lacks the token: prepend | warn | error
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
    # aspect-ratio buckets
    enable_bucket: bool = False
    min_bucket_reso: Optional[int] = None  # None = half the resolution
    max_bucket_reso: Optional[int] = None  # None = twice the resolution
    bucket_reso_steps: int = 64  # 64 for SD1/SD2; SDXL allows 32
    bucket_no_upscale: bool = False
    resize_interpolation: Optional[str] = None  # lanczos (default) | nearest | bilinear | bicubic | area | box | hamming
    # loading and the latent cache
    cache_dir: Optional[str] = None  # disk latent cache (train.cache_latents_to_disk); None = $TINV_CACHE/latents
    vae_batch_size: int = 4
    num_workers: int = 0
    debug: bool = False  # print the first samples' captions, token ids and buckets, then exit


@dataclass
class TrainConfig:
    _target_: str = "tinv.trainer.Trainer"
    max_steps: int = 500
    batch_size: int = 4
    gradient_accumulation: int = 1
    seed: int = 42
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    cache_latents: bool = True  # encode every image once, in memory
    cache_latents_to_disk: bool = False  # and keep them in data.cache_dir across runs
    no_half_vae: Optional[bool] = None  # keep the VAE fp32 under mixed precision; None = yes for SDXL
    max_grad_norm: Optional[float] = None  # over the vectors of all encoders together
    log_every_n_steps: int = 1
    cpu: bool = False  # force the CPU even when an accelerator is present
    # loss options
    noise_offset: float = 0.0
    min_snr_gamma: Optional[float] = None  # e.g. 5.0: Min-SNR loss weighting
    min_timestep: int = 0
    max_timestep: Optional[int] = None  # None = the schedule's length
    lr_scale: str = "none"  # none | batch: lr x batch x accumulation x processes (the original TI rule)
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
    # speed and memory
    compile: bool = False  # torch.compile the UNet
    cache_text_encoder_outputs: bool = False  # SDXL with token.train_encoders=clip_l|clip_g: cache the frozen one


@dataclass
class SaveConfig:
    format: str = "safetensors"  # safetensors | pt (A1111 torch layout)
    every_n_steps: int = 0  # 0 = only the final embedding
    state_every_n_steps: int = 0  # resumable state in <run dir>/state (0 = off; SIGINT/SIGTERM still write it)


@dataclass
class SampleConfig:
    every_n_steps: int = 0  # preview images every N steps (0 = off)
    at_start: bool = False  # also before the first step
    prompts: Any = None  # a list of prompts, or a kohya-style prompts file; None = "a photo of <token>"
    sampler: str = "euler_a"  # ddim | euler | euler_a | dpmsolver++
    steps: int = 20
    guidance_scale: float = 7.0
    negative_prompt: str = ""
    width: Optional[int] = None  # None = the model's resolution
    height: Optional[int] = None
    seed: int = 0


@dataclass
class ValConfig:
    every_n_steps: int = 0  # deterministic val/loss every N steps (0 = off)
    split: float = 0.0  # fraction of the images held out for validation; 0 = validate on the training images
    max_images: int = 16
    num_timesteps: int = 8  # fixed timesteps spread over the schedule, each image scored at every one
    seed: int = 0
    # concept scoring on the toy model: samples judged for the concept's attributes, at the end of the run and at
    # every validation; the sweep objective becomes 1 - concept_accuracy
    judge: Optional[str] = None  # toy (the shipped judge) or a judge .safetensors; None = off
    concept: Optional[str] = None  # e.g. "red circle on a black background"; None = named by the training captions
    num_samples: int = 32
    guidance_scale: Optional[float] = None  # None = the toy world's scale


@dataclass
class LoggerConfig:
    _target_: str = "tinv.tracking.WandbTracker"
    project: str = "tinv"
    mode: Optional[str] = None  # online | offline | disabled; None = online when an API key is set, else offline
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    log_embedding: bool = False  # upload the final embedding as a wandb artifact


@dataclass
class BenchConfig:
    steps: int = 10  # timed optimizer steps
    warmup: int = 3  # untimed steps first
    cache_images: int = 0  # > 0: train on this many generated images at data.resolution and time the latent cache


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    token: TokenConfig = field(default_factory=TokenConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    val: ValConfig = field(default_factory=ValConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)  # tinv-bench only
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    output_name: Optional[str] = None  # file stem of the embedding; None = token.string
    resume: Optional[str] = None  # a run dir or its state dir, or "latest" (the newest state under outputs/)


_ENUMS = {
    "model.family": ("sd1", "sd2", "sdxl"),
    "model.prediction_type": (None, "epsilon", "v_prediction"),
    "template.kind": ("object", "style", "caption"),
    "data.missing_token": ("prepend", "warn", "error"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "save.format": ("safetensors", "pt"),
    "logger.mode": (None, "online", "offline", "disabled"),
    "token.norm": ("none", "clamp_to_vocab_max", "l2_to_init"),
    "token.train_encoders": ("both", "clip_l", "clip_g"),
    "train.lr_scale": ("none", "batch"),
    "sample.sampler": ("ddim", "euler", "euler_a", "dpmsolver++"),
}

_POSITIVE = ("token.num_vectors", "train.max_steps", "train.batch_size", "train.gradient_accumulation",
             "data.num_repeats", "model.clip_skip", "train.log_every_n_steps", "data.vae_batch_size",
             "train.max_bad_steps", "sample.steps", "val.max_images", "val.num_timesteps",
             "val.num_samples")


def check_values(cfg) -> None:
    """Value checks that types cannot express; raises ConfigError naming the key and the allowed values."""
    from .errors import ConfigError

    for key, allowed in _ENUMS.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            shown = ", ".join(str(a) for a in allowed if a is not None)
            raise ConfigError(f"{key}={value!r} is not allowed; use one of: {shown}")
    for key in _POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    for key in ("save.every_n_steps", "save.state_every_n_steps", "sample.every_n_steps", "val.every_n_steps"):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be 0 (off) or positive")
    if not 0.0 <= cfg.val.split < 1.0:
        raise ConfigError(f"val.split={cfg.val.split} must be in [0, 1): the fraction of images held out")
    top = cfg.train.max_timestep if cfg.train.max_timestep is not None else 1000
    if not 0 < top <= 1000:
        raise ConfigError(f"train.max_timestep={top} must be in (0, 1000]: the schedule has 1000 timesteps")
    if not 0 <= cfg.train.min_timestep < top:
        raise ConfigError(f"train.min_timestep={cfg.train.min_timestep} must be in [0, train.max_timestep={top})")
    if cfg.token.train_encoders != "both" and cfg.model.family != "sdxl":
        raise ConfigError(f"token.train_encoders={cfg.token.train_encoders} applies to SDXL only; "
                          f"{cfg.model.family} has one text encoder")


def _tiny_model(kind: str) -> str:
    from .backbone.tiny import tiny_model_path

    return tiny_model_path(kind)


def _shape_model(kind: str) -> str:
    from .backbone.shapes import shape_model_path

    return shape_model_path(kind)


def _toy_model() -> str:
    from .toy.model import toy_model_path

    return toy_model_path()


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    if not OmegaConf.has_resolver("tiny_model"):
        # `${tiny_model:sd15}` in a model config = the cached tiny folder, written on first use.
        OmegaConf.register_new_resolver("tiny_model", _tiny_model)
    if not OmegaConf.has_resolver("shape_model"):
        # `${shape_model:sd15}` = a full-size random-weight model with the real architecture, for benchmarks.
        OmegaConf.register_new_resolver("shape_model", _shape_model)
    if not OmegaConf.has_resolver("toy_model"):
        # `${toy_model:}` = the pretrained toy model shipped in the package, as a cached diffusers folder.
        OmegaConf.register_new_resolver("toy_model", _toy_model)


register_configs()
