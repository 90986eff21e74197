"""Tiny SD1 / SD2 / SDXL pipelines with random weights, built offline from a fixed seed.

They keep the real architectures' block layout (block order, two layers per block, a four-level VAE, SDXL's two
text encoders of different widths and its text-time conditioning) at toy widths, so every code path that a real
checkpoint takes is exercised in seconds on a CPU. They are written as ordinary diffusers folders and loaded by the
same loader as any other folder.

    tinv-tiny sd15 DIR                          # write one, then load it like any local diffusers model
    tinv-tiny sdxl DIR --single-file tiny.safetensors   # also as one original-layout checkpoint file
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..atomic import new_folder
from ..cache import cache_root, cached_folder
from ..errors import refuse
from .tokenizer_gen import build_clip_tokenizer

TINY_VERSION = "v2"  # bump when the tiny architectures change, so stale caches are not reused
TINY_KINDS = ("sd15", "sd2", "sdxl")
TINY_FAMILIES = {"sd15": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
TINY_RESOLUTION = 64


def _text_encoder(tokenizer, width: int, layers: int, heads: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=act,
        projection_dim=projection or width,
        # The ids real SD/SDXL checkpoints ship (a legacy of the CLIP conversion). eos_token_id=2 makes
        # transformers pool at argmax(ids), which lands on a new token; keeping it tests that we do not.
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
    )


def _sd_unet(cross_dim: int, linear_projection: bool):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        attention_head_dim=(2, 2, 4, 4) if linear_projection else 4,
        cross_attention_dim=cross_dim,
        norm_num_groups=8,
        use_linear_projection=linear_projection,
    )


def _sdxl_unet(cross_dim: int, pooled_dim: int):
    from diffusers import UNet2DConditionModel

    time_dim = 8
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=cross_dim,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim,
    )


def _scheduler(kind: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if kind == "sdxl":
        return EulerDiscreteScheduler(**common, steps_offset=1, timestep_spacing="leading")
    prediction = "v_prediction" if kind == "sd2" else "epsilon"
    return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=prediction)


def build_tiny_pipeline(kind: str, seed: int = 0):
    """A diffusers pipeline object of the given tiny kind; random weights from `seed`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind not in TINY_KINDS:
        raise ValueError(f"tiny model kind {kind!r} is unknown; choose one of {', '.join(TINY_KINDS)}")
    torch.manual_seed(seed)
    if kind == "sdxl":
        tok1 = build_clip_tokenizer()
        tok2 = build_clip_tokenizer(pad_token="!")
        te1 = _text_encoder(tok1, width=32, layers=3, heads=4, act="quick_gelu")
        te2 = _text_encoder(tok2, width=64, layers=3, heads=4, act="gelu", projection=64)
        return StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
            unet=_sdxl_unet(cross_dim=32 + 64, pooled_dim=64), scheduler=_scheduler(kind),
            force_zeros_for_empty_prompt=True,
        )
    if kind == "sd2":
        tok = build_clip_tokenizer(pad_token="!")
        te = _text_encoder(tok, width=48, layers=3, heads=4, act="gelu")
        unet = _sd_unet(cross_dim=48, linear_projection=True)
    else:
        tok = build_clip_tokenizer()
        te = _text_encoder(tok, width=32, layers=3, heads=4, act="quick_gelu")
        unet = _sd_unet(cross_dim=32, linear_projection=False)
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=te, tokenizer=tok, unet=unet, scheduler=_scheduler(kind),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _save_tiny(kind: str, seed: int = 0):
    return lambda folder: build_tiny_pipeline(kind, seed).save_pretrained(folder, safe_serialization=True)


def write_tiny_model(kind: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny pipeline as a diffusers folder that appears whole or not at all."""
    with new_folder(out_dir) as staging:
        _save_tiny(kind, seed)(staging)
    return Path(out_dir).expanduser()


def tiny_model_path(kind: str) -> str:
    """The cached tiny model folder of this kind, written on first use."""
    path = cache_root() / "tiny" / TINY_VERSION / kind
    return str(cached_folder(path, _save_tiny(kind), done_when="model_index.json"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinv-tiny", description="Write a tiny random-weight diffusers model.")
    parser.add_argument("kind", choices=TINY_KINDS)
    parser.add_argument("out_dir", help="new folder to write the diffusers model into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single-file", metavar="FILE", help="also write it as one original-layout checkpoint "
                        "(.safetensors or .ckpt), loadable with model.config_dir=DIR")
    args = parser.parse_args(argv)
    from ..console import quiet_command

    quiet_command()
    try:
        path = write_tiny_model(args.kind, args.out_dir, args.seed)
    except FileExistsError as err:
        return refuse("tinv-tiny", err)
    print(f"wrote tiny {args.kind} model to {path}")
    if args.single_file:
        from diffusers import DiffusionPipeline

        from .single_file import write_single_file

        written = write_single_file(DiffusionPipeline.from_pretrained(path), TINY_FAMILIES[args.kind], args.single_file)
        print(f"wrote its single-file checkpoint to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
