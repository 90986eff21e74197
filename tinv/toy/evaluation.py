"""How well an embedding draws its concept on the toy model: `tinv-eval`, and a run's concept scoring callback.

K images are sampled with fixed seeds at the world's guidance scale from the object templates with the subject
("a photo of a <token>", "a rendering of a <token>", ...), and judged: concept_accuracy, per-attribute accuracies
and reconstruction (see tinv.toy.scoring). The same subject slot takes plain text, which scores the base model on
a full caption ("yellow triangle on a navy background") or on the init word alone ("shape").

    tinv-eval outputs/.../mytoken.safetensors --concept "yellow triangle on a navy background"
    tinv-eval --text "yellow triangle on a navy background" --concept "yellow triangle on a navy background"
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from ..callbacks import every
from ..data.templates import OBJECT_TEMPLATES
from ..errors import ConfigError, refuse
from ..resources import ThreadShare, add_threads_option
from ..seeds import derive_seed
from .model import GUIDANCE_SCALE, WEIGHTS_DIR
from .world import BACKGROUNDS, Concept

log = logging.getLogger(__name__)

JUDGE = "toy"  # callbacks.concept.judge / --judge value meaning the judge shipped with the toy model


def judge_path(value: str) -> Path:
    return WEIGHTS_DIR / "judge.safetensors" if value == JUDGE else Path(value).expanduser()


def eval_prompts(subject: str, count: int) -> list[str]:
    return [OBJECT_TEMPLATES[i % len(OBJECT_TEMPLATES)].format(subject) for i in range(count)]


def eval_seeds(seed: int, count: int) -> list[int]:
    return [derive_seed(seed, i) for i in range(count)]


def edit_prompts(subject: str, background: str, count: int) -> list[str]:
    """The object templates with another background asked for: does the rest of the prompt still work?"""
    return [f"{prompt} on a {background} background" for prompt in eval_prompts(subject, count)]


def concept_scores(pipe, judge, subject: str, concept: Concept, references: np.ndarray | None = None,
                   samples: int = 32, edit_samples: int = 32, seed: int = 0, guidance_scale: float = GUIDANCE_SCALE,
                   expand=lambda prompt: prompt, progress: bool = False, subject_only: bool = False,
                   **call_kwargs) -> tuple[dict, np.ndarray]:
    """Reconstruction and editability of `subject` (a token, expanded by `expand`, or plain text).

    Reconstruction: `samples` images from the object templates, judged against the concept (concept_accuracy,
    per-attribute accuracies, reconstruction). Editability: `edit_samples` images per background the concept does
    not have, from the same templates with "on a <background> background", judged against (the concept's shape,
    its colour, the asked background); `editability` is their mean, `edit_<background>` each part, and
    `concept_and_edit` the harmonic mean of concept_accuracy (with `subject_only`: subject_accuracy, the figure
    whatever its background, for runs whose masks said the background is not the concept) and editability.
    Returns (scores, the first images).
    """
    from .scoring import sample_images, score

    def draw(prompts: list[str], seeds: list[int]) -> np.ndarray:
        return sample_images(pipe, [expand(p) for p in prompts], seeds, guidance_scale, progress=progress,
                             **call_kwargs)

    images = draw(eval_prompts(subject, samples), eval_seeds(seed, samples))
    result = score(judge, images, concept, references)
    if edit_samples:
        edits = [b for b in BACKGROUNDS if b != concept.background]
        edited = draw([p for b in edits for p in edit_prompts(subject, b, edit_samples)],
                      eval_seeds(seed, edit_samples) * len(edits))
        for i, background in enumerate(edits):
            part = edited[i * edit_samples:(i + 1) * edit_samples]
            wanted = Concept(concept.shape, concept.colour, background)
            result[f"edit_{background}"] = score(judge, part, wanted)["concept_accuracy"]
        result["editability"] = sum(result[f"edit_{b}"] for b in edits) / len(edits)
        accuracy = result["subject_accuracy" if subject_only else "concept_accuracy"]
        both = accuracy + result["editability"]
        result["concept_and_edit"] = 2 * accuracy * result["editability"] / both if both else 0.0
    return result, images


def load_references(paths: list[Path], limit: int = 64) -> np.ndarray:
    """Training images as uint8 (n, 32, 32, 3), for `reconstruction`."""
    from PIL import Image

    from .world import SIZE

    out = []
    for path in paths[:limit]:
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX)))
    return np.stack(out) if out else np.zeros((0, SIZE, SIZE, 3), np.uint8)


def concept_from_captions(captions: list[str], where: str) -> Concept:
    """The world concept most training captions name (`tinv-toy render` writes full captions)."""
    named = []
    for text in captions:
        try:
            named.append(Concept.parse(text))
        except ValueError:
            pass
    if not named:
        raise ConfigError(f"concept scoring is on but no caption in {where} names a toy-world concept; set "
                          "callbacks.concept.concept, e.g. 'callbacks.concept.concept=red circle on a black background'")
    return Counter(named).most_common(1)[0][0]


class ConceptScoring:
    """A run callback (`callbacks.concept`, composed with model=toy from conf/world/toy.yaml): samples of the token
    from the models in memory, judged for the concept. Logs val/concept_accuracy etc. every `every_n_steps` and at
    the end, where the scores also go to the summary."""

    def __init__(self, judge: str = JUDGE, concept: str | None = None, num_samples: int = 32,
                 edit_samples: int = 32, guidance_scale: float | None = None, seed: int = 0, every_n_steps: int = 0):
        from .judge import load_judge

        if judge is None:
            raise ConfigError("judge=null; to turn concept scoring off leave the callback out: ~callbacks.concept")
        path = judge_path(judge)
        if not path.is_file():
            raise ConfigError(f"judge={judge!r}: no judge file at {path}; use toy (the shipped judge) or a judge path")
        if num_samples < 1 or edit_samples < 0:
            raise ConfigError(f"num_samples={num_samples} must be at least 1 and edit_samples={edit_samples} at least "
                              "0 (0: no editability)")
        self.edit_samples = edit_samples
        try:
            self.concept = Concept.parse(concept) if concept else None
        except ValueError as err:
            raise ConfigError(f"concept: {err}") from None
        self.judge, self.references, self.image_dirs = load_judge(path), None, []
        self.subject_only = False
        self.num_samples, self.seed, self.every_n_steps = num_samples, seed, every_n_steps
        self.guidance_scale = guidance_scale if guidance_scale is not None else GUIDANCE_SCALE

    def on_dataset(self, dataset) -> None:
        """The concept from the captions unless given, and the training images as references, before any load."""
        if self.concept is None:
            self.concept = concept_from_captions([s.caption for s in dataset.samples], "the training set")
        self.references = load_references([s.path for s in dataset.samples])
        self.image_dirs = sorted({str(sub.image_dir) for sub in dataset.subsets})
        self.subject_only = dataset.has_masks  # the masks say the background is not part of the concept
        log.info("concept scoring against %r%s", self.concept.text(),
                 " (masked: the subject's accuracy with editability)" if self.subject_only else "")

    def on_step_end(self, run, step) -> None:
        # the last step's scores come with on_end
        if not step.skipped and every(step.step, self.every_n_steps) and step.step < run.max_steps and run.is_main:
            self.score(run)

    def on_end(self, run) -> None:
        if run.is_main:
            log.info("scoring %d samples of the token against %r (Ctrl-C skips it: the embedding is saved)",
                     self.num_samples, self.concept.text())
            run.tracker.set_summary(**self.score(run, progress=True))

    def next_steps(self, run) -> list[str]:
        from shlex import quote

        embedding = run.tracker.summary.get("embedding")
        if not embedding:
            return []
        references = f" --references {quote(self.image_dirs[0])}" if len(self.image_dirs) == 1 else ""
        lora = run.tracker.summary.get("lora")
        references += f" --lora {quote(lora)}" if lora else ""
        return [f"tinv-eval {quote(embedding)} --concept {quote(self.concept.text())}{references} --samples 64 "
                f"--grid {quote(str(run.run_dir / 'samples' / 'eval.png'))}"]

    def score(self, run, progress: bool = False) -> dict:
        from diffusers import DDIMScheduler

        from ..atomic import atomic_path
        from ..sampling import sampling_mode

        backbone, token = run.backbone, run.token
        with sampling_mode(backbone, run.device):
            pipe = backbone.pipeline(DDIMScheduler.from_config(backbone.noise_scheduler.config))
            scores, images = concept_scores(pipe, self.judge, token.string, self.concept, self.references,
                                            self.num_samples, self.edit_samples, self.seed, self.guidance_scale,
                                            token.expand, progress, self.subject_only,
                                            **backbone.sampling_kwargs())
        run.log({f"val/{k}": v for k, v in scores.items()})
        grid = run.run_dir / "samples" / f"concept-step-{run.step:08d}.png"
        with atomic_path(grid) as tmp:
            save_grid(images, tmp, fmt="png")
        run.tracker.log_images({"val/concept_samples": [grid_image(images)]}, run.step)
        run.tracker.set_summary(concept_samples=str(grid))
        log.info("step %d: %s", run.step, ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        return scores


def evaluate(subject: str, concept: Concept, *, embedding: str | None = None, model: str | None = None,
             judge: str = JUDGE, samples: int = 64, edit_samples: int = 0, seed: int = 0,
             guidance_scale: float | None = None, references: np.ndarray | None = None,
             lora: str | None = None) -> tuple[dict, np.ndarray]:
    """Score a subject (a token of a loaded embedding, with its LoRA if any, or plain text) on the toy model (or
    `model`: a model= choice or a folder); returns (scores, images)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from ..commandline import model_choice
    from .judge import load_judge
    from .model import toy_model_path

    choice = model_choice(model) if model else None
    pipe = StableDiffusionPipeline.from_pretrained(choice["path"] if choice else model or toy_model_path(),
                                                   safety_checker=None, requires_safety_checker=False)
    if embedding:
        from ..formats.embedding import SD_KEY, read_embedding

        loaded = read_embedding(embedding)
        if SD_KEY not in loaded.vectors:
            raise ConfigError(f"{embedding}: not an SD1/SD2 embedding (keys {sorted(loaded.vectors)})")
        pipe.load_textual_inversion(loaded.vectors[SD_KEY].float(), token=subject)
    if lora or embedding:
        from ..formats.lora import load_into_pipeline

        load_into_pipeline(pipe, embedding, lora)
    with torch.no_grad():
        return concept_scores(pipe, load_judge(judge_path(judge)), subject, concept, references, samples, edit_samples,
                              seed, guidance_scale if guidance_scale is not None else GUIDANCE_SCALE)


