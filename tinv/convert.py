"""`tinv-convert IN OUT`: an embedding from any common format to another, tensors unchanged.

    tinv-convert mychar.pt mychar.safetensors                      # A1111 .pt -> kohya/A1111/ComfyUI safetensors
    tinv-convert mychar.safetensors mychar.pt                      # and back
    tinv-convert mychar.safetensors learned_embeds.safetensors --to diffusers --token mychar
    tinv-convert sdxl_char.safetensors sdxl_char_diffusers/ --to diffusers   # SDXL: a folder with the two files
    tinv-convert sdxl_char_diffusers/ sdxl_char.safetensors        # and back
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .embedding import FORMATS, EmbeddingMeta, read_embedding, save_embedding
from .errors import ConfigError


def _format_for(out: Path, explicit: str | None) -> str:
    if explicit:
        return explicit
    if out.suffix == ".pt":
        return "a1111"
    if out.suffix == ".safetensors" and not out.name.startswith("learned_embeds"):
        return "kohya"
    return "diffusers"  # .bin, learned_embeds*.safetensors, or a folder


def convert(src: str | Path, out: str | Path, fmt: str | None = None, token: str | None = None) -> Path:
    src, out = Path(src).expanduser(), Path(out).expanduser()
    loaded = read_embedding(src)
    fmt = _format_for(out, fmt)
    name = token or loaded.name or src.stem
    if fmt == "diffusers" and len(loaded.vectors) == 1 and out.suffix not in (".safetensors", ".bin"):
        out.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers" and len(loaded.vectors) == 2:
        if out.suffix:
            raise ConfigError(f"{out}: an SDXL embedding in diffusers format is two files; give a folder path")
        out.mkdir(parents=True, exist_ok=True)
    return save_embedding(out, loaded.vectors, EmbeddingMeta(name), fmt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinv-convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("src", help="embedding file (.safetensors, .pt, .bin) or diffusers folder")
    parser.add_argument("out", help="file or folder to write")
    parser.add_argument("--to", choices=FORMATS, help="output format (default: from OUT's suffix: .pt a1111, "
                        ".safetensors kohya, .bin or a folder diffusers)")
    parser.add_argument("--token", help="token name stored in the output (default: the input's, else its file stem)")
    args = parser.parse_args(argv)
    try:
        written = convert(args.src, args.out, args.to, args.token)
    except ConfigError as err:
        print(f"tinv-convert: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
