"""`tinv-generate`: images of an embedding's token, on its base model, from your own prompts.

    tinv-generate outputs/2026-12-02/10-00-00/mychar.safetensors "a photo of mychar on a beach" "mychar in the snow"
    tinv-generate mychar.pt "a photo of mychar" --model /models/sd15 --n 8 --compare
    tinv-generate mychar.safetensors "a photo of mychar" --model toy       # any model= choice of tinv-train
    tinv-generate mychar.safetensors "a photo of mychar" --lora mychar-lora.safetensors   # method=pivotal

Any embedding file tinv reads (kohya/A1111/ComfyUI safetensors, A1111 .pt and PNG, diffusers files and folders, an
A1111 bundle, whose LoRA comes along); `--lora` adds method=pivotal's LoRA file (either layout). The base model
comes from --model (a model= choice such as toy or sd15, a hub id, a diffusers folder, or a single file with
--config-dir), else from the file itself (tinv writes what it was trained on, and its model= choice, which finds a
built-in model on another machine), else from the run's summary.json beside it. The word in the prompts is the
one the file answers to: its name (the file name, as in A1111 and ComfyUI). Writes each image, and a grid with a
row per prompt (with --compare, the same seeds without the token beneath it) and a column per seed, labelled, and
prints their paths.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..choices import Family, Sampler
from ..errors import ConfigError, refuse
from ..resources import add_threads_option

log = logging.getLogger("tinv.generate")

WIDTHS = {768: "sd1", 1024: "sd2"}  # the real single-encoder widths, for files that do not say their family


def _model_keys(choice: dict) -> dict:
    """Backbone.from_pretrained's keys from a model= choice's config."""
    return {k: v for k, v in choice.items() if k != "_target_"}


def base_model(embedding: Path, loaded, model: str | None, family: str | None, config_dir: str | None = None,
               prog: str = "tinv-generate") -> dict:
    """Backbone.from_pretrained's keys: --model (a model= choice, a folder, a file or a hub id), else what the file
    (or the run's summary.json beside it) records. A recorded path that is not on this machine gives way to the
    model= choice recorded beside it (a built-in model, written anew on first use); `prog` says so."""
    from ..backbone.source import is_hub_id
    from ..commandline import model_choice, model_choices

    choice = model_choice(model) if model else None
    if choice is not None:
        if family and family != choice["family"]:
            raise ConfigError(f"--family {family} but --model {model} is {choice['family']}; leave --family out")
        return _model_keys(choice)
    if model and not Path(model).expanduser().exists() and not is_hub_id(model):
        raise ConfigError(f"--model {model}: not a model= choice ({', '.join(model_choices())}), an existing "
                          "folder or file, or a hub id like 'org/name'")
    summary_file = (embedding if embedding.is_dir() else embedding.parent) / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    recorded = loaded.header.get("tinv.base_model") or summary.get("base_model")
    recorded_choice = loaded.header.get("tinv.model") or summary.get("model")
    if not model and recorded and not Path(recorded).expanduser().exists() and not is_hub_id(recorded):
        choice = model_choice(recorded_choice) if recorded_choice else None
        if choice is not None:
            print(f"{prog}: {embedding} was trained on {recorded}, which is not on this machine; using "
                  f"model={recorded_choice}, the choice it was trained with", file=sys.stderr)
            return _model_keys(choice)
    name = "" if model else recorded_choice  # a path of the user's own is no choice
    model = model or recorded
    if not model:
        room = " (an SDXL .pt or a diffusers .bin holds the vectors alone)" if embedding.suffix in (".pt", ".bin") \
            else ""
        raise ConfigError(f"{embedding}: it does not name its base model{room}; give one with --model (a model= "
                          f"choice such as {', '.join(model_choices()[:3])}, a hub id, a diffusers folder or a single "
                          "checkpoint file)")
    family = family or loaded.header.get("tinv.family") or summary.get("family")
    if not family:
        if "clip_g" in loaded.vectors:
            family = "sdxl"
        else:
            family = WIDTHS.get(loaded.vectors["emb_params"].shape[1])
    if family not in Family.values():
        raise ConfigError(f"{embedding}: cannot tell the model family of these vectors; give --family "
                          f"({', '.join(Family.values())})")
    return {"family": family, "path": model, "config_dir": config_dir, "name": name}


def trigger_word(embedding: Path, loaded, prompts: list[str], given: str | None) -> str:
    """The word that stands for the vectors in the prompts: --token, else the file's own name or its file name,
    whichever the prompts use (A1111 and ComfyUI users write the file name)."""
    if given:
        return given
    names = names_of(embedding, loaded)
    if not names:
        raise ConfigError(f"{embedding}: the files do not name their token; give it with --token")
    for name in names:
        pattern = re.compile(rf"(?<!\w){re.escape(name)}(?!\w)", re.IGNORECASE)
        if any(pattern.search(p) for p in prompts):
            return name
    return names[0]


def names_of(embedding: Path, loaded) -> list[str]:
    """The words an embedding answers to: the name it carries, then its file name."""
    return list(dict.fromkeys(n for n in (loaded.name, None if embedding.is_dir() else embedding.stem) if n))


def without_token(prompt: str, token: str) -> str:
    return " ".join(re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", prompt, flags=re.IGNORECASE).split())


@dataclass
class LoadedEmbedding:
    """An embedding's token installed in its base model, ready to sample (tinv-generate, tinv-score)."""

    backbone: object
    token: object
    keys: dict  # Backbone.from_pretrained's keys
    device: object
    lora: bool  # a LoRA was loaded beside the vectors
    loaded: object = None  # the embedding file as read (its vectors, name and header)

    def add_lora(self, embedding: Path, lora: str | None, scale: float = 1.0) -> bool:
        """The `lora` file, or the LoRA a bundled `embedding` carries, into the model's own modules (so every
        pipeline built from them afterwards draws with it); whether there was one."""
        from ..formats.lora import load_into_pipeline
        from ..sampling import scheduler_for

        pipe = self.backbone.pipeline(scheduler_for("ddim", self.backbone.noise_scheduler.config,
                                                    self.backbone.prediction_type))
        self.lora = load_into_pipeline(pipe, embedding, lora, scale)
        if scale != 1.0 and not self.lora:
            raise ConfigError("--lora-scale needs a LoRA: give --lora FILE or a bundle as the embedding")
        return self.lora


def load_embedding(embedding: Path, prompts: list[str], model: str | None, family: str | None = None,
                   config_dir: str | None = None, token_word: str | None = None, lora: str | None = None,
                   lora_scale: float = 1.0, cpu: bool = False, prog: str = "tinv-generate",
                   apply_lora: bool = True) -> LoadedEmbedding:
    """Any embedding file tinv reads, its token added to the base model's tokenizers and its vectors installed, the
    models loaded (on the GPU in half precision when there is one) and the LoRA, if any, applied (`apply_lora`;
    else add_lora() applies it later)."""
    import torch

    from ..backbone import Backbone
    from ..formats.embedding import read_embedding
    from ..trained.token import ConceptToken

    loaded = read_embedding(embedding)
    token_string = trigger_word(embedding, loaded, prompts, token_word)
    keys = base_model(embedding, loaded, model, family, config_dir, prog)
    backbone = Backbone.from_pretrained(**keys)
    token = ConceptToken(token_string, num_vectors=None, weights=str(embedding))
    try:
        token.add_to_tokenizers(backbone.encoders)
    except ConfigError:
        raise ConfigError(f"the trigger word {token.string!r} is already a word of {keys['path']}, so the vectors "
                          "cannot take its place; pick a new one with --token (and write it in the prompts)") from None
    token.check_start(backbone.encoders)
    missing = [p for p in prompts if not token.contains_token(p)]
    if missing:
        words = " or ".join(repr(n) for n in dict.fromkeys([token.string, *names_of(embedding, loaded)]))
        log.warning("these prompts do not contain %s, the word this embedding answers to, so it does nothing there: "
                    "%s", words, missing)
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backbone.load_models(device, dtype, torch.float32 if backbone.keeps_vae_fp32 else dtype)
    token.install(backbone.encoders, seed=0)
    opened = LoadedEmbedding(backbone, token, keys, device, False, loaded)
    if apply_lora:
        opened.add_lora(embedding, lora, lora_scale)
    return opened


def generate(args) -> dict:
    import torch

    from ..resources import ThreadShare, follow_load_in_pipeline
    from ..sampling import labelled_grid, sampling_mode, scheduler_for, slug

    threads = ThreadShare(args.threads)  # its first look at the cores' load lasts while the model loads
    embedding = Path(args.embedding).expanduser()
    opened = load_embedding(embedding, args.prompts, args.model, args.family, args.config_dir, args.token, args.lora,
                            args.lora_scale, args.cpu)
    backbone, token, keys, device, with_lora = opened.backbone, opened.token, opened.keys, opened.device, opened.lora
    width = args.width or backbone.native_resolution
    height = args.height or backbone.native_resolution
    out = Path(args.out).expanduser() if args.out else \
        (embedding if embedding.is_dir() else embedding.parent) / "generated" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    pipe = backbone.pipeline(scheduler_for(args.sampler, backbone.noise_scheduler.config, backbone.prediction_type))
    pipe.set_progress_bar_config(disable=True)
    threads.claim()
    rows, labels, written = [], [], []
    try:
        with sampling_mode(backbone, device):
            for p, prompt in enumerate(args.prompts):
                variants = [(prompt, "", prompt)]
                if args.compare:
                    text = without_token(prompt, token.string)
                    variants.append((text, "-without", f"without {token.string}: {text}"))
                for text, suffix, label in variants:
                    row = []
                    for n in range(args.n):
                        gen = torch.Generator(device="cpu").manual_seed(args.seed + n)
                        image = pipe(token.expand(text), negative_prompt=token.expand(args.negative) or None,
                                     width=width, height=height, num_inference_steps=args.steps,
                                     guidance_scale=args.guidance, generator=gen,
                                     callback_on_step_end=follow_load_in_pipeline,
                                     **backbone.sampling_kwargs()).images[0]
                        path = out / f"{p:02d}-{slug(prompt)}-seed{args.seed + n}{suffix}.png"
                        image.save(path)
                        row.append(image)
                        written.append(path)
                    rows.append(row)
                    labels.append(label)
    finally:
        threads.release()
    labelled_grid(rows, labels, [f"seed {args.seed + n}" for n in range(args.n)]).save(out / "grid.png")
    return {"images": written, "grid": out / "grid.png", "model": backbone.path, "choice": backbone.name,
            "family": keys["family"], "token": token.string, "lora": with_lora, "threads": threads.describe()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinv-generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("embedding", help="an embedding file (or a diffusers SDXL embedding folder)")
    parser.add_argument("prompts", nargs="+", help="prompts with the token in them, e.g. \"a photo of mychar\"")
    parser.add_argument("--lora", help="a LoRA to load with it (method=pivotal's -lora file; a bundle given as the "
                        "embedding brings its own)")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="the LoRA's strength (default 1)")
    parser.add_argument("--model", help="base model: a model= choice (toy, sd15, sdxl, ...), a hub id, a diffusers "
                        "folder or a single file (default: the one the embedding was trained on)")
    parser.add_argument("--family", choices=Family.values(), help="model family (default: from the embedding)")
    parser.add_argument("--config-dir", help="single-file models: a local diffusers folder of the same family")
    parser.add_argument("--token", help="the trigger word (default: the name the file carries or its file name, "
                        "whichever the prompts use)")
    parser.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--sampler", choices=Sampler.values(), default="euler_a")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--width", type=int, help="default: the model's native size")
    parser.add_argument("--height", type=int)
    parser.add_argument("--compare", action="store_true", help="also the same seeds without the token")
    parser.add_argument("--out", help="output folder (default: generated/<time> beside the embedding)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        parser.error("--n and --steps must be at least 1")
    from ..console import quiet_command

    quiet_command()
    try:
        result = generate(args)
    except ConfigError as err:
        return refuse("tinv-generate", err)
    lora = " with its LoRA" if result["lora"] else ""
    count, choice = len(result["images"]), f"model={result['choice']}, " if result["choice"] else ""
    print(f"{count} image{'s'[:count > 1]} of {result['token']!r}{lora} on {result['model']} ({choice}"
          f"{result['family']}), {result['threads']}:")
    print(f"  grid    {result['grid']}")
    print(f"  images  {result['images'][0].parent}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
