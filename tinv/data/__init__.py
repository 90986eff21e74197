"""Training data: image folders with captions, prompt templates, and the built-in demo set."""

from .dataset import ImageCaptionDataset, collate_images
from .prompts import PromptBuilder

__all__ = ["ImageCaptionDataset", "PromptBuilder", "collate_images"]
