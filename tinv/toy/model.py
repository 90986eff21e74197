"""The toy model: a real SD1-family diffusers pipeline, small enough to pretrain on the toy world on a CPU.

CLIP text encoder with a word-level tokenizer (every world and template word is one token), an AutoencoderKL
that halves each side (32x32x3 -> 16x16x4), and a UNet2DConditionModel with cross-attention at both levels.
The pretrained weights ship inside the package (fp16 safetensors); `toy_model_path()` writes them out as an
ordinary diffusers folder in $TINV_CACHE, which the normal loader reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..backbone.tokenizer_gen import word_level_vocab_and_merges
from ..data.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES
from . import world

MAX_LENGTH = 32
TEXT_WIDTH = 64
# shipped: text_encoder, vae, unet (fp16) and the judge; TINV_TOY_WEIGHTS points at another `tinv-toy pretrain` output
WEIGHTS_DIR = Path(os.environ.get("TINV_TOY_WEIGHTS", Path(__file__).parent / "weights")).expanduser()
GUIDANCE_SCALE = 3.0  # the world's one guidance scale, for evaluation and previews
SAMPLE_STEPS = 25


def toy_words() -> list[str]:
    """World words plus every word of the built-in templates, so template prompts stay whole words."""
    template_words = " ".join(t.format("") for t in OBJECT_TEMPLATES + STYLE_TEMPLATES)
    extra = sorted(set(template_words.replace("-", " - ").split()))
    return world.world_words() + [w for w in extra if w not in world.world_words()]


def build_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = word_level_vocab_and_merges(toy_words())
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>")
    tok.model_max_length = MAX_LENGTH
    return tok


def build_pipeline(seed: int = 0):
    """The toy pipeline with fresh random weights (pretraining starts here)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = build_tokenizer()
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_WIDTH, intermediate_size=TEXT_WIDTH * 4, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
        projection_dim=TEXT_WIDTH, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=world.SIZE, mid_block_add_attention=False)
    unet = UNet2DConditionModel(
        sample_size=world.SIZE // 2, in_channels=4, out_channels=4,
        # no attention at 16x16, where it costs most (as SDXL leaves out its top level)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128), layers_per_block=1, attention_head_dim=8, cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=16)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def load_weights(pipe, weights_dir: Path = WEIGHTS_DIR):
    """Put the shipped (or freshly pretrained) weights into a built pipeline, as fp32."""
    from safetensors.torch import load_file

    for name in ("text_encoder", "vae", "unet"):
        path = Path(weights_dir) / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"toy model weights {path} are missing; run `tinv-toy pretrain` to make them")
        state = {k: v.float() for k, v in load_file(str(path)).items()}
        getattr(pipe, name).load_state_dict(state)
        # the VAE's latent scale was measured in pretraining and is stored with its weights
    scale = (Path(weights_dir) / "vae_scaling_factor.txt")
    if scale.is_file():
        pipe.vae.register_to_config(scaling_factor=float(scale.read_text()))
    return pipe


def save_weights(pipe, weights_dir: Path) -> None:
    from safetensors.torch import save_file

    from ..atomic import atomic_path, write_text_atomic

    weights_dir.mkdir(parents=True, exist_ok=True)
    for name in ("text_encoder", "vae", "unet"):
        state = {k: v.detach().half().contiguous() for k, v in getattr(pipe, name).state_dict().items()}
        with atomic_path(weights_dir / f"{name}.safetensors") as tmp:
            save_file(state, str(tmp))
    write_text_atomic(weights_dir / "vae_scaling_factor.txt", f"{pipe.vae.config.scaling_factor:.6f}\n")


def weights_fingerprint(weights_dir: Path = WEIGHTS_DIR) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in ("text_encoder", "vae", "unet"):
        p = Path(weights_dir) / f"{name}.safetensors"
        h.update(p.read_bytes() if p.is_file() else b"missing")
    return h.hexdigest()[:12]


def toy_model_path() -> str:
    """The pretrained toy model as a diffusers folder in $TINV_CACHE, written from the shipped weights once."""
    from ..cache import cache_root, cached_folder

    return str(cached_folder(cache_root() / "toy" / weights_fingerprint(), lambda staging: load_weights(
        build_pipeline()).save_pretrained(staging, safe_serialization=True), done_when="model_index.json"))
