"""`tinv-inspect`: what an embedding file's vectors learned, without drawing a picture.

Per vector and text encoder: its norm against the range of the vocabulary's row norms (a vector far outside it
dominates every prompt it is in), its cosine to where it started (near 1: it barely moved), and the vocabulary
tokens nearest to it (what the model "reads" it as).

    tinv-inspect outputs/2026-12-02/10-00-00/mychar.safetensors
    tinv-inspect mychar.pt --model /models/sd15 --init-word girl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..backbone import Backbone
from ..console import quiet_command
from ..errors import ConfigError, refuse
from ..formats.embedding import read_embedding
from ..inspection import format_report, report
from ..trained.token import output_rows
from .generate import base_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinv-inspect", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("embedding", help="an embedding file (or a diffusers SDXL embedding folder)")
    parser.add_argument("--model", help="base model: a model= choice (toy, sd15, ...), a hub id, a folder or a single "
                        "file (default: the one the embedding was trained on)")
    parser.add_argument("--family", help="sd1, sd2 or sdxl (default: from the embedding)")
    parser.add_argument("--config-dir", help="single-file models: a local diffusers folder of the same family")
    parser.add_argument("--init-word", help="compare with this word's rows (default: the run's token.init_word)")
    parser.add_argument("--top", type=int, default=5, help="nearest vocabulary tokens to show")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    quiet_command()
    try:
        rows = inspect_file(Path(args.embedding).expanduser(), args.model, args.family, args.config_dir,
                            args.init_word, args.top)
    except ConfigError as err:
        return refuse("tinv-inspect", err)
    print(json.dumps(rows, indent=1) if args.json else format_report(rows))
    return 0


def inspect_file(embedding: Path, model: str | None, family: str | None, config_dir: str | None,
                 init_word: str | None, top: int) -> list[dict]:
    loaded = read_embedding(embedding)
    backbone = Backbone.from_pretrained(**base_model(embedding, loaded, model, family, config_dir, "tinv-inspect"))
    backbone.load_text_encoders()
    run_token = _run_token(embedding)
    init_word = init_word or run_token.get("init_word")
    start = None
    if init_word:  # where the run's vectors started: the word's rows, or its encoder output (token.init_from)
        rows = len(next(iter(loaded.vectors.values())))
        if run_token.get("init_from") == "output":
            pieces = output_rows(backbone, init_word)
        else:
            pieces = {enc.key: enc.model.get_input_embeddings().weight.detach().float().cpu()[
                enc.tokenizer(init_word, add_special_tokens=False).input_ids] for enc in backbone.encoders}
        start = {key: torch.stack([p[j % len(p)] for j in range(rows)]) for key, p in pieces.items()}
    return report(loaded.vectors, backbone.encoders, start, top)


def _run_token(embedding: Path) -> dict:
    """The token settings of the run that wrote the file, from its .hydra/config.yaml beside it ({} if none)."""
    config = (embedding if embedding.is_dir() else embedding.parent) / ".hydra" / "config.yaml"
    if not config.is_file():
        return {}
    import yaml

    return yaml.safe_load(config.read_text()).get("token") or {}


if __name__ == "__main__":
    sys.exit(main())
