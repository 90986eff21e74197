"""`tinv-report <multirun dir>`: one table of a sweep's jobs and a few plots, from the jobs' own files (what it
writes: tinv.sweeping.report)."""

from __future__ import annotations

import argparse
import sys

from ..errors import refuse
from ..sweeping.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinv-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun folder, e.g. outputs/multirun/2026-11-25/17-52-22-123456")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.sweep_dir)
    except FileNotFoundError as err:
        return refuse("tinv-report", err)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
