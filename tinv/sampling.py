"""Preview images during training, from the models already in memory (the `previews` callback).

Prompts come from the config or a kohya-style prompts file (one prompt a line, `#` comments, `--n` negative,
`--w`/`--h` size, `--s` steps, `--l` guidance, `--d` seed, `--ss` sampler). The token in a prompt expands to all of
its vectors. Sampling runs under no_grad and leaves the training state as it found it: module modes, devices and
every global RNG are restored, and the training randomness does not depend on global RNGs anyway.
"""

from __future__ import annotations

import logging
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .callbacks import every
from .choices import Sampler
from .errors import ConfigError

log = logging.getLogger(__name__)

_FLAGS = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "s": ("steps", int),
          "l": ("guidance_scale", float), "d": ("seed", int), "ss": ("sampler", str)}


@dataclass
class PreviewPrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance_scale: float = 7.0
    seed: int = 0
    sampler: str = "euler_a"


def parse_prompt_line(line: str, defaults: PreviewPrompt, where: str) -> PreviewPrompt:
    """`a photo of mychar --n blurry --w 512 --h 768 --s 30 --l 7.5 --d 42 --ss euler_a` (kohya's flags)."""
    parts = re.split(r"\s--(?=[a-z]+\s)", " " + line.strip())
    values = {}
    for part in parts[1:]:
        flag, _, value = part.partition(" ")
        if flag not in _FLAGS:
            raise ConfigError(f"{where}: unknown flag --{flag}; use --n --w --h --s --l --d --ss")
        name, kind = _FLAGS[flag]
        try:
            values[name] = kind(value.strip())
        except ValueError:
            raise ConfigError(f"{where}: --{flag} {value.strip()!r} is not a {kind.__name__}") from None
    spec = replace(defaults, prompt=parts[0].strip(), **values)
    for name in ("width", "height"):
        if getattr(spec, name) < 8 or getattr(spec, name) % 8:
            raise ConfigError(f"{where}: {name} {getattr(spec, name)} must be a positive multiple of 8")
    if spec.steps < 1:
        raise ConfigError(f"{where}: steps {spec.steps} must be at least 1")
    if spec.sampler not in Sampler.values():
        raise ConfigError(f"{where}: sampler {spec.sampler!r} is unknown; use one of {', '.join(Sampler.values())}")
    return spec


