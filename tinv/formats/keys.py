"""The tensor keys of the file formats: one set of vectors per text encoder, the LoRA layouts' module prefixes and
A1111's bundled-embedding prefix."""

from __future__ import annotations

SD_KEY = "emb_params"  # kohya / A1111 / ComfyUI key for single-encoder models
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL: text encoder 1 (CLIP-L) and 2 (OpenCLIP bigG)

BUNDLE_PREFIX = "bundle_emb."
# module owner -> (kohya prefix, diffusers prefix); SDXL's encoders are numbered in kohya's layout
KOHYA_PREFIX = {"unet": "lora_unet", SD_KEY: "lora_te", "clip_l": "lora_te1", "clip_g": "lora_te2"}
DIFFUSERS_PREFIX = {"unet": "unet", SD_KEY: "text_encoder", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # kohya's ss_base_model_version


def canonical_path(owner: str, path: str) -> str:
    """A module's path as the LoRA formats name it: transformers 5's CLIPTextModel dropped the `text_model.` level
    that the file layouts (and CLIPTextModelWithProjection) keep."""
    if owner != "unet" and not path.startswith("text_model."):
        return f"text_model.{path}"
    return path
