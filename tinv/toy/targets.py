"""`tinv-toy targets`: the toy world's quality targets, measured and printed (a benchmark, not a test).

1. the base model drawing every concept from its full caption (mean concept accuracy over the world);
2. the init word alone ("a photo of a shape") scored against the demo concept;
3. `tinv-train` with its defaults on the demo concept and on other concepts rendered by `tinv-toy render`:
   wall time, concept accuracy of the embedding, and its ratio to the base model's full-caption accuracy on the
   same concept. Each training run goes through the real entry point in a subprocess.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..atomic import new_folder, write_text_atomic
from ..commandline import path_override
from .world import (BACKGROUNDS, DEMO_CONCEPT, NOVEL_CONCEPT, Concept, all_concepts, judged_concepts, render_concept,
                    render_photos, write_concept_images)

TARGETS = {"base_full_caption": 0.7, "init_word_max": 0.1, "trained": 0.6, "trained_vs_base": 0.8}


def other_concepts(count: int, seed: int = 0) -> list[Concept]:
    """Concepts besides the demo one, picked by seed (never hand-picked, so defaults are not tuned to one)."""
    demo = Concept(*DEMO_CONCEPT)
    return random.Random(f"targets:{seed}").sample([c for c in all_concepts() if c != demo], count)


def train_embedding(concept: Concept, work: Path, image_dir: Path | None, overrides: list[str]) -> tuple[Path, float]:
    run_dir = work / "runs" / concept.text().replace(" ", "_")
    shutil.rmtree(run_dir, ignore_errors=True)  # this table's own earlier run: measured again from scratch
    args = [sys.executable, "-m", "tinv", "logger=none", f"hydra.run.dir={run_dir}", *overrides]
    if image_dir is not None:
        args.append(f"data.image_dir={image_dir}")
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"tinv-train failed for {concept.text()!r}:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return Path(summary["embedding"]), wall


def measure(work: Path, samples: int = 64, base_per_concept: int = 16, others: int = 2, seed: int = 0,
            overrides: list[str] | None = None) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from .evaluation import evaluate, load_references
    from .judge import load_judge, to_tensor
    from .model import GUIDANCE_SCALE, WEIGHTS_DIR, toy_model_path
    from .demo import DEMO_IMAGES, demo_images_dir
    from ..data.images import list_images
    from .evaluation import eval_prompts, eval_seeds
    from .scoring import sample_images

    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"guidance_scale": GUIDANCE_SCALE, "samples": samples, "targets": TARGETS}
    # 1. base model on every concept, from its full caption in the eval templates
    pipe = StableDiffusionPipeline.from_pretrained(toy_model_path(), safety_checker=None,
                                                   requires_safety_checker=False)
    judge = load_judge(WEIGHTS_DIR / "judge.safetensors")

    per_concept = {}
    with torch.no_grad():
        for c in all_concepts():
            images = sample_images(pipe, eval_prompts(c.text(), base_per_concept), eval_seeds(seed, base_per_concept))
            hits = (judge.predict(to_tensor(images)) == torch.tensor(c.labels())).all(1).float().mean().item()
            per_concept[c.text()] = hits
    result["base_full_caption_mean"] = sum(per_concept.values()) / len(per_concept)
    result["base_full_caption_per_concept"] = per_concept
    # 2. the init word alone
    demo = Concept(*DEMO_CONCEPT)
    init_scores, init_images = evaluate("shape", demo, samples=samples, seed=seed)
    result["init_word_demo"] = init_scores["concept_accuracy"]
    # 3. training with defaults
    runs = []
    for concept in [demo, *other_concepts(others, seed)]:
        image_dir = None
        refs_dir = demo_images_dir()
        if concept != demo:
            image_dir = work / "images" / concept.text().replace(" ", "_")
            if not image_dir.is_dir():
                render_concept(concept.text(), DEMO_IMAGES, image_dir, seed)
            refs_dir = image_dir
        embedding, wall = train_embedding(concept, work, image_dir, overrides or [])
        refs = load_references(list_images(refs_dir))
        trained, trained_images = evaluate("<concept>", concept, embedding=str(embedding), samples=samples, seed=seed,
                                           references=refs)
        base, base_images = evaluate(concept.text(), concept, samples=samples, seed=seed, references=refs)
        if concept == demo:  # rows: init word, trained token, base model from the full caption, training images
            from .evaluation import save_grid

            rows = [init_images[:8], trained_images[:8], base_images[:8], refs[:8]]
            result["before_after"] = str(save_grid(np.concatenate(rows), work / "before_after.png", cols=8, scale=3))
        runs.append({"concept": concept.text(), "demo": concept == demo, "train_wall_s": round(wall, 1),
                     "trained": trained, "base_full_caption": base,
                     "ratio": trained["concept_accuracy"] / max(base["concept_accuracy"], 1e-9)})
    result["runs"] = runs
    return result


def print_table(result: dict) -> None:
    t = result["targets"]
    print(f"toy world targets at guidance scale {result['guidance_scale']} ({result['samples']} samples per score)")
    print(f"  base model, full captions, mean over {len(result['base_full_caption_per_concept'])} concepts: "
          f"{result['base_full_caption_mean']:.3f}  (target >= {t['base_full_caption']})")
    print(f"  init word alone on the demo concept: {result['init_word_demo']:.3f}  (target <= {t['init_word_max']})")
    print(f"  {'concept':44s} {'train s':>8s} {'trained':>8s} {'base':>6s} {'ratio':>6s} {'recon':>6s}")
    for r in result["runs"]:
        name = r["concept"] + (" (demo)" if r["demo"] else "")
        print(f"  {name:44s} {r['train_wall_s']:8.1f} {r['trained']['concept_accuracy']:8.3f} "
              f"{r['base_full_caption']['concept_accuracy']:6.3f} {r['ratio']:6.2f} "
              f"{r['trained'].get('reconstruction', float('nan')):6.3f}")
    print(f"  targets: trained >= {t['trained']}, ratio >= {t['trained_vs_base']}, training <= ~120 s")


# `tinv-toy methods`: each method is a set of tinv-train overrides, measured on the demo concept and others picked
# by seed. Scores come from each run's own end-of-run judging (64 samples for reconstruction, 32 per other background
# for editability).
METHODS = {
    "default": [],  # cross initialization, Min-SNR 5, 1000 steps
    "before (issue 14)": ["token.init_from=input", "train.min_snr_gamma=null", "train.max_steps=500"],
    "cross, no Min-SNR": ["train.min_snr_gamma=null"],
    "4 vectors": ["token.num_vectors=4"],
    "l2_to_init": ["token.init_from=input", "token.norm=l2_to_init"],  # token.norm_weight 0.01
    "clamp_to_vocab_max": ["token.init_from=input", "token.norm=clamp_to_vocab_max"],
    "context 0.0003": ["token.init_from=input", "token.context_weight=0.0003"],
}
SCORING = ["callbacks.concept.num_samples=64", "callbacks.concept.edit_samples=32"]


def novel_concepts(count: int, seed: int = 0) -> list[Concept]:
    """Concepts with a shape outside pretraining (the star), the first the world's NOVEL_CONCEPT, the rest by seed."""
    if count < 1:
        return []
    first = Concept(*NOVEL_CONCEPT)
    rest = [c for c in judged_concepts() if c.novel and c != first]
    return [first, *random.Random(f"novel:{seed}").sample(rest, count - 1)][:count]


