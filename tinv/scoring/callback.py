"""The `fidelity` callback (conf/scorer/fidelity.yaml): a real model's run scored as the papers score TI, at every
validation and at the end, its `val/fidelity` the run's objective (tinv.scoring.fidelity says what each number is)."""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace

from ..atomic import atomic_path, write_text_atomic
from ..callbacks import every
from ..data.images import load_rgb
from ..data.prompts import check_one_slot
from ..errors import ConfigError
from ..sampling import PreviewPrompt, labelled_grid, sample_images
from .fidelity import SUBJECT_KEYS, combined, measure, self_similarity
from .models import DEFAULT_CLIP, DEFAULT_DINO, ScorerModels, locate, scorer_dtype

log = logging.getLogger(__name__)

# what subject fidelity samples, by template.kind: the subject alone, as the training images show it
REFERENCE_PROMPTS = {"object": "a photo of {}", "caption": "a photo of {}", "style": "a painting in the style of {}"}


class FidelityScoring:
    """A run callback: samples of the token (and once of its class word) on fixed seeds, scored by CLIP and DINO
    against the training images and the prompts; logs val/dino, val/clip_i, val/clip_t, val/subject_fidelity,
    val/prompt_fidelity, val/fidelity (and val/word_* once), writes samples/score-step-N/, and keeps its seconds."""

    def __init__(self, clip: str = DEFAULT_CLIP, dino: str = DEFAULT_DINO, kind: str = "object",
                 subject_prompts: list[str] | None = None, style_prompts: list[str] | None = None,
                 num_samples: int = 4, prompt_samples: int = 1, sampler: str = "ddim", steps: int = 20,
                 guidance_scale: float = 7.5, negative_prompt: str = "", seed: int = 0, every_n_steps: int = 0,
                 token: str = "mychar", class_word: str | None = None, resolution: int = 512, batch_size: int = 1,
                 score_kind: str | None = None):
        if not class_word:
            raise ConfigError("scoring compares the token with its class word, and token.init_word is not set: set "
                              "it (e.g. token.init_word=dog), or turn scoring off with scorer=none")
        if num_samples < 1 or prompt_samples < 1:
            raise ConfigError(f"score.num_samples={num_samples} and score.prompt_samples={prompt_samples} must be "
                              "at least 1")
        kind = score_kind or kind  # template.kind caption says nothing of the subject: score.kind may
        key = "score.style_prompts" if kind == "style" else "score.subject_prompts"
        self.prompts = list((style_prompts if kind == "style" else subject_prompts) or [])
        if not self.prompts:
            raise ConfigError(f"{key} is empty; give the prompts whose fidelity to score, each with one '{{}}'")
        check_one_slot(self.prompts, key, "the token")
        self.clip = locate("score.clip", clip, DEFAULT_CLIP, "clip")
        self.dino = locate("score.dino", dino, DEFAULT_DINO, "dino")
        self.reference_prompt = REFERENCE_PROMPTS.get(kind, REFERENCE_PROMPTS["object"])
        self.spec = PreviewPrompt("", negative_prompt, resolution, resolution, steps, guidance_scale, seed, sampler)
        self.num_samples, self.prompt_samples, self.every_n_steps = num_samples, prompt_samples, every_n_steps
        self.token, self.class_word, self.batch_size = token, class_word, batch_size
        self.image_paths: list = []
        self.references: dict | None = None  # the training images' features and their self-similarity, once
        self.word: dict | None = None  # the class word's numbers, once per run (kept across a resume)
        self.seconds = 0.0

    def on_dataset(self, dataset) -> None:
        self.image_paths = [s.path for s in dataset.samples]

    def on_start(self, run) -> None:
        """The class word's numbers, from the model as it was before training (a resumed run has them, unless it
        was started without this scorer or with other settings: then they are drawn with the trained parts that
        can be switched off, a LoRA, switched off)."""
        if self.word is None and run.is_main:
            started = time.perf_counter()
            with ExitStack() as untrained:
                for part in getattr(run, "parts", {}).values():
                    if hasattr(part, "switched_off"):
                        untrained.enter_context(part.switched_off())
                images = sample_images(run, self._specs(self.class_word), self.batch_size)
            with self._scorers(run) as scorers:
                self.word = {k: v for k, v in self._numbers(scorers, images).items() if v is not None}
            run.log({f"val/word_{k}": v for k, v in self.word.items()})
            self._grid(run, "word.png", images, self.class_word)
            self.seconds += time.perf_counter() - started
            log.info("the class word %r: %s", self.class_word, ", ".join(f"{k} {v:.3f}" for k, v in self.word.items()))

    def on_step_end(self, run, step) -> None:
        if not step.skipped and every(step.step, self.every_n_steps) and step.step < run.max_steps and run.is_main:
            self.score(run)

    def on_end(self, run) -> None:
        if run.is_main:
            scores = self.score(run)
            run.tracker.set_summary(**scores, **{f"word_{k}": v for k, v in self.word.items()},
                                    scoring_s=round(self.seconds, 1), fidelity_samples=str(
                run.run_dir / "samples" / f"score-step-{run.step:08d}" / "grid.png"))

    def _settings(self) -> dict:
        """What the class word's numbers depend on: a resume with other settings draws them again."""
        return {"class_word": self.class_word, "clip": self.clip, "dino": self.dino, "prompts": self.prompts,
                "reference": self.reference_prompt, "spec": repr(self.spec), "num_samples": self.num_samples,
                "prompt_samples": self.prompt_samples}

    def state_dict(self) -> dict:
        return {"word": self.word, "seconds": self.seconds, "settings": self._settings()}

    def load_state_dict(self, state: dict) -> None:
        self.seconds = state.get("seconds", 0.0)
        self.word = state.get("word") if state.get("settings") == self._settings() else None

    def _specs(self, subject: str) -> list[PreviewPrompt]:
        """The reference prompt on num_samples seeds, then each prompt on prompt_samples seeds."""
        seed = self.spec.seed
        return [replace(self.spec, prompt=self.reference_prompt.format(subject), seed=seed + n)
                for n in range(self.num_samples)] + \
            [replace(self.spec, prompt=p.format(subject), seed=seed + n)
             for p in self.prompts for n in range(self.prompt_samples)]

    @contextmanager
    def _scorers(self, run):
        """The scorer models for one scoring, on the run's device in its precision (released after it); the
        training images' features are computed the first time."""
        mixed = getattr(run.accelerator, "mixed_precision", "no")
        with ScorerModels(self.clip, self.dino, run.device, scorer_dtype(run.device, mixed),
                          self.batch_size) as scorers:
            if self.references is None:
                pictures = [load_rgb(path) for path in self.image_paths]
                features = {"dino": scorers.dino_images(pictures), "clip_i": scorers.clip_images(pictures)}
                self.references = {**features, "ceiling": {k: self_similarity(features[k]) for k in SUBJECT_KEYS}}
            yield scorers

    def _numbers(self, scorers: ScorerModels, images: list) -> dict[str, float]:
        photo, prompted = images[:self.num_samples], images[self.num_samples:]
        texts = [p.format(self.class_word) for p in self.prompts for _ in range(self.prompt_samples)]
        return measure({"dino": scorers.dino_images(photo), "clip_i": scorers.clip_images(photo)},
                       scorers.clip_images(prompted), scorers.clip_texts(texts), self.references, self.prompt_samples)

    def score(self, run) -> dict[str, float]:
        started = time.perf_counter()
        images = sample_images(run, self._specs(self.token), self.batch_size)
        with self._scorers(run) as scorers:
            token = self._numbers(scorers, images)
        token.pop("clip_t_floor")  # the scale's 0 comes from the class word's samples
        scores = {**token, **combined(token, self.word, self.references["ceiling"])}
        run.log({f"val/{k}": v for k, v in scores.items()})
        self._write(run, images, scores)
        self.seconds += time.perf_counter() - started
        log.info("step %d: %s (%.0f s)", run.step, ", ".join(f"{k} {v:.3f}" for k, v in scores.items()),
                 time.perf_counter() - started)
        return scores

    def _grid(self, run, name: str, images: list, subject: str):
        """samples/<name>: a row per prompt (the reference prompt first), a column per seed."""
        prompts = [self.reference_prompt.format(subject)] + [p.format(subject) for p in self.prompts]
        n, k = self.num_samples, self.prompt_samples
        rows = [images[:n]] + [images[n + i * k:n + (i + 1) * k] for i in range(len(self.prompts))]
        path = run.run_dir / "samples" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            labelled_grid(rows, prompts, [f"seed {self.spec.seed + s}" for s in range(max(n, k))]).save(tmp, "PNG")

    def _write(self, run, images: list, scores: dict) -> None:
        """samples/score-step-N/: the grid and scores.json; the same images as a table in the tracker."""
        folder = f"score-step-{run.step:08d}"
        self._grid(run, f"{folder}/grid.png", images, self.token)
        write_text_atomic(run.run_dir / "samples" / folder / "scores.json",
                          json.dumps({"step": run.step, **scores, **{f"word_{k}": v for k, v in self.word.items()},
                                      "prompts": [self.reference_prompt, *self.prompts]}, indent=1) + "\n")
        specs = self._specs(self.token)
        run.tracker.log_table("val/fidelity_samples", ["prompt", "seed", "image"],
                              [[spec.prompt, spec.seed, image] for spec, image in zip(specs, images)], run.step)
