"""The frozen diffusion model behind a run, and the one place where SD1, SD2 and SDXL differ.

A `Backbone` answers what the trainer needs: its tokenizer/encoder pairs, how prompts become UNet conditioning,
the VAE's latent scale and the prediction type. Construction (what Hydra instantiates) is cheap: it checks the
source and loads the tokenizers, so token and config errors surface before gigabytes of weights are read;
`load_models` then reads the UNet, VAE and text encoders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError, first_line
from .single_file import read_state_dict
from .source import ModelSource, resolve_source

log = logging.getLogger(__name__)


@dataclass
class TextEncoder:
    key: str  # its name in embedding files: emb_params | clip_l | clip_g
    subfolder: str
    tokenizer: object
    model: nn.Module | None = None
    width: int = 0  # hidden size, read from the encoder's config before any weights load

    @property
    def label(self) -> str:
        """The encoder as messages name it."""
        return {"emb_params": "the text encoder", "clip_l": "text encoder 1 (CLIP-L)",
                "clip_g": "text encoder 2 (OpenCLIP bigG)"}[self.key]


def _final_layer_norm(model: nn.Module) -> nn.Module:
    # transformers 5 CLIPTextModel has no `.text_model` wrapper; CLIPTextModelWithProjection still does.
    return getattr(model, "final_layer_norm", None) or model.text_model.final_layer_norm


class Backbone:
    family: ClassVar[str]
    encoder_layout: ClassVar[tuple[tuple[str, str, str], ...]]  # (file key, encoder subfolder, tokenizer subfolder)
    pipeline_extras: ClassVar[dict] = {}  # further arguments of the family's diffusers pipeline
    keeps_vae_fp32: ClassVar[bool] = False  # train.no_half_vae's default: the VAE stays fp32 under mixed precision

    def __init__(self, source: ModelSource, revision: str | None = None, variant: str | None = None,
                 resolution: int = 512, prediction_type: str | None = None, clip_skip: int = 1,
                 vae: str | None = None, name: str | None = None):
        self.src, self.revision, self.variant = source, revision, variant
        self.name = name or ""  # the model= choice it came from, if any
        self.resolution = resolution
        self.clip_skip = clip_skip
        self.vae_path = vae
        self._prediction_type = prediction_type
        self.encoders = [TextEncoder(key, sub, self._load_tokenizer(tsub), width=self._encoder_width(sub))
                         for key, sub, tsub in self.encoder_layout]
        self.unet = self.vae = self.noise_scheduler = None
        self.vae_calls = 0  # VAE encode batches run so far (a cached run does none while training)

    # ---- construction -------------------------------------------------------------------------------------------

    @staticmethod
    def from_pretrained(family: str, path: str, config_dir: str | None = None, v_parameterization: bool = False,
                        prediction_type: str | None = None, revision: str | None = None,
                        vae: str | None = None, **kwargs) -> "Backbone":
        """Hydra's entry: pick the family's class, check the source, load the tokenizers (no weights yet)."""
        source = resolve_source(path, family, config_dir, revision)
        if v_parameterization:  # kohya's switch for v-prediction fine-tunes; it wins over the config's default
            prediction_type = "v_prediction"
        if vae is not None and not Path(vae).expanduser().exists():
            raise ConfigError(f"model.vae={vae!r} does not exist; give a VAE folder or single file")
        return FAMILIES[family](source, revision=revision, prediction_type=prediction_type, vae=vae, **kwargs)

    @property
    def path(self) -> str:
        return self.src.path

    def _config_kwargs(self) -> dict:
        # a revision names a commit of the model's own hub repo, not of a single file's config repo
        return {"revision": self.revision} if self.revision and not self.src.single_file else {}

    def _load_tokenizer(self, subfolder: str):
        from transformers import CLIPTokenizer

        where = self.src.config_source
        try:
            tokenizer = CLIPTokenizer.from_pretrained(where, subfolder=subfolder, **self._config_kwargs())
            if tokenizer.eos_token_id is None or len(tokenizer) < 256:  # transformers 5 builds empty ones silently
                raise OSError("no tokenizer files found")
            return tokenizer
        except (OSError, ValueError) as err:
            raise ConfigError(f"{where!r}: cannot load its {subfolder} ({first_line(err)}); offline "
                              "(HF_HUB_OFFLINE=1) a hub id must already be in the Hugging Face cache - download it "
                              "once, or use a local diffusers folder") from None

    def _encoder_width(self, subfolder: str) -> int:
        from transformers import CLIPTextConfig

        where = self.src.config_source
        try:
            config = CLIPTextConfig.from_pretrained(where, subfolder=subfolder, **self._config_kwargs())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{where!r}: cannot read its {subfolder} config ({first_line(err)})") from None
        # SD1's CLIP-L uses quick_gelu, SD2's OpenCLIP-H plain gelu: the one cheap tell between the two
        expected = {"sd1": "quick_gelu", "sd2": "gelu"}.get(self.family)
        if expected and config.hidden_act != expected:
            other = "sd2" if self.family == "sd1" else "sd1"
            raise ConfigError(f"model.path={self.path!r} looks like an {other} model (its text encoder uses "
                              f"{config.hidden_act}) but model.family is {self.family!r}; use model="
                              f"{'sd2' if other == 'sd2' else 'sd15'} or set model.family={other}")
        if self.clip_skip > config.num_hidden_layers:
            raise ConfigError(f"model.clip_skip={self.clip_skip} is more than the {config.num_hidden_layers} layers "
                              f"of {where!r}'s {subfolder}; use 1 or 2")
        return config.hidden_size

    def load_models(self, device: torch.device, dtype: torch.dtype = torch.float32,
                    vae_dtype: torch.dtype = torch.float32) -> None:
        """Read the frozen UNet, VAE and text encoders, in eval mode with gradients off."""
        try:
            if self.src.single_file:
                self._load_single_file()
            else:
                self._load_folder()
            if self.vae_path:
                self.vae = self._load_vae(self.vae_path)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ConfigError(f"model.path={self.path!r}: cannot load the model weights ({first_line(err)})") from None
        for module, module_dtype in [(self.unet, dtype), (self.vae, vae_dtype)] + [(e.model, dtype)
                                                                                  for e in self.encoders]:
            module.requires_grad_(False).eval().to(device)
            if module.dtype != module_dtype:
                module.to(dtype=module_dtype)

    def load_text_encoders(self, device: torch.device | str = "cpu") -> None:
        """The text encoders alone (inspecting an embedding needs no UNet); single files load whole."""
        if self.src.single_file:
            self.load_models(torch.device(device))
            return
        kw = self._config_kwargs()
        weights = dict(kw, variant=self.variant) if self.variant else kw
        try:
            for enc in self.encoders:
                enc.model = self._encoder_class(enc).from_pretrained(self.path, subfolder=enc.subfolder, **weights)
                enc.model.requires_grad_(False).eval().to(device)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.path={self.path!r}: cannot load its text encoders ({first_line(err)})") from None

    def _load_folder(self) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        kw = self._config_kwargs()
        weights = dict(kw, variant=self.variant) if self.variant else kw
        self.noise_scheduler = DDPMScheduler.from_pretrained(self.path, subfolder="scheduler", **kw)
        self.unet = UNet2DConditionModel.from_pretrained(self.path, subfolder="unet", **weights)
        self.vae = AutoencoderKL.from_pretrained(self.path, subfolder="vae", **weights)
        for enc in self.encoders:
            enc.model = self._encoder_class(enc).from_pretrained(self.path, subfolder=enc.subfolder, **weights)

    def _load_single_file(self) -> None:
        """diffusers converts the original layout; configs and tokenizers come from the config source."""
        from diffusers import DDPMScheduler

        # resolve_source already opened torch files with weights_only=True, so pickled code was refused there
        pipe = self.pipeline_class.from_single_file(self.path, config=self.src.config_source)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.unet, self.vae = pipe.unet, pipe.vae
        for enc in self.encoders:
            enc.model = getattr(pipe, enc.subfolder)

    def _load_vae(self, path: str):
        from diffusers import AutoencoderKL

        local = Path(path).expanduser()
        if local.is_dir():
            sub = "vae" if (local / "vae" / "config.json").is_file() else None
            return AutoencoderKL.from_pretrained(str(local), subfolder=sub)
        read_state_dict(local, "model.vae")  # refuses pickled code before diffusers opens it
        return AutoencoderKL.from_single_file(str(local), config=self.src.config_source, subfolder="vae")

    def _encoder_class(self, enc: TextEncoder):
        from transformers import CLIPTextModel

        return CLIPTextModel

    # ---- what the trainer asks --------------------------------------------------------------------------------------

    @property
    def prediction_type(self) -> str:
        return self._prediction_type or self.noise_scheduler.config.prediction_type

    @property
    def source(self) -> str:
        return self.path

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids for each text encoder, padded to the tokenizer's full length as the models were trained."""
        return [e.tokenizer(prompts, padding="max_length", max_length=e.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids for e in self.encoders]

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents. The posterior mean, so cached and live latents are the same."""
        self.vae_calls += 1
        latents = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.mean
        return latents * self.vae.config.scaling_factor

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: list[torch.Tensor],
                batch: dict) -> torch.Tensor:
        """Text encoders -> conditioning -> UNet output."""
        return self.unet(noisy, timesteps, **self.conditioning(input_ids, batch)).sample

    def predictor(self, input_ids: list[torch.Tensor], batch: dict):
        """predict() for these prompts and this batch, as the (noisy latents, timesteps) -> output function that
        tinv.losses takes; the latents are cast to the UNet's dtype."""
        return lambda noisy, timesteps: self.predict(noisy.to(self.unet.dtype), timesteps, input_ids, batch)

    def conditioning(self, input_ids: list[torch.Tensor], batch: dict) -> dict:
        raise NotImplementedError

    def hidden_states(self, input_ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per text encoder, the token states that condition the UNet (SD1/SD2: the last layer or clip_skip's;
        SDXL: each encoder's penultimate layer)."""
        raise NotImplementedError

    def cross_attention_states(self, input_ids: list[torch.Tensor]) -> torch.Tensor:
        """What the UNet's cross-attention keys and values read: the encoders' hidden_states side by side."""
        return torch.cat(self.hidden_states(input_ids), dim=-1)

    def pipeline(self, scheduler):
        """A diffusers pipeline around the modules as they are now (trained vectors spliced in), for sampling."""
        modules = {}
        for (_, subfolder, tokenizer_subfolder), enc in zip(self.encoder_layout, self.encoders):
            modules.update({subfolder: enc.model, tokenizer_subfolder: enc.tokenizer})
        return self.pipeline_class(vae=self.vae, unet=self.unet, scheduler=scheduler, **modules,
                                   **self.pipeline_extras)

    def sampling_kwargs(self) -> dict:
        """Arguments of a pipeline call that make it condition prompts as training does."""
        return {}

    @property
    def native_resolution(self) -> int:
        """The image side the loaded UNet was built for (latent size x the VAE's downscale)."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        for enc in self.encoders:
            enc.model.gradient_checkpointing_enable()
            enc.model.train()  # transformers only checkpoints in training mode; CLIP has no dropout to switch on


class SD1Backbone(Backbone):
    """SD 1.x: one CLIP ViT-L encoder; conditioning = its last hidden state (or hidden_states[-clip_skip])."""

    family = "sd1"
    encoder_layout = (("emb_params", "text_encoder", "tokenizer"),)
    pipeline_extras = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def sampling_kwargs(self) -> dict:
        # diffusers counts clip_skip from 0 (1 = penultimate layer); ours from 1, like A1111
        return {"clip_skip": self.clip_skip - 1} if self.clip_skip > 1 else {}

    def conditioning(self, input_ids, batch):
        return {"encoder_hidden_states": self.hidden_states(input_ids)[0]}

    def hidden_states(self, input_ids):
        model = self.encoders[0].model
        ids = input_ids[0].to(model.device)
        if self.clip_skip == 1:
            return [model(ids).last_hidden_state]
        hidden = model(ids, output_hidden_states=True).hidden_states[-self.clip_skip]
        return [_final_layer_norm(model)(hidden)]


class SD2Backbone(SD1Backbone):
    """SD 2.x: one OpenCLIP-H encoder (the diffusers folders already drop its last layer); 768-v is v-prediction."""

    family = "sd2"


class SDXLBackbone(Backbone):
    """SDXL: two encoders. Conditioning = both penultimate hidden states side by side; pooled = the projected
    second-encoder state at the EOS position; time ids = each sample's original size, crop and target size."""

    family = "sdxl"
    encoder_layout = (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2"))
    keeps_vae_fp32 = True  # the stock SDXL VAE overflows in fp16

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def _encoder_class(self, enc):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return CLIPTextModelWithProjection if enc.key == "clip_g" else CLIPTextModel

    def load_models(self, *args, **kwargs) -> None:
        super().load_models(*args, **kwargs)
        # Real SDXL encoders ship eos_token_id=2, which makes transformers pool at argmax(ids) - a new token once
        # tokens are added. Point it at the real end token, so the pipeline used for previews pools as training does.
        self.encoders[1].model.text_model.eos_token_id = self.encoders[1].tokenizer.eos_token_id

    def cache_outputs_of(self, keys: list[str]) -> None:
        """Compute these (frozen) encoders once per distinct prompt and reuse the result."""
        self.output_cache = {i: {} for i, e in enumerate(self.encoders) if e.key in keys}

    def _encode(self, i: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Penultimate hidden states, and for the second encoder the projected state at the EOS position."""
        model = self.encoders[i].model
        out = model(ids, output_hidden_states=True)
        if i == 0:
            return out.hidden_states[-2], None
        # EOS by the tokenizer's id, not argmax(ids): the new tokens have the highest ids.
        eos_pos = (ids == self.encoders[1].tokenizer.eos_token_id).int().argmax(dim=-1)
        return out.hidden_states[-2], model.text_projection(out.last_hidden_state[torch.arange(ids.shape[0]),
                                                                                  eos_pos])

    def _encode_cached(self, i: int, ids: torch.Tensor):
        cache = self.output_cache[i]
        keys = [tuple(row.tolist()) for row in ids]
        missing = [k for k in dict.fromkeys(keys) if k not in cache]
        if missing:
            with torch.no_grad():
                hidden, pooled = self._encode(i, torch.tensor(missing, device=ids.device))
            for j, k in enumerate(missing):
                cache[k] = (hidden[j], None if pooled is None else pooled[j])
        hidden = torch.stack([cache[k][0] for k in keys])
        return hidden, None if i == 0 else torch.stack([cache[k][1] for k in keys])

    def hidden_states(self, input_ids):
        return [self._encode(i, ids.to(enc.model.device))[0] for i, (enc, ids) in enumerate(zip(self.encoders,
                                                                                              input_ids))]

    def conditioning(self, input_ids, batch):
        outputs = []
        for i, enc in enumerate(self.encoders):
            ids = input_ids[i].to(enc.model.device)
            cached = i in getattr(self, "output_cache", {})
            outputs.append(self._encode_cached(i, ids) if cached else self._encode(i, ids))
        (hidden1, _), (hidden2, pooled) = outputs
        hidden = torch.cat([hidden1, hidden2.to(hidden1.dtype)], dim=-1)
        # Built from the real batch, so a partial last batch works.
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
        time_ids = time_ids.to(hidden.device, hidden.dtype)
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": pooled.to(hidden.dtype), "time_ids": time_ids}}


FAMILIES: dict[str, type[Backbone]] = {cls.family: cls for cls in (SD1Backbone, SD2Backbone, SDXLBackbone)}
