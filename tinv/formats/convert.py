"""Conversion: an embedding from any format tinv reads to any it writes (tensors unchanged, metadata kept wherever
the format has room), and an A1111 bundle taken apart or put together."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import ConfigError
from .bundle import bundle, unbundle
from .embedding import EmbeddingMeta, keeps_metadata, read_embedding, save_embedding
from .keys import BUNDLE_PREFIX, SDXL_KEYS
from .lora import read_lora, to_kohya
from .tensorfile import write_safetensors


def _format_for(out: Path, explicit: str | None) -> str:
    if explicit:
        return explicit
    if out.suffix == ".pt":
        return "a1111"
    if out.suffix == ".safetensors" and not out.name.startswith("learned_embeds"):
        return "kohya"
    return "diffusers"  # .bin, learned_embeds*.safetensors, or a folder


def convert(src: str | Path, out: str | Path, fmt: str | None = None, token: str | None = None) -> Path:
    """SRC in another format, its metadata (name, base model, family, step) kept wherever the format has room."""
    src = Path(src).expanduser()
    loaded = read_embedding(src)
    meta = EmbeddingMeta.from_header(loaded.header, token or loaded.name or src.stem)
    return convert_vectors(loaded.vectors, meta, out, fmt)


def convert_vectors(vectors: dict, meta: EmbeddingMeta, out: str | Path, fmt: str | None = None) -> Path:
    """Write vectors (by encoder key) as an embedding in `fmt`, or the format OUT's name implies; says so on stderr
    when that format has no room for the base model the metadata names."""
    out = Path(out).expanduser()
    fmt = _format_for(out, fmt)
    if meta.base_model and not keeps_metadata(out, fmt, vectors):
        print(f"note: {out} holds the vectors alone (the format has no room for more): tinv-generate will need "
              f"--model {meta.model or meta.base_model}", file=sys.stderr)
    if fmt == "diffusers" and len(vectors) == 1 and out.suffix not in (".safetensors", ".bin"):
        out.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers" and len(vectors) == 2:
        if out.suffix:
            raise ConfigError(f"{out}: an SDXL embedding in diffusers format is two files; give a folder path")
        out.mkdir(parents=True, exist_ok=True)
    return save_embedding(out, vectors, meta, fmt)


def split_bundle(src: str | Path, embedding_out: str | Path, lora_out: str | Path,
                 embedding_format: str | None = None) -> tuple[Path, Path]:
    """A bundle -> its embedding (in any embedding format) and its plain kohya-layout LoRA."""
    tensors, metadata = read_lora(src)
    lora, token, vectors = unbundle(tensors, str(src))
    if not lora:
        raise ConfigError(f"{src}: holds a bundled embedding but no LoRA weights")
    lora_path = write_safetensors(Path(lora_out).expanduser(), lora, metadata)
    meta = EmbeddingMeta.from_header(metadata, token)
    return convert_vectors(vectors, meta, embedding_out, embedding_format), lora_path


def join_bundle(embedding: str | Path, lora_src: str | Path, out: str | Path, token: str | None = None) -> Path:
    """An embedding file and a LoRA file (kohya or diffusers layout) -> one A1111 bundle."""
    loaded = read_embedding(embedding)
    tensors, metadata = read_lora(lora_src)
    if any(k.startswith(BUNDLE_PREFIX) for k in tensors):
        raise ConfigError(f"{lora_src}: is already a bundle; split it first (tinv-convert split)")
    name = token or loaded.name or Path(embedding).stem
    lora = to_kohya(tensors, set(loaded.vectors) == set(SDXL_KEYS), str(lora_src))
    meta = {**metadata, "tinv.token": name}
    bundled = bundle(lora, name, {k: v.float() for k, v in loaded.vectors.items()})
    return write_safetensors(Path(out).expanduser(), bundled, meta)
