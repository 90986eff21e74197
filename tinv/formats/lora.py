"""LoRA files: kohya/A1111's layout (`lora_unet_<module path with _>`, `.lora_down.weight`, `.lora_up.weight`,
`.alpha`; text encoders `lora_te_` or, for SDXL, `lora_te1_`/`lora_te2_`), which A1111, Forge and ComfyUI load and
diffusers' `load_lora_weights` converts, and the peft/diffusers layout (`unet.<path>.lora_A.weight`, ...) with
alpha/rank folded into the up weights, since diffusers reads no alpha from a plain file."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import ConfigError
from .bundle import unbundle
from .keys import BUNDLE_PREFIX, DIFFUSERS_PREFIX, KOHYA_PREFIX, SD_KEY, canonical_path
from .tensorfile import read_safetensors

ADAPTER = "tinv"  # the adapter name in peft and in a pipeline that loads the file


def module_entries(owner: str, path: str, down: torch.Tensor, up: torch.Tensor, alpha: float, fmt: str
                   ) -> dict[str, torch.Tensor]:
    """One LoRA module's tensors in a file layout (kohya, diffusers): `owner` is unet or an encoder key."""
    path = canonical_path(owner, path)
    if fmt == "kohya":
        name = f"{KOHYA_PREFIX[owner]}_{path.replace('.', '_')}"
        return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    name = f"{DIFFUSERS_PREFIX[owner]}.{path}"
    return {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": (up * (alpha / down.shape[0])).contiguous()}


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA (or bundle) file's tensors and metadata, every tensor finite floating-point weights."""
    path = Path(path).expanduser()
    if not path.is_file() or path.suffix != ".safetensors":
        raise ConfigError(f"{str(path)!r}: expected an existing .safetensors LoRA file")
    tensors, metadata = read_safetensors(path, "a LoRA")
    bad = next((k for k, v in tensors.items() if not (v.is_floating_point() and torch.isfinite(v).all())), None)
    if bad is not None:
        raise ConfigError(f"{path}: {bad} is not finite floating-point weights ({tensors[bad].dtype}, NaN or "
                          "inf); the file is broken: write it again or take another copy")
    return tensors, metadata


def to_kohya(tensors: dict[str, torch.Tensor], sdxl: bool, where: str) -> dict[str, torch.Tensor]:
    """A LoRA in either layout, as kohya's (a diffusers/peft-layout file has its scale folded in: alpha = rank)."""
    if not any(".lora_A." in k for k in tensors):
        return dict(tensors)
    owners = {"unet": "unet", "text_encoder": "clip_l" if sdxl else SD_KEY, "text_encoder_2": "clip_g"}
    out = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight", key)
        if not m:
            raise ConfigError(f"{where}: {key!r} is neither a kohya nor a diffusers LoRA key")
        owner, path, part = owners[m.group(1)], m.group(2), m.group(3)
        name = f"{KOHYA_PREFIX[owner]}_{canonical_path(owner, path).replace('.', '_')}"
        out[f"{name}.lora_{'down' if part == 'A' else 'up'}.weight"] = value
        if part == "A":
            out[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    return out


def load_into_pipeline(pipe, embedding: str | Path | None, lora: str | Path | None, scale: float = 1.0) -> bool:
    """Load a LoRA into a diffusers pipeline as users do (`load_lora_weights`): the `lora` file, else the LoRA a
    bundled `embedding` carries. Returns whether one was loaded."""
    source = lora if lora is not None else embedding
    if source is None or (lora is None and not (Path(source).suffix == ".safetensors" and Path(source).is_file())):
        return False
    tensors, _ = read_lora(source)
    if any(k.startswith(BUNDLE_PREFIX) for k in tensors):  # diffusers refuses bundle keys: hand it the LoRA
        tensors = unbundle(tensors, str(source))[0]
    elif lora is None:  # a plain embedding brings no LoRA
        return False
    pipe.load_lora_weights(tensors, adapter_name=ADAPTER)
    if scale != 1.0:
        pipe.set_adapters([ADAPTER], [scale])
    return True
