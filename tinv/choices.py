"""The allowed values of every fixed-choice setting, defined once.

The structured configs (tinv.config) type their fields with these, so a bad value fails when Hydra composes the
config and the message lists the allowed ones; the code that acts on a value reads the same definitions (a prompts
file's `--ss`, a kohya TOML's `resize_interpolation`). Members are plain strings everywhere else: `==`, f-strings,
JSON, repr and dict keys see "bf16", not an enum.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    __str__ = str.__str__
    __format__ = str.__format__
    __repr__ = str.__repr__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


def _choices(name: str, *values: str) -> type[Choice]:
    # the functional form allows values that are not identifiers ("dpmsolver++"); OmegaConf looks members up by name
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


Family = _choices("Family", "sd1", "sd2", "sdxl")
PredictionType = _choices("PredictionType", "epsilon", "v_prediction")
TemplateKind = _choices("TemplateKind", "object", "style", "caption")
SubjectKind = _choices("SubjectKind", "object", "style")  # score.kind: which prompts the fidelity scorer uses
MissingToken = _choices("MissingToken", "prepend", "warn", "error")
Precision = _choices("Precision", "no", "fp16", "bf16")
SaveFormat = _choices("SaveFormat", "safetensors", "pt")
LoraFormat = _choices("LoraFormat", "kohya", "diffusers")  # the LoRA file's key layout (tinv/trained/lora.py)
# lora.preserve_with: what the LoRA keeps (tinv/trained/lora.py)
PreserveWith = _choices("PreserveWith", "word", "token", "edit", "context")
BackgroundWith = _choices("BackgroundWith", "caption", "context")
TrackerMode = _choices("TrackerMode", "online", "offline", "disabled")
TokenNorm = _choices("TokenNorm", "none", "clamp_to_vocab_max", "l2_to_init")
InitFrom = _choices("InitFrom", "input", "output")  # the init word's token embedding, or the encoder's output for it
TrainEncoders = _choices("TrainEncoders", "both", "clip_l", "clip_g")
LrScale = _choices("LrScale", "none", "batch")
Sampler = _choices("Sampler", "ddim", "euler", "euler_a", "dpmsolver++")
Interpolation = _choices("Interpolation", "lanczos", "nearest", "bilinear", "bicubic", "area", "box", "hamming")
BadMask = _choices("BadMask", "unmasked", "skip")  # an image whose mask cannot be used trains unmasked, or not at all
Mode = _choices("Mode", "min", "max")  # which way a metric is better
Reduce = _choices("Reduce", "best", "last")  # a metric's best value over the run, or its value at the end
