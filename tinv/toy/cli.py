"""tinv-toy: render concepts of the toy world, or pretrain the toy model and its judge.

    tinv-toy render --concept "yellow triangle on a navy background" --n 16 DIR [--mask-dir MASKS] [--alpha]
    tinv-toy pretrain OUT_DIR [--seed 0]      # maintainers: about an hour on 2 CPU cores; ships as tinv/toy/weights
    tinv-toy judge OUT_DIR [--seed 0]         # maintainers: the judge alone (minutes), after a new attribute
    tinv-toy targets WORK_DIR                 # measure the quality targets (minutes)
    tinv-toy pivotal WORK_DIR                 # textual inversion against pivotal tuning, stars included (~30 min)
    tinv-toy masks WORK_DIR                   # with and without masks, beside photos on a few backgrounds (~1.5 h)
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from ..errors import ConfigError, refuse
from ..resources import ThreadShare, add_threads_option
from .world import render_concept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinv-toy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="write K captioned images of one concept")
    r.add_argument("out_dir")
    r.add_argument("--concept", required=True, help='e.g. "red circle on a black background"')
    r.add_argument("--n", type=int, default=16)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--mask-dir", help="also write each image's mask (the figure) here, named as the image "
                   "(train with data.mask_dir=MASK_DIR)")
    r.add_argument("--alpha", action="store_true", help="write RGBA images whose alpha is the mask (train with "
                   "data.alpha_mask=true)")
    r.add_argument("--masklabel", action="store_true", help="write OneTrainer's NNN-masklabel.png beside each image "
                   "(found without a key)")
    p = sub.add_parser("pretrain", help="pretrain the judge, VAE, text encoder and UNet")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge-steps", type=int, default=800)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--denoiser-steps", type=int, default=3000)
    p.add_argument("--per-concept", type=int, default=600, help="pool images per concept")
    p.add_argument("--eval-samples", type=int, default=2, help="samples per concept at each checkpoint (0 = none)")
    p.add_argument("--continue-from", metavar="DIR", help="an earlier pretrain output: train its text encoder and "
                   "UNet for --denoiser-steps more (judge and VAE kept)")
    j = sub.add_parser("judge", help="retrain the judge alone for every attribute the world renders")
    j.add_argument("out_dir")
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--steps", type=int, default=800)
    t = sub.add_parser("targets", help="measure and print the quality targets (base model, init word, training)")
    t.add_argument("work_dir", help="folder for rendered concepts and training runs")
    t.add_argument("--samples", type=int, default=64, help="samples per score")
    t.add_argument("--base-per-concept", type=int, default=16, help="samples per concept for the base model")
    t.add_argument("--others", type=int, default=2, help="concepts besides the demo one")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="also write the numbers as JSON here")
    t.add_argument("overrides", nargs="*", help="tinv-train overrides for every training run (default: none)")
    m = benchmark_parser(sub, "methods", "measure reconstruction and editability of training methods", novel=0,
                         method_help="a method as tinv-train overrides, e.g. 'l2=token.norm=l2_to_init "
                                     "token.norm_weight=0.1' (default: the built-in list)")
    v = benchmark_parser(sub, "pivotal", "textual inversion against pivotal tuning, on concepts in and outside "
                         "pretraining", novel=2)
    k = benchmark_parser(sub, "masks", "textual inversion and pivotal tuning with and without masks, beside photos "
                         "on a few backgrounds", novel=2,
                         method_help="rows to measure instead of the built-in ones, e.g. 'ti+masks0=data.mask_dir="
                                     "{masks} loss.mask_weight=0' ({masks}: the concept's masks; {photos}: it on "
                                     "three backgrounds)")
    d = sub.add_parser("defaults", help="candidate defaults on a tuning set of concepts and a held-out set")
    d.add_argument("work_dir", help="folder for rendered concepts and training runs (measured rows are kept)")
    d.add_argument("--set", choices=["tuning", "held-out", "both"], default="tuning",
                   help="which concepts: choose on tuning, report held-out once per candidate (default tuning)")
    d.add_argument("--size", type=int, default=8, help="concepts per set (default 8)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--candidate", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="tinv-train overrides to measure (repeat; default: default= , the defaults as they are)")
    d.add_argument("--out", help="also write the numbers as JSON here")
    for command in (p, j, t, m, v, k, d):
        add_threads_option(command)
    args = parser.parse_args(argv)
    if args.command != "render":  # these load models: no library notices or bars
        from ..console import quiet_command

        quiet_command()
        if args.threads:  # the training runs it starts take the same count
            os.environ["TINV_THREADS"] = str(args.threads)
        try:  # the measuring commands wait while their training runs work: only pretraining counts as a run
            ThreadShare(register=args.command in ("pretrain", "judge")).claim()
        except ConfigError as err:
            return refuse(f"tinv-toy {args.command}", err)
    if args.command in ("targets", "methods", "pivotal", "masks", "defaults"):
        import json

        from ..atomic import write_text_atomic
        from . import defaults, masked, targets

        if args.command == "targets":
            result = targets.measure(Path(args.work_dir), args.samples, args.base_per_concept, args.others,
                                     args.seed, args.overrides)
            targets.print_table(result)
        elif args.command == "defaults":
            candidates = named_overrides(parser, "--candidate", args.candidate) or {"default": []}
            sets = ("tuning", "held-out") if args.set == "both" else (args.set,)
            try:
                result = defaults.measure_defaults(Path(args.work_dir), candidates, sets, args.seed, args.size)
            except ValueError as err:
                return refuse("tinv-toy defaults", err)
            defaults.print_defaults(result)
        elif args.command == "masks":
            result = masked.measure_masked(Path(args.work_dir), named_overrides(parser, "--method", args.method),
                                           args.others, args.novel, args.seed)
            masked.print_masked(result)
        elif args.command == "pivotal":
            result = targets.measure_pivotal(Path(args.work_dir), args.others, args.novel, args.seed)
            targets.print_pivotal(result)
        else:
            methods = named_overrides(parser, "--method", args.method)
            result = targets.measure_methods(Path(args.work_dir), methods or targets.METHODS, seed=args.seed,
                                             concepts=targets.benchmark_concepts(args.others, args.novel, args.seed))
            targets.print_methods(result)
        if args.out:
            write_text_atomic(Path(args.out), json.dumps(result, indent=1) + "\n")
        return 0
    if args.command == "render":
        try:
            out = render_concept(args.concept, args.n, Path(args.out_dir), args.seed,
                                 Path(args.mask_dir) if args.mask_dir else None, args.alpha, args.masklabel)
        except (ValueError, FileExistsError) as err:
            return refuse("tinv-toy render", err)
        masks = ([f"their masks in {args.mask_dir}"] if args.mask_dir else []) + \
            (["masks in their alpha channel"] if args.alpha else []) + \
            (["-masklabel.png masks beside them"] if args.masklabel else [])
        print(f"wrote {args.n} images of {args.concept!r} to {out}" + (f" ({', '.join(masks)})" if masks else ""))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "judge":
        from .pretrain import retrain_judge

        print(retrain_judge(Path(args.out_dir), args.steps, args.seed))
        return 0
    from .pretrain import pretrain

    report = pretrain(Path(args.out_dir), seed=args.seed, judge_steps=args.judge_steps, vae_steps=args.vae_steps,
                      denoiser_steps=args.denoiser_steps, per_concept=args.per_concept,
                      eval_samples=args.eval_samples, continue_from=args.continue_from)
    print({k: v for k, v in report.items() if k != "checkpoints"})
    return 0


def benchmark_parser(sub, name: str, description: str, novel: int, method_help: str | None = None):
    """A benchmark over the demo concept, `--others` in-world ones and `--novel` stars (rows kept in WORK_DIR)."""
    parser = sub.add_parser(name, help=description)
    parser.add_argument("work_dir", help="folder for rendered concepts and training runs (measured rows are kept)")
    parser.add_argument("--others", type=int, default=3, help="in-world concepts besides the demo one, picked by seed")
    parser.add_argument("--novel", type=int, default=novel, help="concepts with a shape outside pretraining (a star)")
    parser.add_argument("--seed", type=int, default=0)
    if method_help:
        parser.add_argument("--method", action="append", default=[], metavar="NAME=OVERRIDES", help=method_help)
    parser.add_argument("--out", help="also write the numbers as JSON here")
    return parser


def named_overrides(parser, option: str, given: list[str]) -> dict[str, list[str]]:
    """{name: overrides} from NAME=OVERRIDES arguments (the overrides split as a shell splits them, so a quoted
    value keeps its spaces; {shape}, {colour}, {background} are filled in per concept)."""
    bad = [g for g in given if "=" not in g]
    if bad:
        parser.error(f"{option} {bad[0]!r}: give NAME=OVERRIDES, e.g. 'lr2=optimizer.lr=2e-3 train.max_steps=800'")
    return {name: shlex.split(overrides) for name, overrides in (g.split("=", 1) for g in given)}


if __name__ == "__main__":
    sys.exit(main())
