"""The one reader and the one checked, atomic writer of safetensors files: a broken file is one line naming it, and
a NaN, an inf or a half-written file never reaches the disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..errors import ConfigError, first_line


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and its metadata; `what` it should be (an embedding, a LoRA) names it in the error."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001 - truncated, empty, a bad header: one line, whatever the cause
        raise ConfigError(f"{path}: not a readable safetensors file ({first_line(err)}); it is broken, cut short or "
                          f"not {what}: write it again or take another copy") from None


def check_finite(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """A NaN or inf is never written: the file would load and draw noise."""
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise RuntimeError(f"refusing to write {path}: {key} holds NaN or inf")


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write atomically, finite values only, the metadata in sorted order."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    check_finite(path, tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        sort_metadata(tmp)
    return path


def sort_metadata(path: Path) -> None:
    """safetensors writes its metadata map in a random order; sorted, the same vectors give the same bytes (and the
    same checksum) every time. The header keeps its length, so only its bytes are rewritten."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:
            f.seek(8)
            f.write(text + b" " * (size - len(text)))
