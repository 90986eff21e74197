"""Finding images and captions on disk, checking them, and reading them as 8-bit RGB.

Bad files never stop a run: an unreadable, truncated or non-image file is skipped with one warning naming it.
Transparency is composited on white; grayscale, 16-bit, CMYK and palette images are converted; EXIF orientation
is applied, so the size we bucket by is the size the user sees.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def list_images(image_dir: Path) -> list[Path]:
    return sorted(p for p in image_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(image_dir).parts))


def read_caption(image: Path, extension: str) -> str | None:
    """The same-stem caption file's text; None when there is none. Bad UTF-8 is replaced, with a warning."""
    path = image.with_suffix(extension if extension.startswith(".") else f".{extension}")
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8; undecodable bytes were replaced (save it as UTF-8 to fix)", path)
        return data.decode("utf-8", errors="replace").strip()


def read_metadata(path: str | Path, separator: str) -> dict[str, str]:
    """kohya fine-tuning metadata: {image key: {"caption": ..., "tags": ...}} -> {key: caption}."""
    path = Path(path).expanduser()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"metadata_file={str(path)!r}: cannot read it as JSON ({err})") from None
    out = {}
    for key, entry in doc.items():
        parts = [entry.get("caption"), entry.get("tags")] if isinstance(entry, dict) else [str(entry)]
        out[key] = f"{separator} ".join(p.strip() for p in parts if p and p.strip())
    return out


def probe(path: Path) -> tuple[int, int] | None:
    """The displayed (width, height), after fully decoding the file to catch truncation; None if unusable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(0x0112) in _ROTATED:
                width, height = height, width
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))  # decode at 1/8: faster
            img.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("skipping %s: not a readable image (%s)", path, text)
        return None
    if width < 8 or height < 8:
        log.warning("skipping %s: %dx%d is too small to train on", path, width, height)
        return None
    return width, height


def load_rgb(path: Path):
    """8-bit RGB with EXIF orientation applied; transparency composited on white; 16-bit scaled, not clipped."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(img, dtype=np.float32)
            scale = 257.0 if array.max() > 255 else 1.0
            img = Image.fromarray(np.clip(array / scale, 0, 255).astype(np.uint8), "L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return img.convert("RGB")
