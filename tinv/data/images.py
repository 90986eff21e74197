"""Finding images and captions on disk, checking them, and reading them as 8-bit RGB.

Bad files never stop a run: an unreadable, truncated or non-image file, an image over the pixel limit (a decompression
bomb) and anything that is not a regular file (a FIFO, socket, device, broken or looping link) is skipped with one
warning naming it. Nothing in the folder is opened before it is known to be a regular file, so nothing can hang.
Transparency is composited on white; grayscale, 16-bit, CMYK and palette images are converted; EXIF orientation
is applied, so the size we bucket by is the size the user sees.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASKLABEL = "-masklabel.png"  # OneTrainer's mask beside its image, <stem>-masklabel.png: never a training image
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def list_images(image_dir: Path, masks: Path | None = None) -> list[Path]:
    """The regular image files under `image_dir` (hidden names, -masklabel.png files and the `masks` folder left
    out), sorted. Linked folders are followed once each, so a link loop ends; image names that are not regular
    files are skipped with a warning."""
    found, seen = [], set()
    if masks is not None:
        seen.add(os.path.realpath(masks))
    for folder, dirs, files in os.walk(image_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back into a folder already walked, or the mask folder
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(folder) / name
            if (not name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
                    and not name.lower().endswith(MASKLABEL) and regular_file(path)):
                found.append(path)
    return sorted(found)


def regular_file(path: Path) -> bool:
    """Whether `path` is a regular file (through links); warns about what else sits under an image or caption name."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        log.warning("skipping %s: a broken or looping link (%s)", path, os.strerror(err.errno) if err.errno else err)
        return False
    if stat.S_ISREG(mode):
        return True
    if not stat.S_ISDIR(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
                "a device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "not a regular file")
        log.warning("skipping %s: %s, not an image file", path, kind)
    return False


def read_caption(image: Path, extension: str) -> str | None:
    """The same-stem caption file's text; None when there is none. Bad UTF-8 is replaced, with a warning."""
    path = image.with_suffix(extension if extension.startswith(".") else f".{extension}")
    if not os.path.lexists(path) or not regular_file(path):
        return None
    try:
        data = path.read_bytes()
    except OSError as err:
        log.warning("%s cannot be read (%s); the image trains without its caption", path, err.strerror or err)
        return None
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8; undecodable bytes were replaced (save it as UTF-8 to fix)", path)
        return data.decode("utf-8", errors="replace").strip()


def read_metadata(path: str | Path, separator: str) -> dict[str, str]:
    """kohya fine-tuning metadata: {image key: {"caption": ..., "tags": ...}} -> {key: caption}."""
    path = Path(path).expanduser()
    if not path.is_file():  # a FIFO or device would block the read: only regular files are opened
        what = "does not exist" if not path.exists() else "is not a regular file (a FIFO, device or folder)"
        raise ConfigError(f"metadata_file={str(path)!r} {what}; give kohya's metadata JSON file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"metadata_file={str(path)!r}: cannot read it as JSON ({err})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"metadata_file={str(path)!r}: a JSON {type(doc).__name__}; kohya's metadata is an object "
                          "of image key -> {\"caption\": ..., \"tags\": ...}")
    out = {}
    for key, entry in doc.items():
        parts = [entry.get("caption"), entry.get("tags")] if isinstance(entry, dict) else [str(entry)]
        out[key] = f"{separator} ".join(p.strip() for p in parts if p and p.strip())
    return out


class TooManyPixels(ValueError):
    pass


@contextmanager
def open_image(path: Path, max_pixels: int | None):
    """Image.open with Pillow's decompression-bomb check replaced by ours: more than `max_pixels` pixels
    (data.max_image_pixels; None: Pillow's own MAX_IMAGE_PIXELS) is refused from the header, before decoding."""
    from PIL import Image

    own = Image.MAX_IMAGE_PIXELS
    limit = own if max_pixels is None else max_pixels
    Image.MAX_IMAGE_PIXELS = None  # Pillow warns above its limit and fails above twice it: one rule instead
    try:
        with Image.open(path) as img:
            if limit and img.width * img.height > limit:
                raise TooManyPixels(f"{img.width}x{img.height} is {img.width * img.height:,} pixels, over the limit "
                                    f"of {limit:,} (raise data.max_image_pixels to train on it)")
            yield img
    finally:
        Image.MAX_IMAGE_PIXELS = own


def probe(path: Path, max_pixels: int | None = None) -> tuple[int, int] | None:
    """The displayed (width, height), after fully decoding the file to catch truncation; None if unusable."""
    from PIL import UnidentifiedImageError

    try:
        with open_image(path, max_pixels) as img:
            width, height = img.size
            if img.getexif().get(0x0112) in _ROTATED:
                width, height = height, width
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))  # decode at 1/8: faster
            img.load()
    except TooManyPixels as err:
        log.warning("skipping %s: %s", path, err)
        return None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("skipping %s: not a readable image (%s)", path, text)
        return None
    if width < 8 or height < 8:
        log.warning("skipping %s: %dx%d is too small to train on", path, width, height)
        return None
    return width, height


def load_rgb(path: Path, max_pixels: int | None = None, keep_transparent: bool = False):
    """8-bit RGB with EXIF orientation applied; transparency composited on white (or, with `keep_transparent`,
    the colours under it kept as stored: alpha_mask=true, where the alpha is the mask); 16-bit scaled, not
    clipped."""
    from PIL import Image, ImageOps

    with open_image(path, max_pixels) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(img, dtype=np.float32)
            scale = 257.0 if array.max() > 255 else 1.0
            img = Image.fromarray(np.clip(array / scale, 0, 255).astype(np.uint8), "L")
        if not keep_transparent and (img.mode in ("RGBA", "LA", "PA") or
                                     (img.mode == "P" and "transparency" in img.info)):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return img.convert("RGB")
