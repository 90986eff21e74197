"""Checking the optimizer and scheduler choices at start-up, before any model loads.

The configs are `_target_` + `_partial_` nodes. Both are built once on a dummy parameter, so a missing package, a
misspelled argument or a bad value (a negative lr, an unknown schedule name) costs seconds, not a model load.
"""

from __future__ import annotations

import inspect
import re

import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, first_line

PACKAGES = {"bitsandbytes": "bitsandbytes", "lion_pytorch": "lion-pytorch", "prodigyopt": "prodigyopt"}
# arguments the trainer passes itself
PROVIDED = {"optimizer": {"params"}, "scheduler": {"optimizer", "num_training_steps"}}
FALLBACK = {"optimizer": "adamw", "scheduler": "constant"}



def check_target(group: str, node: DictConfig, choice: str | None = None) -> None:
    """The target imports and takes every key of the node."""
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
                              f"(or choose {group}={FALLBACK[group]})") from None
        raise ConfigError(f"{label}: cannot import {target!r}; check {group}._target_") from None
    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    keys = {k for k in OmegaConf.to_container(node) if not k.startswith("_")}
    unknown = sorted(keys - set(params) - PROVIDED[group])
    if unknown and not accepts_any:
        raise ConfigError(f"{group}.{unknown[0]} is not an argument of {target}; "
                          f"it takes: {', '.join(p for p in params if p not in PROVIDED[group])}")


def check_optimization(optimizer: DictConfig, scheduler: DictConfig, max_steps: int, choices: dict) -> None:
    """Import, argument and value checks for both, by building them on a dummy parameter."""
    check_target("optimizer", optimizer, choices.get("optimizer"))
    check_target("scheduler", scheduler, choices.get("scheduler"))
    dummy = torch.nn.Parameter(torch.zeros(1))
    for group, node, build in (
        ("optimizer", optimizer, lambda: instantiate(optimizer)([dummy])),
        ("scheduler", scheduler, lambda: instantiate(scheduler)(optimizer=torch.optim.SGD([dummy], lr=1.0),
                                                                num_training_steps=max_steps)),
    ):
        try:
            build()
        except Exception as err:  # noqa: BLE001 - any failure here is a bad value in the user's config
            message = first_line(err.__cause__ or err)
            raise ConfigError(f"{_culprit(group, node, message)}: {message}") from None


def _culprit(group: str, node: DictConfig, message: str) -> str:
    """The `group.key=value` whose value the library's message quotes (e.g. "Invalid learning rate: -0.001" names
    optimizer.lr=-0.001), else the group and its target."""
    for key, value in OmegaConf.to_container(node).items():
        if not key.startswith("_") and isinstance(value, (int, float, str)) and not isinstance(value, bool) \
                and re.search(rf"(?<![\w.-]){re.escape(str(value))}(?![\w.])", message):
            return f"{group}.{key}={value}"
    return f"{group} ({node.get('_target_')})"
