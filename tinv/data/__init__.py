"""Training data: datasets and subsets (folders, kohya TOML), captions, buckets, latent cache."""

from .dataset import BucketBatchSampler, TrainingSet, build_training_set, collate
from .latent_cache import LatentCache, Latents
from .prompts import PromptBuilder

__all__ = ["BucketBatchSampler", "LatentCache", "Latents", "PromptBuilder", "TrainingSet", "build_training_set",
           "collate"]
