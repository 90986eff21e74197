"""Training data: datasets and subsets (folders, kohya TOML), captions, buckets, latent cache, the demo set."""

from .dataset import BucketBatchSampler, TrainingSet, build_training_set, collate
from .latent_cache import LatentCache
from .prompts import PromptBuilder

__all__ = ["BucketBatchSampler", "LatentCache", "PromptBuilder", "TrainingSet", "build_training_set", "collate"]
