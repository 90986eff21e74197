"""`tinv-score`: subject and prompt fidelity of any embedding, on your own images, with the numbers a run logs.

    tinv-score outputs/2026-12-07/10-00-00/mychar.safetensors --images ~/data/mychar
    tinv-score other-tool.pt --model sd15 --images ~/data/mychar --class-word dog
    tinv-score mychar.safetensors --images ~/data/mychar --lora mychar-lora.safetensors    # method=pivotal

Any embedding file tinv reads (A1111 .pt, kohya/ComfyUI safetensors, diffusers files, bundles). It samples the
token (and its class word) on fixed seeds and scores the samples as a run's `fidelity` callback does: DINO and
CLIP-I against the images in --images, CLIP-T against the prompts with the class word, and `fidelity`, both
together. A file from a tinv run takes the run's own settings (class word, template kind, prompts, sampler, steps,
guidance, seeds, scorers) from the run folder beside it, and method=pivotal's -lora file beside it, so its numbers
are the run's; each option overrides one.
Writes the sample grids and scores.json to --out and prints the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import sys
import time
from pathlib import Path

from ..atomic import write_text_atomic
from ..choices import Family, Sampler, SubjectKind
from ..errors import ConfigError, refuse
from ..resources import add_threads_option


class ScoringRun:
    """What the fidelity callback reads of a run, for a loaded embedding outside training."""

    def __init__(self, opened, out: Path, step: int, threads):
        self.backbone, self.token, self.device = opened.backbone, opened.token, opened.device
        self.accelerator = self  # sampling asks the accelerator for its device, precision and autocast
        self.mixed_precision = "fp16" if opened.device.type == "cuda" else "no"
        self.run_dir, self.step, self.threads, self.is_main = out, step, threads, True
        self.logged: dict = {}
        self.tracker = self

    def autocast(self):
        return contextlib.nullcontext()  # the models are loaded in the precision they sample in

    def log(self, metrics: dict) -> None:
        self.logged.update(metrics)

    def log_table(self, *args) -> None:
        pass


def run_settings(embedding: Path) -> dict:
    """The scoring settings of the tinv run an embedding comes from (its .hydra/config.yaml), else {}."""
    from omegaconf import OmegaConf

    record = (embedding if embedding.is_dir() else embedding.parent) / ".hydra" / "config.yaml"
    if not record.is_file():
        return {}
    import tinv.config  # noqa: F401 - the resolvers a run's record may use

    cfg = OmegaConf.load(record)
    paths = {"class_word": "token.init_word", "kind": "template.kind", "score_kind": "score.kind",
             "sampler": "sample.sampler",
             "steps": "sample.steps", "guidance_scale": "sample.guidance_scale",
             "negative_prompt": "sample.negative_prompt", "seed": "val.seed", "resolution": "model.resolution",
             "batch_size": "train.batch_size"}
    if OmegaConf.select(cfg, "callbacks.fidelity") is not None:  # a scored run: its scorers and prompts too
        paths |= {key: f"score.{key}" for key in ("clip", "dino", "subject_prompts", "style_prompts", "num_samples",
                                                  "prompt_samples")}
    return {key: OmegaConf.select(cfg, path) for key, path in paths.items()}


def score(args) -> dict:
    from omegaconf import OmegaConf

    from ..config import SampleConfig, ScoreConfig
    from ..data.images import list_images
    from ..resources import ThreadShare
    from ..scoring.callback import FidelityScoring
    from ..scoring.models import DEFAULT_CLIP, DEFAULT_DINO, locate
    from .generate import load_embedding

    embedding = Path(args.embedding).expanduser()
    images = Path(args.images).expanduser()
    if not images.is_dir() or not list_images(images):
        raise ConfigError(f"--images {args.images}: no images there; give the folder of your subject's images")
    sample = OmegaConf.structured(SampleConfig)
    score_keys = OmegaConf.to_container(OmegaConf.structured(ScoreConfig))
    defaults = {**score_keys, "kind": "object", "score_kind": score_keys["kind"],
                "sampler": sample.sampler, "steps": sample.steps, "guidance_scale": sample.guidance_scale,
                "negative_prompt": sample.negative_prompt, "seed": 0, "batch_size": 1}
    given = {"class_word": args.class_word, "score_kind": args.kind, "clip": args.clip, "dino": args.dino,
             "num_samples": args.samples, "sampler": args.sampler, "steps": args.steps,
             "guidance_scale": args.guidance, "seed": args.seed, "batch_size": args.batch_size}
    settings = defaults | {k: v for k, v in run_settings(embedding).items() if v is not None} | \
        {k: v for k, v in given.items() if v is not None}
    if not settings.get("class_word"):
        raise ConfigError(f"{embedding}: no class word (the file's run does not say one); give it with --class-word, "
                          "e.g. --class-word dog")
    for key, kind, default in (("clip", "clip", DEFAULT_CLIP), ("dino", "dino", DEFAULT_DINO)):
        settings[key] = locate(f"--{key}", settings[key], default, kind, off="")
    lora = args.lora
    beside = embedding.with_name(f"{embedding.stem}-lora.safetensors")
    if lora is None and not args.no_lora and embedding.is_file() and beside.is_file():
        lora = str(beside)  # method=pivotal's run wrote its LoRA beside the embedding: the run drew with both
    if args.model:  # another model than the run's: its own size
        settings.pop("resolution", None)
    threads = ThreadShare(args.threads)
    keys = ("clip", "dino", "kind", "score_kind", "subject_prompts", "style_prompts", "num_samples", "prompt_samples",
            "sampler", "steps", "guidance_scale", "negative_prompt", "seed", "class_word")
    # built before the model loads, so a bad setting says so at once; the token's word is known once it has loaded
    scorer = FidelityScoring(**{k: settings.get(k) for k in keys}, resolution=settings.get("resolution") or 512,
                             batch_size=settings["batch_size"])
    opened = load_embedding(embedding, [], args.model, args.family, args.config_dir, args.token, lora, 1.0, args.cpu,
                            prog="tinv-score", apply_lora=False)
    loaded, name = opened.loaded, opened.token.string
    scorer.token = name
    if not settings.get("resolution"):  # not a tinv run's file: the model's own size
        scorer.spec.width = scorer.spec.height = opened.backbone.native_resolution
    out = Path(args.out).expanduser() if args.out else (embedding if embedding.is_dir() else embedding.parent) / \
        "scores" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{secrets.token_hex(2)}"  # two at once: two folders
    step = str(loaded.header.get("tinv.step", ""))
    run = ScoringRun(opened, out, int(step) if step.isdigit() else 0, threads)
    scorer.image_paths = list_images(images)
    threads.claim()
    try:
        scorer.on_start(run)  # the class word on the model as it was before training: without the LoRA
        opened.add_lora(embedding, lora)
        scores = scorer.score(run)
    finally:
        threads.release()
    used_lora = (lora or f"{embedding.name}'s own (a bundle)") if opened.lora else None
    result = {"embedding": str(embedding), "token": name, "class_word": scorer.class_word, "images": str(images),
              "model": opened.backbone.path, "lora": used_lora, **scores,
              **{f"word_{k}": v for k, v in scorer.word.items()}, "seconds": round(scorer.seconds, 1)}
    write_text_atomic(out / "scores.json", json.dumps(result, indent=1) + "\n")
    return result | {"out": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinv-score", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("embedding", help="an embedding file (or a diffusers SDXL embedding folder)")
    parser.add_argument("--images", required=True, help="the folder of your subject's own images")
    parser.add_argument("--lora", help="method=pivotal's -lora file (default: <name>-lora.safetensors beside the "
                        "embedding, as the run wrote it; a bundle given as the embedding brings its own)")
    parser.add_argument("--no-lora", action="store_true", help="score the vectors alone, without the LoRA beside them")
    parser.add_argument("--model", help="base model: a model= choice, a hub id, a diffusers folder or a single file "
                        "(default: the one the embedding was trained on)")
    parser.add_argument("--family", choices=Family.values(), help="model family (default: from the embedding)")
    parser.add_argument("--config-dir", help="single-file models: a local diffusers folder of the same family")
    parser.add_argument("--token", help="the word for the vectors (default: the file's name for it)")
    parser.add_argument("--class-word", help="what the subject is, e.g. dog (default: the run's token.init_word)")
    parser.add_argument("--kind", choices=SubjectKind.values(), help="which prompts: a subject's or a style's "
                        "(default: the run's score.kind, else its template.kind, else object)")
    parser.add_argument("--clip", help="CLIP scorer, hub id or folder (default: the run's score.clip)")
    parser.add_argument("--dino", help="DINO scorer, hub id or folder (default: the run's score.dino)")
    parser.add_argument("--samples", type=int, help="samples of 'a photo of <token>' (default: the run's)")
    parser.add_argument("--sampler", choices=Sampler.values())
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch-size", type=int, help="images sampled and scored at a time (default: the run's "
                        "train.batch_size, else 1)")
    parser.add_argument("--out", help="output folder (default: scores/<time> beside the embedding)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    from ..console import quiet_command

    quiet_command()
    try:
        result = score(args)
    except ConfigError as err:
        return refuse("tinv-score", err)
    lora = f" with the LoRA {result['lora']}" if result["lora"] else ""
    print(f"tinv-score: {result['token']!r}{lora} (class word {result['class_word']!r}) on {result['model']}, "
          f"{result['seconds']:.0f} s")
    for label, keys in (("token", ("dino", "clip_i", "clip_t")), ("class word", ("word_dino", "word_clip_i",
                                                                                   "word_clip_t"))):
        print(f"  {label:<11} " + ", ".join(f"{k.removeprefix('word_')} {result[k]:.4f}" for k in keys))
    print(f"  fidelity    {result['fidelity']:.4f} (subject {result['subject_fidelity']:.4f}, prompt "
          f"{result['prompt_fidelity']:.4f})")
    print(f"  samples     {result['out']} (grids in samples/, scores.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
