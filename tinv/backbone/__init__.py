"""Frozen diffusion backbones (SD1, SD2, SDXL) behind one small interface, and the tiny offline models."""

from .base import FAMILIES, Backbone, SD1Backbone, SD2Backbone, SDXLBackbone, TextEncoder

__all__ = ["FAMILIES", "Backbone", "SD1Backbone", "SD2Backbone", "SDXLBackbone", "TextEncoder"]
