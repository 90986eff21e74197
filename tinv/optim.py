"""Checking optimizer and scheduler choices at start-up, before any model loads.

The configs are `_target_` + `_partial_` nodes; this checks that the target's package is installed and that every
key is an argument of the target, so a typo or a missing package costs seconds, not a model load.
"""

from __future__ import annotations

import inspect

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

PACKAGES = {"bitsandbytes": "bitsandbytes", "lion_pytorch": "lion-pytorch", "prodigyopt": "prodigyopt"}
# arguments the trainer passes itself
PROVIDED = {"optimizer": {"params"}, "scheduler": {"optimizer", "num_training_steps"}}


def check_partial(group: str, node: DictConfig, choice: str | None = None) -> None:
    target = node.get("_target_")
    label = f"{group}={choice}" if choice else group
    if not target:
        raise ConfigError(f"{label}: the config has no _target_; name the class or function to build")
    try:
        fn = get_method(target)
    except Exception:  # noqa: BLE001 - hydra wraps the ImportError
        module = target.split(".")[0]
        if module in PACKAGES:
            raise ConfigError(f"{label} needs the package {PACKAGES[module]!r}: pip install {PACKAGES[module]} "
                              f"(or choose {group}={'adamw' if group == 'optimizer' else 'constant'})") from None
        raise ConfigError(f"{label}: cannot import {target!r}; check {group}._target_") from None
    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    keys = {k for k in OmegaConf.to_container(node) if not k.startswith("_")}
    unknown = sorted(keys - set(params) - PROVIDED[group])
    if unknown and not accepts_any:
        raise ConfigError(f"{group}.{unknown[0]} is not an argument of {target}; "
                          f"it takes: {', '.join(p for p in params if p not in PROVIDED[group])}")
