"""Finding images and captions on disk and reading them as RGB."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(image_dir: Path) -> list[Path]:
    return sorted(p for p in image_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_caption(image: Path, extension: str) -> str:
    """The same-stem caption file's text, or "" when there is none."""
    path = image.with_suffix(extension if extension.startswith(".") else f".{extension}")
    if not path.is_file():
        return ""
    return path.read_bytes().decode("utf-8", errors="replace").strip()


def load_rgb(path: Path):
    """RGB image with EXIF orientation applied; transparency composited on white."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return img.convert("RGB")
