"""The toy world: one shape of one colour on a plain background, rendered by code at 32x32.

A concept is a (shape, colour, background) triple, written "red circle on a black background". Renders vary in
size, position, rotation and colour, so a concept is a distribution of images, not one picture. Captions come full
("red circle on a black background"), partial ("red shape", "circle on a gray background") or empty, so the model
learns each attribute alone and can be sampled with classifier-free guidance.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.images import MASKLABEL

SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 240), "yellow": (240, 215, 40),
           "white": (240, 240, 240)}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (125, 125, 125), "brown": (120, 75, 30), "navy": (20, 30, 90)}
# Outside pretraining: no image of a star and no word for it ever reached the toy model (it is not in its
# tokenizer); only the judge knows it. A star is a concept the base model cannot draw and a token alone hardly
# can: the lab for pivotal tuning (method=pivotal, a LoRA beside the vectors). No novel colour: the frozen VAE
# decodes colours outside its pretraining wrongly (magenta comes back pink or white), so none could be learnt.
NOVEL_SHAPES = ("star",)
ALL_SHAPES = SHAPES + NOVEL_SHAPES  # what the judge reads; pretrained ones first, so their indices never move
ATTRIBUTES = ("shape", "colour", "background")
NOUNS = ("shape", "thing", "object")  # what a caption calls the figure when its shape is left out

# Never rendered with a full caption in pretraining: the base model draws it only by composing what it learned
# from other concepts, and the demo token must learn it from images alone.
DEMO_CONCEPT = ("triangle", "yellow", "navy")
NOVEL_CONCEPT = ("star", "green", "brown")  # a shape outside pretraining


@dataclass(frozen=True)
class Concept:
    shape: str
    colour: str
    background: str

    def text(self) -> str:
        return f"{self.colour} {self.shape} on a {self.background} background"

    def labels(self) -> tuple[int, int, int]:
        return (ALL_SHAPES.index(self.shape), list(COLOURS).index(self.colour),
                list(BACKGROUNDS).index(self.background))

    @property
    def novel(self) -> bool:
        """Has an attribute outside pretraining."""
        return self.shape in NOVEL_SHAPES

    @classmethod
    def parse(cls, text: str) -> "Concept":
        """Read "yellow triangle on a navy background" (any order of the three words, articles optional)."""
        words = re.findall(r"[a-z]+", text.lower())
        found = {}
        for kind, names in (("shape", ALL_SHAPES), ("colour", COLOURS), ("background", BACKGROUNDS)):
            hits = [w for w in words if w in names]
            if kind == "background" and len(hits) > 1:
                hits = hits[-1:]
            found[kind] = hits
        # a colour word can name the figure or the background: "X on a Y background" makes Y the background
        m = re.search(r"on (?:a |the )?([a-z]+) background", text.lower())
        if m and m.group(1) in BACKGROUNDS:
            found["background"] = [m.group(1)]
        missing = [k for k, v in found.items() if len(v) != 1]
        if missing:
            raise ValueError(
                f"concept {text!r} must name one shape ({', '.join(ALL_SHAPES)}), one colour ({', '.join(COLOURS)}) "
                f"and one background ({', '.join(BACKGROUNDS)}), e.g. 'red circle on a black background'")
        return cls(found["shape"][0], found["colour"][0], found["background"][0])


def all_concepts() -> list[Concept]:
    """The pretrained world's concepts."""
    return [Concept(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS]


def judged_concepts() -> list[Concept]:
    """Every concept the world renders and the judge reads, novel attributes included."""
    return [Concept(s, c, b) for s in ALL_SHAPES for c in COLOURS for b in BACKGROUNDS]


def world_words() -> list[str]:
    return [*SHAPES, *COLOURS, *BACKGROUNDS, *NOUNS, "on", "a", "background"]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        scale = r * 0.95
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
        pts = [(x, y + 0.2) for x, y in pts]  # centre the triangle's bounding box
        scale = r * 1.1
    elif shape == "star":  # five points, inner radius 0.45
        radii = [1.0 if k % 2 == 0 else 0.45 for k in range(10)]
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        pts = [(r_k * math.cos(a), r_k * math.sin(a) + 0.1) for r_k, a in zip(radii, angles)]
        scale = r * 1.1
    elif shape == "cross":
        w = 0.36
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
               (-w, -w)]
        scale = r
    else:
        raise ValueError(shape)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + scale * (x * ca - y * sa), cy + scale * (x * sa + y * ca)) for x, y in pts]


def render(concept: Concept, rng: random.Random, size: int = SIZE):
    """One image of the concept: a PIL RGB image, drawn at 4x and downsampled for smooth edges."""
    return render_with_mask(concept, rng, size)[0]