def measure_methods(work: Path, methods: dict[str, list[str]], others: int = 3, seed: int = 0,
                    concepts: list[Concept] | None = None) -> dict:
    from .demo import DEMO_IMAGES

    concepts = concepts or benchmark_concepts(others, 0, seed)
    rows = []
    for name, overrides in methods.items():
        for concept in concepts:
            folder = concept.text().replace(" ", "_")
            image_dir = work / "images" / folder
            if not image_dir.is_dir():
                render_concept(concept.text(), DEMO_IMAGES, image_dir, seed)
            made = _materials(work, concept, seed, " ".join(overrides))
            run_dir = work / "runs" / re.sub(r"[^\w.-]+", "_", name) / folder
            done = run_dir / "method_row.json"  # a measured row: kept, so an interrupted table carries on
            if done.is_file() and json.loads(done.read_text())["overrides"] == overrides:
                rows.append(json.loads(done.read_text()))
            else:
                shutil.rmtree(run_dir, ignore_errors=True)  # an earlier measurement cut short: from scratch
                rows.append(_measure(name, overrides, concept, image_dir, run_dir, made))
                write_text_atomic(done, json.dumps(rows[-1]) + "\n")
            print(f"  {name:<24} {concept.text():<40} acc {rows[-1]['concept_accuracy']:.3f} "
                  f"edit {rows[-1]['editability']:.3f} {rows[-1]['wall_s']:6.1f} s", flush=True)
    return {"scoring": SCORING, "seed": seed, "rows": rows}


