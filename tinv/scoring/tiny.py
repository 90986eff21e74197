"""Tiny CLIP and DINO scorers with random weights, built offline from a fixed seed, as transformers folders (the
real classes and processors at toy widths): the scoring code's whole path runs on them in tests."""

from __future__ import annotations

import torch

from ..backbone.tokenizer_gen import build_clip_tokenizer
from ..cache import cache_root, cached_folder

TINY_SCORER_VERSION = "v1"
TINY_SCORERS = ("clip", "dino")
_SIDE = 32  # the processors' input size


def save_tiny_scorer(kind: str, folder, seed: int = 0) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=_SIDE, patch_size=8)
    if kind == "clip":
        tokenizer = build_clip_tokenizer()
        config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             max_position_embeddings=tokenizer.model_max_length,
                                             bos_token_id=0, eos_token_id=2, pad_token_id=1),
                            vision_config=vision, projection_dim=16)
        CLIPModel(config).eval().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        CLIPImageProcessor(size={"shortest_edge": _SIDE}, crop_size={"height": _SIDE, "width": _SIDE}) \
            .save_pretrained(folder)
    elif kind == "dino":
        ViTModel(ViTConfig(**vision), add_pooling_layer=False).eval().save_pretrained(folder)
        ViTImageProcessor(size={"height": _SIDE, "width": _SIDE}).save_pretrained(folder)
    else:
        raise ValueError(f"tiny scorer kind {kind!r} is unknown; choose one of {', '.join(TINY_SCORERS)}")


def tiny_scorer_path(kind: str) -> str:
    """The cached tiny scorer folder of this kind (clip or dino), written on first use."""
    path = cache_root() / "tiny" / TINY_SCORER_VERSION / f"scorer-{kind}"
    return str(cached_folder(path, lambda folder: save_tiny_scorer(kind, folder), done_when="config.json"))