def read_prompts(prompts, defaults: PreviewPrompt) -> list[PreviewPrompt]:
    if prompts is None:
        return [defaults]
    if isinstance(prompts, str):
        path = Path(prompts).expanduser()
        if not path.is_file():
            raise ConfigError(f"sample.prompts={prompts!r}: no such prompts file; give a file or a list of prompts")
        lines = [(f"{path}:{n}", line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    else:
        lines = [(f"sample.prompts[{n}]", line) for n, line in enumerate(prompts)]
    specs = [parse_prompt_line(line, defaults, where) for where, line in lines
             if line.strip() and not line.lstrip().startswith("#")]
    if not specs:
        raise ConfigError(f"sample.prompts={prompts!r} holds no prompt")
    return specs


# diffusers scheduler class for each Sampler value
SAMPLER_CLASSES = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                   "euler_a": "EulerAncestralDiscreteScheduler", "dpmsolver++": "DPMSolverMultistepScheduler"}


def scheduler_for(name: str, config, prediction_type: str):
    """The diffusers sampler `name` (a Sampler value) for a model's noise schedule."""
    import diffusers

    extra = {"algorithm_type": "dpmsolver++"} if name == "dpmsolver++" else {}
    return getattr(diffusers, SAMPLER_CLASSES[name]).from_config(config, prediction_type=prediction_type, **extra)


def grid(images: list, cols: int = 4) -> "object":
    from PIL import Image

    cols = min(cols, len(images))
    rows = (len(images) + cols - 1) // cols
    w, h = max(i.width for i in images), max(i.height for i in images)
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for n, image in enumerate(images):
        sheet.paste(image, ((n % cols) * w, (n // cols) * h))
    return sheet


def labelled_grid(rows: list[list], row_labels: list[str], col_labels: list[str], min_side: int = 256,
                  label_width: int = 240):
    """Images in rows and columns, each row labelled on its left (its prompt) and each column on top (its seed).
    Images smaller than `min_side` are enlarged (nearest neighbour, whole times) so a small model's grid reads."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    side = max(max(im.width, im.height) for row in rows for im in row)
    scale = max(1, min_side // side)
    cell_w = max(im.width for row in rows for im in row) * scale
    cell_h = max(im.height for row in rows for im in row) * scale
    top, line_h = 24, 18
    sheet = Image.new("RGB", (label_width + cell_w * max(map(len, rows)), top + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(col_labels):
        draw.text((label_width + c * cell_w + 4, 4), text, fill="black", font=font)
    for r, (row, text) in enumerate(zip(rows, row_labels)):
        for c, image in enumerate(row):
            sheet.paste(image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST),
                        (label_width + c * cell_w, top + r * cell_h))
        lines = _wrapped(text, font, label_width - 8)[:max(1, (cell_h - 8) // line_h)]
        for n, line in enumerate(lines):
            draw.text((4, top + r * cell_h + 4 + n * line_h), line, fill="black", font=font)
    return sheet


def _wrapped(text: str, font, width: int) -> list[str]:
    """`text` in lines of at most `width` pixels, broken between words (a word longer than that stands alone)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


def slug(text: str) -> str:
    """A prompt as a short file-name part."""
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:48] or "prompt"


@contextmanager
def sampling_mode(backbone, device):
    """Eval mode with the VAE on `device`; afterwards every module mode, the VAE's place and all global RNGs are
    as they were, so sampling in the middle of training changes nothing in it."""
    modules = [backbone.unet, backbone.vae] + [e.model for e in backbone.encoders]
    modes = [m.training for m in modules]
    vae_device = backbone.vae.device
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        backbone.vae.to(device)
        for m in modules:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        backbone.vae.to(vae_device)
        for m, mode in zip(modules, modes):
            m.train(mode)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])


class Previews:
    """A run callback (`callbacks.previews`, configured by `sample.*`): preview images every `every_n_steps` (and
    before the first step with `at_start`), into samples/step-XXXXXXXX/ with a grid, and to the tracker."""

    def __init__(self, every_n_steps: int = 0, at_start: bool = False, prompts=None, sampler: str = "euler_a",
                 steps: int = 20, guidance_scale: float = 7.0, negative_prompt: str = "", width: int | None = None,
                 height: int | None = None, seed: int = 0, token: str = "mychar", resolution: int = 512):
        self.every_n_steps, self.at_start = every_n_steps, at_start
        defaults = PreviewPrompt(f"a photo of {token}", negative_prompt, width or resolution, height or resolution,
                                 steps, guidance_scale, seed, sampler)
        # read (and checked) only when previews are on, before any model loads
        self.prompts = read_prompts(prompts, defaults) if every_n_steps > 0 or at_start else []

    def on_start(self, run) -> None:
        if self.at_start and run.step == 0 and run.is_main:
            self.render(run, 0)

    def on_step_end(self, run, step) -> None:
        if not step.skipped and every(step.step, self.every_n_steps) and run.is_main:
            self.render(run, step.step)

    def render(self, run, step: int) -> list[Path]:
        out_dir = run.run_dir / "samples" / f"step-{step:08d}"
        out_dir.mkdir(parents=True, exist_ok=True)
        images = sample_images(run, self.prompts)
        written = []
        for n, (spec, image) in enumerate(zip(self.prompts, images)):
            written.append(out_dir / f"{n:02d}-{slug(spec.prompt)}.png")
            image.save(written[-1])
        grid(images).save(out_dir / "grid.png")
        run.tracker.log_images({f"samples/{n:02d} {spec.prompt}": [im] for n, (spec, im)
                                in enumerate(zip(self.prompts, images))}, step)
        log.info("step %d: %d preview images in %s", step, len(written), out_dir)
        return written


def sample_images(run, specs: list[PreviewPrompt], batch_size: int = 1) -> list:
    """One image per spec (the token in its prompts expanded to its vectors), from the models in memory, each from
    its own seed: the same image whatever the batch it is drawn in. Specs in a row that differ only in prompt and
    seed are drawn `batch_size` at a time."""
    backbone, token, acc = run.backbone, run.token, run.accelerator
    batches: list[list[PreviewPrompt]] = []
    for spec in specs:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and replace(last[0], prompt=spec.prompt, seed=spec.seed) == spec:
            last.append(spec)
        else:
            batches.append([spec])
    images = []
    with sampling_mode(backbone, acc.device):
        for batch in batches:
            run.threads.adjust()  # what else runs on the cores may have changed since the last image
            first = batch[0]
            pipe = backbone.pipeline(scheduler_for(first.sampler, backbone.noise_scheduler.config,
                                                backbone.prediction_type))
            pipe.set_progress_bar_config(disable=True)
            generators = [torch.Generator(device="cpu").manual_seed(spec.seed) for spec in batch]
            negative = token.expand(first.negative_prompt)
            with acc.autocast():
                images += pipe([token.expand(spec.prompt) for spec in batch],
                               negative_prompt=[negative] * len(batch) if negative else None,
                               width=first.width, height=first.height, num_inference_steps=first.steps,
                               guidance_scale=first.guidance_scale, generator=generators,
                               **backbone.sampling_kwargs()).images
    return images
