"""Sampling a toy pipeline with fixed seeds and scoring the images with the judge.

concept_accuracy: the fraction of samples whose judged shape, colour and background all match the concept;
per-attribute accuracies; reconstruction: mean cosine similarity, in the judge's feature space, between each
sample and each reference image (the training images), as the textual-inversion paper does with CLIP.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..resources import follow_load_in_pipeline
from .judge import HEADS, Judge, to_tensor
from .model import GUIDANCE_SCALE, SAMPLE_STEPS
from .world import Concept


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seeds: list[int], guidance_scale: float = GUIDANCE_SCALE,
                  steps: int = SAMPLE_STEPS, batch: int = 64, progress: bool = False, **call_kwargs) -> np.ndarray:
    """uint8 (n, 32, 32, 3): prompt i from seed i, independent of batch size and order."""
    from diffusers import DDIMScheduler

    pipe.set_progress_bar_config(disable=not progress, desc="scoring", leave=False)
    scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config)  # one fixed sampler for every score
    out = []
    try:
        for i in range(0, len(prompts), batch):
            gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
            res = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=gens, output_type="np", height=32, width=32,
                       callback_on_step_end=follow_load_in_pipeline, **call_kwargs)
            out.append((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))
    finally:
        pipe.scheduler = scheduler
    return np.concatenate(out)


@torch.no_grad()
def score(judge: Judge, images: np.ndarray, concept: Concept, references: np.ndarray | None = None) -> dict:
    pred = judge.predict(to_tensor(images))
    want = torch.tensor(concept.labels())
    hits = pred == want
    result = {"concept_accuracy": hits.all(dim=1).float().mean().item(),
              # the figure alone (shape and colour), whatever the background: what a masked run is asked to learn
              "subject_accuracy": hits[:, :2].all(dim=1).float().mean().item()}
    for i, name in enumerate(HEADS):
        result[f"{name}_accuracy"] = hits[:, i].float().mean().item()
    if references is not None and len(references):
        a = F.normalize(judge.features(to_tensor(images)), dim=1)
        b = F.normalize(judge.features(to_tensor(references)), dim=1)
        result["reconstruction"] = (a @ b.T).mean().item()
    return result
