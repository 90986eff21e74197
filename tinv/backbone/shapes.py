"""Full-size models with the real SD1 / SD2 / SDXL architectures and random weights, for benchmarks.

Same layers, widths and parameter counts as the released checkpoints (about 1.1 B parameters for SD1, 3.5 B for
SDXL), so step time and memory are the real ones; nothing is downloaded. They are written once (fp16 weights) to
$TINV_CACHE/shape/<kind> and loaded like any diffusers folder: `model=sd15_shape|sd2_shape|sdxl_shape`.
"""

from __future__ import annotations

import torch

from ..cache import cache_root, cached_folder
from .tokenizer_gen import build_clip_tokenizer

SHAPE_KINDS = ("sd15", "sd2", "sdxl")
CLIP_VOCAB = 49408  # the real embedding table, although the generated tokenizer uses only its first rows


def _clip(tokenizer, width, layers, heads, act, projection=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=width, intermediate_size=width * 4,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            hidden_act=act, projection_dim=projection or width, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)


def shape_unet(kind: str):
    from diffusers import UNet2DConditionModel

    if kind == "sdxl":
        return UNet2DConditionModel(
            sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    sd2 = kind == "sd2"
    return UNet2DConditionModel(
        sample_size=96 if sd2 else 64, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, attention_head_dim=(5, 10, 20, 20) if sd2 else 8,
        cross_attention_dim=1024 if sd2 else 768, use_linear_projection=sd2)


def build_shape_pipeline(kind: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.manual_seed(0)
    betas = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    unet = shape_unet(kind)
    if kind == "sdxl":
        tok1, tok2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
        return StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=_clip(tok1, 768, 12, 12, "quick_gelu"),
            text_encoder_2=_clip(tok2, 1280, 32, 20, "gelu", projection=1280), tokenizer=tok1, tokenizer_2=tok2,
            unet=unet, scheduler=EulerDiscreteScheduler(**betas))
    sd2 = kind == "sd2"
    tok = build_clip_tokenizer(pad_token="!" if sd2 else "<|endoftext|>")
    encoder = _clip(tok, 1024, 23, 16, "gelu") if sd2 else _clip(tok, 768, 12, 12, "quick_gelu")
    scheduler = DDIMScheduler(**betas, prediction_type="v_prediction" if sd2 else "epsilon")
    return StableDiffusionPipeline(vae=_vae(), text_encoder=encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def shape_model_path(kind: str) -> str:
    """The cached full-size random model of this kind, written (fp16 weights) on first use."""
    return str(cached_folder(cache_root() / "shape" / kind, lambda staging: build_shape_pipeline(kind).to(
        torch.float16).save_pretrained(staging, safe_serialization=True), done_when="model_index.json"))