def _materials(work: Path, concept: Concept, seed: int, overrides: str) -> dict[str, str]:
    """What a method's overrides ask for besides the concept's images, made once: {masks} (the images' masks, a
    folder named as them) and {photos} (the concept on three backgrounds, as photos of one subject would be)."""
    from .demo import DEMO_IMAGES

    made, folder = {}, concept.text().replace(" ", "_")
    if "{masks}" in overrides:  # the masks of work/images/<concept>, rendered again from the same seed
        masks = work / "masks" / folder
        if not masks.is_dir():
            with new_folder(masks) as staging:
                write_concept_images(concept, DEMO_IMAGES, None, seed, mask_dir=staging)
        made["masks"] = str(masks)
    if "{photos}" in overrides:
        photos = work / "photos" / folder
        if not photos.is_dir():
            render_photos(concept, DEMO_IMAGES, photos, seed)
        made["photos"] = str(photos)
    return made


def for_concept(override: str, concept: Concept, made: dict[str, str] | None = None) -> str:
    """A method's override with {shape}, {colour}, {background} and {concept} filled in for one concept (e.g.
    templates that name the training background), and {masks} / {photos} with the folders made for it."""
    for attribute in ("shape", "colour", "background"):
        override = override.replace(f"{{{attribute}}}", getattr(concept, attribute))
    for key, value in {"concept": concept.text(), **(made or {})}.items():
        override = override.replace(f"{{{key}}}", value)
    return override


def _measure(name: str, overrides: list[str], concept: Concept, image_dir: Path, run_dir: Path,
             made: dict[str, str] | None = None) -> dict:
    args = [sys.executable, "-m", "tinv", "logger=none", path_override("hydra.run.dir", run_dir),
            path_override("data.image_dir", image_dir), *SCORING, *(for_concept(o, concept, made) for o in overrides)]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"{name} on {concept.text()!r} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"method": name, "overrides": overrides, "concept": concept.text(),
            "wall_s": round(time.perf_counter() - started, 1),
            "novel": concept.novel,
            **{k: summary.get(k) for k in ("concept_accuracy", "subject_accuracy", "shape_accuracy", "reconstruction", "editability",
                                           "concept_and_edit", *(f"edit_{b}" for b in BACKGROUNDS), "best_step",
                                           "objective")}}


