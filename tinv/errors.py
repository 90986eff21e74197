"""User-facing errors: one line that names the key, file or value and says how to fix it."""

import sys


class ConfigError(Exception):
    """Bad input from the user (config, files, environment). The CLI prints it as one line and exits with 2."""


class TrainingDiverged(Exception):
    """Steps were skipped for a non-finite loss, gradient or update until the run could not go on (too many in a row,
    or its last step). The last finite values are on disk; the CLI prints this as one line and exits with 1."""


def first_line(err: BaseException) -> str:
    """An exception's first line (or its type name), for one-line messages about a library's failure."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


USAGE = 2  # a command's exit status when it refused its input before doing anything (argparse's own)


def refuse(prog: str, err: BaseException) -> int:
    """A command's answer to bad input: `<prog>: error: <one line>` on stderr; returns the exit status."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    return USAGE
