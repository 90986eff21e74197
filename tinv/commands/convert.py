"""`tinv-convert IN OUT`: an embedding from any common format to another, tensors unchanged; `split` and `join` take
an A1111 bundle (a LoRA with the embedding inside, method=pivotal's -bundle file) apart and put one together.

    tinv-convert mychar.pt mychar.safetensors                      # A1111 .pt -> kohya/A1111/ComfyUI safetensors
    tinv-convert mychar.safetensors mychar.pt                      # and back
    tinv-convert mychar.safetensors learned_embeds.safetensors --to diffusers --token mychar
    tinv-convert sdxl_char.safetensors sdxl_char_diffusers/ --to diffusers   # SDXL: a folder with the two files
    tinv-convert sdxl_char_diffusers/ sdxl_char.safetensors        # and back
    tinv-convert split mychar-bundle.safetensors mychar.safetensors mychar-lora.safetensors
    tinv-convert join mychar.safetensors mychar-lora.safetensors mychar-bundle.safetensors
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError, refuse
from ..formats.convert import convert, join_bundle, split_bundle
from ..formats.embedding import FORMATS


def bundle_main(argv: list[str]) -> int:
    """`tinv-convert split BUNDLE EMBEDDING LORA` / `tinv-convert join EMBEDDING LORA BUNDLE`."""
    parser = argparse.ArgumentParser(prog=f"tinv-convert {argv[0]}")
    if argv[0] == "split":
        parser.description = "an A1111 bundle -> its embedding and its plain (kohya-layout) LoRA"
        parser.add_argument("bundle")
        parser.add_argument("embedding", help="embedding file to write (format from its name, as tinv-convert IN OUT)")
        parser.add_argument("lora", help="LoRA .safetensors to write")
        parser.add_argument("--to", choices=FORMATS, help="embedding format (default: from its name)")
    else:
        parser.description = "an embedding and a LoRA (kohya or diffusers layout) -> one A1111 bundle"
        parser.add_argument("embedding")
        parser.add_argument("lora")
        parser.add_argument("bundle", help=".safetensors file to write")
        parser.add_argument("--token", help="the token the bundle names (default: the embedding's, else its stem)")
    args = parser.parse_args(argv[1:])
    try:
        if argv[0] == "split":
            written = split_bundle(args.bundle, args.embedding, args.lora, args.to)
        else:
            written = (join_bundle(args.embedding, args.lora, args.bundle, args.token),)
    except ConfigError as err:
        return refuse(f"tinv-convert {argv[0]}", err)
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("split", "join"):
        return bundle_main(argv)
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
        return refuse("tinv-convert", err)
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