def print_methods(result: dict) -> None:
    print(f"  {'method':<24} {'concept accuracy':>16} {'editability':>11} {'both':>6} {'recon':>6} {'wall s':>7}"
          "   (mean over concepts; min in brackets)")
    by_method: dict[str, list[dict]] = {}
    for row in result["rows"]:
        by_method.setdefault(row["method"], []).append(row)
    for name, rows in by_method.items():
        def mean(key):
            return sum(r[key] for r in rows) / len(rows)

        print(f"  {name:<24} {mean('concept_accuracy'):9.3f} ({min(r['concept_accuracy'] for r in rows):.2f}) "
              f"{mean('editability'):6.3f} ({min(r['editability'] for r in rows):.2f}) "
              f"{mean('concept_and_edit'):6.3f} {mean('reconstruction'):6.3f} {mean('wall_s'):7.1f}")


# `tinv-toy pivotal`: textual inversion against pivotal tuning (the vectors and a LoRA), each with its defaults, on
# concepts the base model draws (the demo one and others by seed) and on concepts with a shape outside pretraining.
PIVOTAL_METHODS = {"ti": [], "pivotal": ["method=pivotal"]}
PIVOTAL_TARGETS = {"novel_accuracy": 0.7, "novel_wall_s": 300}


def benchmark_concepts(others: int, novel: int, seed: int = 0) -> list[Concept]:
    """The demo concept, `others` in-world concepts and `novel` star concepts, picked by seed."""
    return [Concept(*DEMO_CONCEPT), *other_concepts(others, seed), *novel_concepts(novel, seed)]


def measure_pivotal(work: Path, others: int = 3, novel: int = 2, seed: int = 0) -> dict:
    concepts = benchmark_concepts(others, novel, seed)
    result = measure_methods(work, PIVOTAL_METHODS, seed=seed, concepts=concepts)
    result["targets"] = PIVOTAL_TARGETS
    result["summary"] = {f"{method}/{'novel' if is_novel else 'in_world'}": _means(
        [r for r in result["rows"] if r["method"] == method and r["novel"] == is_novel])
        for method in PIVOTAL_METHODS for is_novel in (False, True)}
    return result


def _means(rows: list[dict]) -> dict:
    keys = ("concept_accuracy", "editability", "concept_and_edit", "wall_s")
    return {**{k: sum(r[k] for r in rows) / len(rows) for k in keys},
            "min_concept_accuracy": min(r["concept_accuracy"] for r in rows),
            "max_wall_s": max(r["wall_s"] for r in rows)} if rows else {}


def print_pivotal(result: dict) -> None:
    t, s = result["targets"], result["summary"]
    print(f"  {'concepts':<10} {'method':<8} {'concept accuracy':>16} {'editability':>11} {'both':>6} {'wall s':>7}"
          "   (mean over concepts; min accuracy in brackets)")
    for key, m in s.items():
        if m:
            where, method = key.split("/")[1], key.split("/")[0]
            print(f"  {where:<10} {method:<8} {m['concept_accuracy']:9.3f} ({m['min_concept_accuracy']:.2f}) "
                  f"{m['editability']:11.3f} {m['concept_and_edit']:6.3f} {m['wall_s']:7.1f}")
    for row in result["rows"]:
        print(f"    {row['method']:<8} {row['concept']:<40} acc {row['concept_accuracy']:.3f} "
              f"shape {row['shape_accuracy']:.3f} edit {row['editability']:.3f} {row['wall_s']:6.1f} s")
    novel, world = s.get("pivotal/novel"), (s.get("pivotal/in_world"), s.get("ti/in_world"))
    if novel:
        print(f"  target: pivotal on novel concepts >= {t['novel_accuracy']} accuracy (min "
              f"{novel['min_concept_accuracy']:.3f}) in <= ~{t['novel_wall_s']} s a run "
              f"(max {novel['max_wall_s']:.0f} s)")
    if all(world):
        print(f"  target: in the world, pivotal accuracy {world[0]['concept_accuracy']:.3f} >= ti "
              f"{world[1]['concept_accuracy']:.3f} and editability {world[0]['editability']:.3f} >= ti "
              f"{world[1]['editability']:.3f}")