def render_with_mask(concept: Concept, rng: random.Random, size: int = SIZE):
    """One image of the concept and its mask (PIL "L", 255 on the figure), from the same draws as `render`."""
    from PIL import Image, ImageDraw

    def jitter(rgb, amount):
        return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)

    big = size * 4
    img = Image.new("RGB", (big, big), jitter(BACKGROUNDS[concept.background], 10))
    mask = Image.new("L", (big, big), 0)
    r = rng.uniform(0.24, 0.36) * big
    margin = r * 1.1
    cx, cy = rng.uniform(margin, big - margin), rng.uniform(margin, big - margin)
    fill = jitter(COLOURS[concept.colour], 18)
    if concept.shape == "circle":
        for canvas, colour in ((img, fill), (mask, 255)):
            ImageDraw.Draw(canvas).ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        outline = _polygon(concept.shape, cx, cy, r, math.radians(rng.uniform(-15, 15)))
        for canvas, colour in ((img, fill), (mask, 255)):
            ImageDraw.Draw(canvas).polygon(outline, fill=colour)
    return img.resize((size, size), Image.Resampling.BOX), mask.resize((size, size), Image.Resampling.BOX)


def caption(concept: Concept, rng: random.Random, full: float = 0.5, empty: float = 0.1) -> str:
    """A pretraining description: all three attributes, some of them, or none ("")."""
    u = rng.random()
    if u < empty:
        return ""
    if u < empty + full:
        return concept.text()
    keep = [rng.random() < 0.5 for _ in ATTRIBUTES]
    if not any(keep) or all(keep):
        keep[rng.randrange(3)] = not all(keep)
    shape_kept, colour_kept, bg_kept = keep
    figure = " ".join(w for w, k in ((concept.colour, colour_kept), (concept.shape, shape_kept)) if k)
    if not shape_kept:
        figure = (figure + " " + rng.choice(NOUNS)).strip()
    return figure + (f" on a {concept.background} background" if bg_kept else "")


def as_prompt(description: str) -> str:
    """The bare prompt of a description: "a red circle on a black background"."""
    return f"a {description}" if description else ""


def render_batch(concepts: list[Concept], rng: random.Random) -> np.ndarray:
    """uint8 array (n, 32, 32, 3)."""
    return np.stack([np.asarray(render(c, rng)) for c in concepts])


def write_concept_images(c: Concept, n: int, folder: Path | None, seed: int = 0, mask_dir: Path | None = None,
                         alpha: bool = False, masklabel: bool = False) -> None:
    """K renders of the concept into an existing folder, each with a full-caption .txt file; its masks (the figure's
    pixels) in `mask_dir` as NNN.png, as the images' alpha channel (`alpha`: RGBA images, the colours kept under
    it) or as OneTrainer's NNN-masklabel.png beside each image. `folder` None: the masks alone, of the images the
    same seed renders."""
    rng = random.Random(f"render:{seed}:{c.text()}")
    for i in range(n):
        img, mask = render_with_mask(c, rng)
        if mask_dir is not None:
            mask.save(mask_dir / f"{i:03d}.png")
        if folder is None:
            continue
        if alpha:
            img = img.copy()
            img.putalpha(mask)
        img.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(as_prompt(c.text()) + "\n", encoding="utf-8")
        if masklabel:
            mask.save(folder / f"{i:03d}{MASKLABEL}")


def render_concept(concept: str, n: int, out_dir: Path, seed: int = 0, mask_dir: Path | None = None,
                   alpha: bool = False, masklabel: bool = False) -> Path:
    """K images of the concept with full-caption .txt files (and masks: see write_concept_images), written as new
    folders that appear whole."""
    from ..atomic import new_folder

    c = Concept.parse(concept)
    if mask_dir is None:
        with new_folder(out_dir) as staging:
            write_concept_images(c, n, staging, seed, alpha=alpha, masklabel=masklabel)
        return Path(out_dir)
    with new_folder(out_dir) as staging, new_folder(mask_dir) as mask_staging:
        write_concept_images(c, n, staging, seed, mask_staging, alpha, masklabel)
    return Path(out_dir)


def render_photos(concept: Concept, n: int, out_dir: Path, seed: int = 0, backgrounds: int = 3) -> Path:
    """K images of the concept's figure on `backgrounds` backgrounds (its own and others picked by seed, in turn),
    each captioned with its own: what photos of one subject in a few places give, without masks."""
    from ..atomic import new_folder

    rng = random.Random(f"photos:{seed}:{concept.text()}")
    places = [concept.background, *rng.sample([b for b in BACKGROUNDS if b != concept.background], backgrounds - 1)]
    with new_folder(out_dir) as staging:
        for i in range(n):
            shown = Concept(concept.shape, concept.colour, places[i % len(places)])
            render(shown, rng).save(staging / f"{i:03d}.png")
            (staging / f"{i:03d}.txt").write_text(as_prompt(shown.text()) + "\n", encoding="utf-8")
    return Path(out_dir)
