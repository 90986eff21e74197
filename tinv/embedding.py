"""The trainable vectors: new tokens, their initialisation, the splice into the token lookup, and the file formats.

Only N x width floats per text encoder train. The vocabulary matrix stays frozen and is never handed to the
optimizer: a `SplicedEmbedding` replaces each encoder's token-embedding module, looks up ordinary ids in the frozen
matrix and puts the trainable rows at the new ids.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_path
from .errors import ConfigError, first_line

log = logging.getLogger(__name__)

SD_KEY = "emb_params"  # kohya / A1111 / ComfyUI key for single-encoder models
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL: text encoder 1 (CLIP-L) and 2 (OpenCLIP bigG)


def token_names(string: str, num_vectors: int) -> list[str]:
    """kohya's naming: `tok`, `tok1`, ..., `tok{N-1}`."""
    return [string] + [f"{string}{i}" for i in range(1, num_vectors)]


class SplicedEmbedding(nn.Module):
    """Token lookup = frozen vocabulary rows + trainable fp32 rows for ids >= first_new_id."""

    def __init__(self, base: nn.Embedding, first_new_id: int, vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.vectors = nn.Parameter(vectors.detach().to(torch.float32).clone())

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the embedding's dtype or device still finds it
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        out = self.base(torch.where(is_new, torch.zeros_like(input_ids), input_ids))
        rows = (input_ids - self.first_new_id).clamp(0, self.vectors.shape[0] - 1)
        new = self.vectors[rows].to(out.dtype)
        return torch.where(is_new.unsqueeze(-1), new, out)


def _vocab_hit(tokenizer, name: str) -> int | None:
    """The id under which the tokenizer already knows `name` as a whole token (word form included), else None."""
    vocab = tokenizer.get_vocab()
    for form in (name, name.lower(), name + "</w>", name.lower() + "</w>"):
        if form in vocab:
            return vocab[form]
    return None


class ConceptToken:
    """The trigger word, its N token names, and (once installed) the trainable vectors of every text encoder."""

    def __init__(self, string: str, num_vectors: int | None = 1, init_word: str | None = None,
                 weights: str | None = None, norm: str = "none", norm_weight: float = 0.01,
                 train_encoders: str = "both", init_from: str = "output"):
        string = (string or "").strip()
        if not string or re.search(r"\s", string):
            raise ConfigError(f"token.string={string!r} must be one word without spaces, e.g. token.string=mychar")
        self.string = string
        self.init_word = init_word
        self.weights_path = weights
        try:
            self.start = load_embedding(weights) if weights else None
        except ConfigError as err:
            raise ConfigError(f"token.weights: {err}") from None
        if self.start is not None:
            rows = next(iter(self.start.values())).shape[0]
            if num_vectors not in (None, rows):
                raise ConfigError(f"token.num_vectors={num_vectors} but token.weights={weights} has {rows} "
                                  f"vectors; set token.num_vectors={rows} or leave it unset")
            num_vectors = rows
        self.names = token_names(string, num_vectors or 1)
        self.splices: dict[str, SplicedEmbedding] = {}
        self.first_ids: dict[str, int] = {}  # per encoder key: the id of the first token name
        self.norm, self.norm_weight, self.train_encoders = norm, norm_weight, train_encoders
        self.init_from = init_from  # input: the init word's rows; output: given to install() by the caller
        self.initial: dict[str, torch.Tensor] = {}  # the starting vectors, for l2_to_init
        self.max_norms: dict[str, float] = {}  # the longest vocabulary row per encoder, for clamp_to_vocab_max
        self._pattern = re.compile(rf"(?<!\w){re.escape(string)}(?!\w)", re.IGNORECASE)

    @property
    def num_vectors(self) -> int:
        return len(self.names)

    def check_new(self, encoders) -> None:
        """Fail before any weights load if the vectors cannot fit in a prompt, or a token name is already known to
        any tokenizer."""
        positions = min(enc.tokenizer.model_max_length for enc in encoders)
        if self.num_vectors > positions - 2:  # past the prompt's length the rest is cut off and never trains
            raise ConfigError(f"token.num_vectors={self.num_vectors}: a prompt holds {positions} tokens, its start "
                              f"and end included, so at most {positions - 2} vectors fit and they leave no room for "
                              "the template's words; 1 to 8 is usual, up to about 16")
        for enc in encoders:
            for name in self.names:
                hit = _vocab_hit(enc.tokenizer, name)
                if hit is not None:
                    free = next(c for c in (f"my{self.string}", f"{self.string}ti", f"{self.string}_ti")
                                if all(_vocab_hit(e.tokenizer, c) is None for e in encoders))
                    raise ConfigError(
                        f"token.string={self.string!r}: {name!r} is already a word the model knows (token {hit} of "
                        f"{enc.label}), so it cannot be learned; pick a new word, e.g. token.string={free}")

    def check_start(self, encoders) -> None:
        """token.weights must fit the model: one tensor per encoder, of its width, with equal row counts."""
        if self.start is None:
            return
        rows = {k: v.shape[0] for k, v in self.start.items()}
        if len(set(rows.values())) != 1:
            raise ConfigError(f"token.weights: its tensors have different vector counts {rows}; the file is broken")
        for enc in encoders:
            if enc.key not in self.start:
                if self.weights_path and Path(self.weights_path).name.startswith(DIFFUSERS_FILES[0]):
                    raise ConfigError(f"token.weights={self.weights_path} is one file of a diffusers SDXL pair; give "
                                      "the folder holding learned_embeds.safetensors and learned_embeds_2.safetensors")
                raise ConfigError(f"token.weights holds vectors for {sorted(self.start)} but this model needs "
                                  f"{[e.key for e in encoders]} (one set per text encoder); it was trained for another "
                                  "model family")
            width = self.start[enc.key].shape[1]
            if width != enc.width:
                raise ConfigError(f"token.weights: its {enc.key} vectors are {width} wide but {enc.label} is "
                                  f"{enc.width} wide; it was trained for another model family")

    def contains_token(self, text: str) -> bool:
        return bool(self._pattern.search(text))

    def expand(self, prompt: str) -> str:
        """Every whole-word occurrence of the token string becomes all N token names, in order."""
        return self._pattern.sub(" ".join(self.names), prompt)

    def add_to_tokenizers(self, encoders) -> None:
        """Add the token names to each tokenizer (once) and check that a prompt tokenizes to the new ids."""
        from transformers import AddedToken

        if self.first_ids:
            return
        self.check_new(encoders)
        for enc in encoders:
            tok = enc.tokenizer
            first = len(tok)
            tok.add_tokens([AddedToken(n, single_word=True) for n in self.names])
            ids = tok.convert_tokens_to_ids(self.names)
            probe = tok(self.expand(self.string), add_special_tokens=False).input_ids
            if ids != list(range(first, first + self.num_vectors)) or probe != ids:
                raise ConfigError(f"token.string={self.string!r} does not come out as its own new tokens from the "
                                  f"tokenizer of {enc.label} (got ids {probe}); use a lowercase word of letters and "
                                  "digits")
            self.first_ids[enc.key] = first

    def install(self, encoders, seed: int, init_rows: dict[str, torch.Tensor] | None = None) -> None:
        """Splice trainable rows for the new ids into each encoder's token lookup. `init_rows` (per encoder key,
        one row per piece of the init word) replace the init word's token embeddings as the start."""
        self.add_to_tokenizers(encoders)
        for enc in encoders:
            base = enc.model.get_input_embeddings()
            if isinstance(base, SplicedEmbedding):
                raise ConfigError("this model already has trained tokens spliced in; load a fresh backbone")
            if init_rows is not None and self.start is None:
                rows = init_rows[enc.key].float().cpu()
                init = torch.stack([rows[i % len(rows)] for i in range(self.num_vectors)])
            else:
                init = self._initial_rows(enc, base.weight.detach(), seed)
            splice = SplicedEmbedding(base, self.first_ids[enc.key], init).to(base.weight.device)
            splice.vectors.requires_grad_(self.train_encoders in ("both", enc.key))
            enc.model.set_input_embeddings(splice)
            self.splices[enc.key] = splice
            self.initial[enc.key] = splice.vectors.detach().clone()
            self.max_norms[enc.key] = base.weight.detach().float().norm(dim=1).max().item()

    def _initial_rows(self, enc, vocab: torch.Tensor, seed: int) -> torch.Tensor:
        width = vocab.shape[1]
        if self.start is not None:
            self.check_start([enc])
            return self.start[enc.key].float()
        vocab = vocab.float().cpu()
        if self.init_word:
            ids = enc.tokenizer(self.init_word, add_special_tokens=False).input_ids
            if not ids:
                raise ConfigError(f"token.init_word={self.init_word!r} tokenizes to nothing; use a plain word")
            if len(ids) > 1:
                use = "only the first piece is used" if self.num_vectors == 1 else \
                    f"the {self.num_vectors} vectors take the pieces in turn"
                log.warning("token.init_word=%r is not one word to %s (it splits into %d pieces); %s - a word the "
                            "model knows starts the vectors closer to your concept", self.init_word, enc.label,
                            len(ids), use)
            return torch.stack([vocab[ids[i % len(ids)]] for i in range(self.num_vectors)])
        # No init word: draw each vector from the vocabulary's per-dimension mean and spread, so it starts with
        # the scale of a real word embedding but no meaning.
        gen = torch.Generator().manual_seed(seed)
        return vocab.mean(0) + vocab.std(0) * torch.randn(self.num_vectors, width, generator=gen)

    def parameters(self) -> list[nn.Parameter]:
        """The trained vectors (SDXL with token.train_encoders=clip_l|clip_g: one encoder's only)."""
        return [s.vectors for s in self.splices.values() if s.vectors.requires_grad]

    def frozen_keys(self) -> list[str]:
        return [k for k, s in self.splices.items() if not s.vectors.requires_grad]

    def regularizer(self) -> torch.Tensor | float:
        """token.norm=l2_to_init: weight x squared distance of the trained vectors from where they started."""
        if self.norm != "l2_to_init":
            return 0.0
        return self.norm_weight * sum(((s.vectors - self.initial[k].to(s.vectors.device)) ** 2).sum()
                                      for k, s in self.splices.items() if s.vectors.requires_grad)

    @torch.no_grad()
    def after_step(self) -> None:
        """token.norm=clamp_to_vocab_max: no vector grows longer than the longest word embedding."""
        if self.norm != "clamp_to_vocab_max":
            return
        for key, splice in self.splices.items():
            norms = splice.vectors.norm(dim=1, keepdim=True)
            splice.vectors.mul_(torch.clamp(self.max_norms[key] / norms.clamp_min(1e-12), max=1.0))

    @torch.no_grad()
    def load_vectors(self, vectors: dict[str, torch.Tensor]) -> None:
        for key, value in vectors.items():
            self.splices[key].vectors.copy_(value.to(self.splices[key].vectors.device))

    def vectors(self) -> dict[str, torch.Tensor]:
        """The current vectors by file key, detached fp32 on the CPU."""
        return {key: s.vectors.detach().float().cpu().clone() for key, s in self.splices.items()}


# ---- file formats -------------------------------------------------------------------------------------------------
#
#  kohya / A1111 / ComfyUI safetensors: {"emb_params": [N, D]}  or SDXL {"clip_l": [N, 768], "clip_g": [N, 1280]}
#  A1111 .pt: {"string_to_param": {"*": [N, D]}, "string_to_token", "name", "step", ...}  or SDXL clip_l/clip_g
#  diffusers: {"<token>": [N, D]} in learned_embeds.safetensors/.bin; SDXL: learned_embeds.* (encoder 1) and
#             learned_embeds_2.* (encoder 2) side by side, which tinv reads and writes as one folder

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
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise RuntimeError(f"refusing to write {path}: the {key} vectors hold NaN or inf")
    fmt = {"safetensors": "kohya", "pt": "a1111"}.get(fmt, fmt)
    if fmt == "kohya":
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta.header(tensors))
            sort_metadata(tmp)
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


def sort_metadata(path: Path) -> None:
    """safetensors writes its metadata map in a random order; sorted, the same vectors give the same bytes (and the
    same checksum) every time. The header keeps its length, so only its bytes are rewritten."""
    import json

    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:
            f.seek(8)
            f.write(text + b" " * (size - len(text)))


def _save_diffusers(path: Path, tensors: dict[str, torch.Tensor], meta: EmbeddingMeta) -> None:
    from safetensors.torch import save_file

    def write(target: Path, tensor: torch.Tensor) -> None:
        with atomic_path(target) as tmp:
            if target.suffix == ".bin":
                torch.save({meta.token: tensor}, str(tmp))
            else:
                save_file({meta.token: tensor}, str(tmp), metadata=meta.header(tensors))
                sort_metadata(tmp)

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
    import base64
    import json

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
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:  # noqa: BLE001 - whatever is wrong with the file, say so in one line
            raise ConfigError(f"{path}: not a readable safetensors file ({first_line(err)}); it is broken or cut short: "
                              "write it again or take another copy") from None
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
        from .lora import unbundle

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
