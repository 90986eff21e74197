"""`tinv-generate`: images of an embedding's token, on its base model, from your own prompts.

    tinv-generate outputs/2026-12-02/10-00-00/mychar.safetensors "a photo of mychar on a beach" "mychar in the snow"
    tinv-generate mychar.pt "a photo of mychar" --model /models/sd15 --n 8 --compare
    tinv-generate mychar.safetensors "a photo of mychar" --lora mychar-lora.safetensors   # method=pivotal

Any embedding file tinv reads (kohya/A1111/ComfyUI safetensors, A1111 .pt, diffusers files and folders, an A1111
bundle, whose LoRA comes along); `--lora` adds method=pivotal's LoRA file (either layout). The base
model comes from the file's own header (tinv writes it), else from the run's summary.json beside the file, else
from --model (any source tinv loads: hub id, diffusers folder, single file with --config-dir). Writes each image,
and a grid with a row per prompt (and, with --compare, the same seeds without the token beneath it), and prints
their paths.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

from .choices import Family, Sampler
from .errors import ConfigError

log = logging.getLogger("tinv.generate")

WIDTHS = {768: "sd1", 1024: "sd2"}  # the real single-encoder widths, for files that do not say their family


def base_model(embedding: Path, loaded, model: str | None, family: str | None) -> tuple[str, str]:
    """(model path, family) from the arguments, the file's header, or the run's summary.json beside it."""
    summary_file = (embedding if embedding.is_dir() else embedding.parent) / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    model = model or loaded.header.get("tinv.base_model") or summary.get("base_model")
    if not model:
        raise ConfigError(f"{embedding}: it does not name its base model; give one with --model (a hub id, a diffusers "
                          "folder or a single checkpoint file)")
    family = family or loaded.header.get("tinv.family") or summary.get("family")
    if not family:
        if "clip_g" in loaded.vectors:
            family = "sdxl"
        else:
            family = WIDTHS.get(loaded.vectors["emb_params"].shape[1])
    if family not in Family.values():
        raise ConfigError(f"{embedding}: cannot tell the model family of these vectors; give --family "
                          f"({', '.join(Family.values())})")
    return model, family


def without_token(prompt: str, token: str) -> str:
    return " ".join(re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", prompt, flags=re.IGNORECASE).split())


def generate(args) -> dict:
    import torch
    from PIL import Image

    from .backbone import Backbone
    from .embedding import ConceptToken, read_embedding
    from .lora import load_into_pipeline
    from .sampling import grid, sampling_mode, scheduler_for, slug

    embedding = Path(args.embedding).expanduser()
    loaded = read_embedding(embedding)
    token_string = args.token or loaded.name or (embedding.stem if not embedding.is_dir() else None)
    if not token_string:
        raise ConfigError(f"{embedding}: the files do not name their token; give it with --token")
    model, family = base_model(embedding, loaded, args.model, args.family)
    backbone = Backbone.from_pretrained(family, model, config_dir=args.config_dir)
    token = ConceptToken(token_string, num_vectors=None, weights=str(embedding))
    try:
        token.add_to_tokenizers(backbone.encoders)
    except ConfigError:
        raise ConfigError(f"the trigger word {token.string!r} is already a word of {model}, so the vectors cannot take "
                          "its place; pick a new one with --token (and write it in the prompts)") from None
    token.check_start(backbone.encoders)
    missing = [p for p in args.prompts if not token.contains_token(p)]
    if missing:
        log.warning("these prompts do not contain the token %r, so it does nothing there: %s", token.string, missing)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backbone.load_models(device, dtype, torch.float32 if backbone.keeps_vae_fp32 else dtype)
    token.install(backbone.encoders, seed=0)
    width = args.width or backbone.native_resolution
    height = args.height or backbone.native_resolution
    out = Path(args.out).expanduser() if args.out else \
        (embedding if embedding.is_dir() else embedding.parent) / "generated" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    pipe = backbone.pipeline(scheduler_for(args.sampler, backbone.noise_scheduler.config, backbone.prediction_type))
    pipe.set_progress_bar_config(disable=True)
    with_lora = load_into_pipeline(pipe, embedding, args.lora, args.lora_scale)
    if args.lora_scale != 1.0 and not with_lora:
        raise ConfigError("--lora-scale needs a LoRA: give --lora FILE or a bundle as the embedding")
    rows, written = [], []
    with sampling_mode(backbone, device):
        for p, prompt in enumerate(args.prompts):
            variants = [(prompt, "")] + ([(without_token(prompt, token.string), "-without")] if args.compare else [])
            for text, suffix in variants:
                row = []
                for n in range(args.n):
                    gen = torch.Generator(device="cpu").manual_seed(args.seed + n)
                    image = pipe(token.expand(text), negative_prompt=token.expand(args.negative) or None,
                                 width=width, height=height, num_inference_steps=args.steps,
                                 guidance_scale=args.guidance, generator=gen, **backbone.sampling_kwargs()).images[0]
                    path = out / f"{p:02d}-{slug(prompt)}-seed{args.seed + n}{suffix}.png"
                    image.save(path)
                    row.append(image)
                    written.append(path)
                rows.append(row)
    sheet = grid([image for row in rows for image in row], cols=args.n)
    scale = max(1, 256 // max(width, height))  # small models' images are enlarged so the grid can be seen
    if scale > 1:
        sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.Resampling.NEAREST)
    sheet.save(out / "grid.png")
    return {"images": written, "grid": out / "grid.png", "model": model, "family": family, "token": token.string,
            "lora": with_lora}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinv-generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("embedding", help="an embedding file (or a diffusers SDXL embedding folder)")
    parser.add_argument("prompts", nargs="+", help="prompts with the token in them, e.g. \"a photo of mychar\"")
    parser.add_argument("--lora", help="a LoRA to load with it (method=pivotal's -lora file; a bundle given as the "
                        "embedding brings its own)")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="the LoRA's strength (default 1)")
    parser.add_argument("--model", help="base model (default: the one the embedding was trained on)")
    parser.add_argument("--family", choices=Family.values(), help="model family (default: from the embedding)")
    parser.add_argument("--config-dir", help="single-file models: a local diffusers folder of the same family")
    parser.add_argument("--token", help="the trigger word (default: the name the file carries, else its file name)")
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
    args = parser.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        parser.error("--n and --steps must be at least 1")
    from .console import quiet_command

    quiet_command()
    try:
        result = generate(args)
    except ConfigError as err:
        print(f"tinv-generate: error: {err}", file=sys.stderr)
        return 2
    lora = " with its LoRA" if result["lora"] else ""
    print(f"{len(result['images'])} images of {result['token']!r}{lora} on {result['model']} ({result['family']}):")
    print(f"  grid    {result['grid']}")
    print(f"  images  {result['images'][0].parent}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
