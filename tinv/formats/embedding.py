"""Embedding files in the formats every UI reads, and tinv's metadata inside them.

  kohya / A1111 / ComfyUI safetensors: {"emb_params": [N, D]}  or SDXL {"clip_l": [N, 768], "clip_g": [N, 1280]}
  A1111 .pt: {"string_to_param": {"*": [N, D]}, "string_to_token", "name", "step", ...}  or SDXL clip_l/clip_g
  A1111 .png: the same as JSON in a text chunk
  diffusers: {"<token>": [N, D]} in learned_embeds.safetensors/.bin; SDXL: learned_embeds.* (encoder 1) and
             learned_embeds_2.* (encoder 2) side by side, which tinv reads and writes as one folder
  an A1111 bundle (tinv.formats.bundle): its embedding is read as one
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import ConfigError, first_line
from .bundle import unbundle
from .keys import SD_KEY, SDXL_KEYS
from .tensorfile import check_finite, read_safetensors, write_safetensors

FORMATS = ("kohya", "a1111", "diffusers")
DIFFUSERS_FILES = ("learned_embeds", "learned_embeds_2")
PT_HEADER = "tinv"  # an A1111 .pt's entry holding tinv's header keys


@dataclass
class EmbeddingMeta:
    """What an embedding file says of itself besides its vectors, in every format that has room for it."""

    token: str  # the word to write in prompts: the file's name (A1111 and ComfyUI take the file name)
    family: str = ""
    base_model: str = ""  # what it was trained on: hub id, folder or file
    step: int = 0
    model: str = ""  # the model= choice of that run (toy, sd15, ...): finds the base model on another machine

    def header(self, vectors: dict[str, torch.Tensor]) -> dict[str, str]:
        n = next(iter(vectors.values())).shape[0]
        return {"tinv.token": self.token, "tinv.num_vectors": str(n), "tinv.family": self.family,
                "tinv.base_model": self.base_model, "tinv.step": str(self.step), "tinv.model": self.model}

    @classmethod
    def from_header(cls, header: dict, token: str) -> "EmbeddingMeta":
        """The metadata a file carried (tinv's header keys), under the name `token`."""
        step = str(header.get("tinv.step", ""))
        return cls(token, header.get("tinv.family", ""), header.get("tinv.base_model", ""),
                   int(step) if step.isdigit() else 0, header.get("tinv.model", ""))


def keeps_metadata(path: Path, fmt: str, vectors: dict) -> bool:
    """Whether a file of this format has room for EmbeddingMeta: not A1111's SDXL .pt (A1111 reads every entry as a
    tensor) nor a diffusers .bin (diffusers takes its one entry as the token). `fmt` is one of FORMATS."""
    if fmt == "a1111":
        return SD_KEY in vectors
    return not (fmt == "diffusers" and Path(path).suffix == ".bin")


def save_embedding(path: str | Path, vectors: dict[str, torch.Tensor], meta: EmbeddingMeta, fmt: str) -> Path:
    """Write the embedding atomically in one of FORMATS (save.format safetensors = kohya, pt = a1111).

    Tensors keep their dtype. A NaN or inf is never written.
    """
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in vectors.items()}
    check_finite(path, tensors)
    fmt = {"safetensors": "kohya", "pt": "a1111"}.get(fmt, fmt)
    if fmt == "kohya":
        write_safetensors(path, tensors, meta.header(tensors))
    elif fmt == "a1111":
        if SD_KEY in tensors:  # A1111 reads name and step and ignores entries it does not know, such as ours
            data = {"string_to_token": {"*": 265}, "string_to_param": {"*": tensors[SD_KEY]}, "name": meta.token,
                    "step": meta.step, "sd_checkpoint": None, "sd_checkpoint_name": meta.base_model,
                    PT_HEADER: meta.header(tensors)}
        else:  # A1111 reads SDXL .pt files as a plain clip_l / clip_g dict, every entry a tensor
            data = dict(tensors)
        with atomic_path(path) as tmp:
            torch.save(data, str(tmp))
    elif fmt == "diffusers":
        _save_diffusers(path, tensors, meta)
    else:
        raise ConfigError(f"embedding format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    return path


def _save_diffusers(path: Path, tensors: dict[str, torch.Tensor], meta: EmbeddingMeta) -> None:
    def write(target: Path, tensor: torch.Tensor) -> None:
        if target.suffix == ".bin":
            with atomic_path(target) as tmp:
                torch.save({meta.token: tensor}, str(tmp))
        else:
            write_safetensors(target, {meta.token: tensor}, meta.header(tensors))

    if SD_KEY in tensors:
        if path.suffix not in (".safetensors", ".bin"):
            path = path / f"{DIFFUSERS_FILES[0]}.safetensors"
        write(path, tensors[SD_KEY])
    else:  # SDXL: the folder holds one file per encoder
        for name, key in zip(DIFFUSERS_FILES, SDXL_KEYS):
            write(path / f"{name}.safetensors", tensors[key])


@dataclass
class LoadedEmbedding:
    vectors: dict[str, torch.Tensor]  # {emb_params} or {clip_l, clip_g}, dtype as stored
    name: str | None  # the token name the file carries, if any
    header: dict = field(default_factory=dict)  # safetensors metadata (tinv writes tinv.family, tinv.base_model, ...)


IMAGE_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP"}
A1111_IMAGE_CHUNK = "sd-ti-embedding"  # A1111 can save an embedding as an image: JSON in this PNG text chunk


def _what_else(path: Path) -> str | None:
    """What a file that should hold an embedding holds instead, in words (None: it may be one)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "it is empty"
    kind = next((name for magic, name in IMAGE_MAGIC.items() if head.startswith(magic)), None)
    if kind or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return f"it is an image, {kind or 'WEBP'}"
    if b"\0" not in head:
        try:
            head.decode("utf-8")
            return "it is a text file"
        except UnicodeDecodeError:
            pass
    return None


def _a1111_image(path: Path) -> dict | None:
    """The embedding A1111 hid in a PNG's text chunk (JSON, tensors as nested lists: nothing to unpickle)."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get(A1111_IMAGE_CHUNK)
    if not text:
        return None
    return json.loads(base64.b64decode(text), object_hook=lambda d: torch.tensor(d["TORCHTENSOR"])
                      if set(d) == {"TORCHTENSOR"} else d)


def _read_tensors(path: Path) -> tuple[object, dict]:
    """The file's content and its header metadata (safetensors' own; an A1111 .pt's tinv entry)."""
    other = _what_else(path)
    if other == "it is an image, PNG":
        data = _a1111_image(path)
        if data is not None:
            return data, {}
    if other:
        raise ConfigError(f"{path}: not an embedding file ({other}); give the .safetensors or .pt file a run wrote "
                          "(or a diffusers learned_embeds file or folder)")
    if path.suffix == ".safetensors":
        return read_safetensors(path, "an embedding")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means we will not trust the file
        raise ConfigError(f"{path}: refused - not a plain tensor file ({first_line(err)}); only weights are loaded, "
                          "never pickled code. Convert it to .safetensors") from None
    header = data.pop(PT_HEADER, None) if isinstance(data, dict) else None
    return data, {str(k): str(v) for k, v in header.items()} if isinstance(header, dict) else {}


def read_embedding(path: str | Path) -> LoadedEmbedding:
    """Any common embedding file (or the diffusers SDXL folder), normalised to our keys."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [next((path / f"{n}{ext}" for ext in (".safetensors", ".bin") if (path / f"{n}{ext}").is_file()),
                      None) for n in DIFFUSERS_FILES]
        if found[0] is None:
            raise ConfigError(f"{path}: a folder embedding must hold learned_embeds.safetensors (or .bin)")
        parts = [read_embedding(f) for f in found if f is not None]
        if len(parts) == 1:
            return parts[0]
        return LoadedEmbedding({"clip_l": parts[0].vectors[SD_KEY], "clip_g": parts[1].vectors[SD_KEY]},
                               parts[0].name, parts[0].header)
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist; give the path of an embedding file")
    data, header = _read_tensors(path)
    name = header.get("tinv.token")
    if isinstance(data, torch.Tensor):
        data = {SD_KEY: data}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: holds a {type(data).__name__}, not an embedding")
    if any(k.startswith("bundle_emb.") for k in data):  # an A1111 bundle: a LoRA with the embedding inside
        _, name, data = unbundle(data, str(path))
    if "string_to_param" in data:
        name = data.get("name") if isinstance(data.get("name"), str) else name
        data = {SD_KEY: next(iter(data["string_to_param"].values()))}
    if all(k in data for k in SDXL_KEYS):
        vectors = {k: data[k] for k in SDXL_KEYS}
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise ConfigError(f"{path}: expected one tensor or clip_l+clip_g, found keys {sorted(data)}")
        key, tensor = next(iter(tensors.items()))
        if key not in (SD_KEY, "emp_params", "*"):  # a diffusers file names its token
            name = name or key
        vectors = {SD_KEY: tensor}
    vectors = {k: v.unsqueeze(0) if isinstance(v, torch.Tensor) and v.ndim == 1 else v for k, v in vectors.items()}
    for key, value in vectors.items():
        check_vectors(value, f"{path}: {key}")
    return LoadedEmbedding({k: v.detach() for k, v in vectors.items()}, name, header)


def check_vectors(value, where: str) -> None:
    """Embedding rows are a non-empty (vectors x width) matrix of finite real numbers; anything else is one line
    naming `where`."""
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"{where} holds a {type(value).__name__}, not a tensor of vectors")
    problem = (f"a {value.ndim}-d tensor {tuple(value.shape)}" if value.ndim != 2 else
               f"an empty tensor {tuple(value.shape)}" if value.numel() == 0 else
               f"{value.dtype} values" if not value.is_floating_point() else
               "NaN or inf values" if not torch.isfinite(value).all() else None)
    if problem:
        raise ConfigError(f"{where} holds {problem}, not embedding vectors (a vectors x width matrix of finite "
                          "numbers); the file is broken or not an embedding: train it again or take another copy")


def load_embedding(path: str | Path) -> dict[str, torch.Tensor]:
    """The vectors of any common embedding file, as fp32 (what training starts from)."""
    return {k: v.float() for k, v in read_embedding(path).vectors.items()}