def names_a_background(text: str) -> str | None:
    """The background a subject text already asks for ("... on a gray background"), else None: the edit prompts
    would ask for a second one, so editability does not apply to it."""
    found = re.search(r"\bon an? ([\w-]+) background\b", text, re.IGNORECASE) or \
        re.search(r"\b([\w-]+) background\b", text, re.IGNORECASE)
    return found.group(1) if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinv-eval", description="Score an embedding (or a text) on the toy model.")
    parser.add_argument("embedding", nargs="?", help="embedding file (kohya, A1111 .pt or diffusers)")
    parser.add_argument("--concept", required=True, help='the concept it should draw, e.g. "red circle on a black '
                        'background"')
    parser.add_argument("--lora", help="a LoRA to load with the embedding (method=pivotal's -lora file; a bundle "
                        "brings its own)")
    parser.add_argument("--text", help="score this text in the subject slot instead of an embedding's token")
    parser.add_argument("--token", help="the embedding's token in prompts (default: its stored name, else <concept>)")
    parser.add_argument("--references", help="folder of training images, for `reconstruction`")
    parser.add_argument("--samples", type=int, default=64, help="samples from the object templates (default 64)")
    parser.add_argument("--edit-samples", type=int, default=32, help="per other background, for editability "
                        "(default 32; 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses a seed derived from this and i (default 0)")
    parser.add_argument("--guidance-scale", type=float, default=None, help=f"default {GUIDANCE_SCALE}")
    parser.add_argument("--model", help="a model= choice or a diffusers folder (default: toy, the shipped toy "
                        "model)")
    parser.add_argument("--judge", default=JUDGE, help="judge weights (default: the shipped judge)")
    parser.add_argument("--out", help="also write the scores as JSON here")
    parser.add_argument("--grid", help="also write the samples as a PNG grid here")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    from ..console import quiet_command

    quiet_command()
    try:
        concept = Concept.parse(args.concept)
        if bool(args.embedding) == bool(args.text):
            raise ConfigError("give an embedding file or --text, not both and not neither")
        subject = args.text
        if args.embedding:
            from ..formats.embedding import read_embedding

            subject = args.token or read_embedding(args.embedding).name or "<concept>"
        edit_samples, asked = args.edit_samples, names_a_background(subject) if args.text else None
        if asked and edit_samples:
            print(f"tinv-eval: editability does not apply to {subject!r}: it already asks for a {asked} background, "
                  "and the edit prompts would ask for another; give --text without the background to measure it",
                  file=sys.stderr)
            edit_samples = 0
        refs = None
        if args.references:
            from ..data.images import list_images

            refs = load_references(list_images(Path(args.references)))
        threads = ThreadShare(args.threads)
        threads.claim()
        try:
            result, images = evaluate(subject, concept, embedding=args.embedding, model=args.model, judge=args.judge,
                                      samples=args.samples, edit_samples=edit_samples, seed=args.seed,
                                      guidance_scale=args.guidance_scale, references=refs, lora=args.lora)
        finally:
            threads.release()
    except (ConfigError, ValueError, FileNotFoundError) as err:
        return refuse("tinv-eval", err)
    if asked and args.edit_samples:
        result["editability"] = None  # not 0: not measured
    result.update(concept=concept.text(), subject=subject, samples=args.samples, edit_samples=edit_samples,
                  seed=args.seed,
                  guidance_scale=args.guidance_scale if args.guidance_scale is not None else GUIDANCE_SCALE)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        from ..atomic import write_text_atomic

        write_text_atomic(Path(args.out), text + "\n")
    if args.grid:
        save_grid(images, Path(args.grid))
    return 0


def grid_image(images: np.ndarray, cols: int = 8, scale: int = 2):
    """The samples as one PIL image, `cols` to a row, enlarged `scale` times."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    sheet = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        sheet[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    return Image.fromarray(sheet).resize((cols * w * scale, rows * h * scale), Image.Resampling.NEAREST)


def save_grid(images: np.ndarray, path: Path, cols: int = 8, scale: int = 2, fmt: str | None = None) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, cols, scale).save(path, format=fmt)
    return path


if __name__ == "__main__":
    sys.exit(main())
