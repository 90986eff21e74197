"""Where a model comes from: a local diffusers folder, a hub id, or a single original-layout checkpoint file.

Everything here is cheap (file names, model_index.json, key names): it runs before any weights load, so a wrong
path, a wrong family or a missing offline config fails in seconds with one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, first_line
from .single_file import SINGLE_FILE_SUFFIXES, checkpoint_family, read_state_dict

# Where diffusers takes a single file's configs and tokenizers from when model.config_dir is not set.
DEFAULT_CONFIG_REPOS = {"sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                        "sd2": "stabilityai/stable-diffusion-2-1",
                        "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
FAMILY_NAMES = {"sd1": "SD 1.x (model=sd15)", "sd2": "SD 2.x (model=sd2)", "sdxl": "SDXL (model=sdxl)"}


@dataclass
class ModelSource:
    path: str  # what the user gave: folder, hub id or file
    single_file: bool
    config_source: str  # folder or hub id holding the configs and tokenizers



def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def read_model_index(path: str, revision: str | None, what: str = "model.path") -> dict:
    """model_index.json of a local folder, or of a hub id (from its cache when offline)."""
    local = Path(path).expanduser() / "model_index.json"
    try:
        if local.is_file():
            return json.loads(local.read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "model_index.json", revision=revision)).read_text())
    except (OSError, ValueError) as err:
        hint = (f"it is not in the Hugging Face cache and HF_HUB_OFFLINE is set - run `hf download {path}` once "
                "online, or point it at a local diffusers folder") if _offline() else \
            "check the hub id (and your access to it) or point it at a local diffusers folder"
        raise ConfigError(f"{what}={path!r}: cannot read its model_index.json ({first_line(err)}); {hint}") from None


def _components(index: dict) -> set[str]:
    return {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}


def _check_folder_family(path: str, family: str, components: set[str], what: str) -> None:
    found = "sdxl" if "text_encoder_2" in components else None
    if found == "sdxl" and family != "sdxl":
        raise ConfigError(f"{what}={path!r} is an SDXL model (it has text_encoder_2) but model.family is "
                          f"{family!r}; use model=sdxl or set model.family=sdxl")
    if found is None and family == "sdxl":
        raise ConfigError(f"{what}={path!r} has one text encoder, so it is not SDXL; use model=sd15 or model=sd2 "
                          "(or set model.family)")


def is_hub_id(path: str) -> bool:
    parts = str(path).split("/")
    return len(parts) == 2 and all(parts) and not str(path).startswith((".", "~", "/"))


def _single_file_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"model.path={str(path)!r}: not a readable safetensors file ({first_line(err)})") \
                from None
    return list(read_state_dict(path, "model.path"))  # weights_only: a pickle with code is refused here


def resolve_source(path: str, family: str, config_dir: str | None = None,
                   revision: str | None = None) -> ModelSource:
    local = Path(str(path)).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ConfigError(f"model.path={path!r} is a folder but not a diffusers model (no model_index.json)")
        _check_folder_family(str(local), family, _components(read_model_index(str(local), revision)), "model.path")
        return ModelSource(str(local), False, str(local))
    if local.is_file() or local.suffix in SINGLE_FILE_SUFFIXES:
        if not local.is_file():
            raise ConfigError(f"model.path={path!r} does not exist")
        if local.suffix not in SINGLE_FILE_SUFFIXES:
            raise ConfigError(f"model.path={path!r}: a single-file checkpoint must end in "
                              f"{', '.join(SINGLE_FILE_SUFFIXES)}")
        found = checkpoint_family(_single_file_keys(local))
        if found is None:
            raise ConfigError(f"model.path={path!r} holds no SD 1.x, SD 2.x or SDXL text encoder; textual inversion "
                              "needs a full checkpoint (UNet, VAE and text encoders)")
        if found != family:
            raise ConfigError(f"model.path={path!r} is an {FAMILY_NAMES[found]} checkpoint but model.family is "
                              f"{family!r} ({FAMILY_NAMES[family]}); choose the matching model= config")
        config = config_dir or DEFAULT_CONFIG_REPOS[family]
        try:
            index = read_model_index(config, None, "model.config_dir")
        except ConfigError:
            if config_dir:
                raise
            raise ConfigError(f"model.path={path!r} is a single file: its configs and tokenizers come from "
                              f"model.config_dir, or from the hub repo {config!r} when it can be read - "
                              f"{'offline it is not cached' if _offline() else 'it cannot be reached'}; set "
                              f"model.config_dir=<a local diffusers folder of the {family} family>") from None
        _check_folder_family(config, family, _components(index), "model.config_dir")
        return ModelSource(str(local), True, config)
    if not is_hub_id(path):
        raise ConfigError(f"model.path={path!r} is neither an existing folder or file nor a hub id like 'org/name'")
    _check_folder_family(str(path), family, _components(read_model_index(str(path), revision)), "model.path")
    return ModelSource(str(path), False, str(path))
