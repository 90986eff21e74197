"""What tinv's commands print: tinv's own messages on the console; the libraries' warnings and notices in the run's
log file (train.log) only, and no download or weight-loading progress bars.

`quiet_libraries()` runs before transformers or diffusers are first imported (their import-time notices, such as
the torchvision one, are never shown); `route_library_logs()` then sends what they log to the root logger, where
Hydra's file handler keeps it and `ConsoleFilter` keeps it off the console.
"""

from __future__ import annotations

import logging
import os

LIBRARIES = ("transformers", "diffusers", "huggingface_hub")
OWN = ("tinv", "hydra", "__main__")  # loggers whose INFO belongs on the console


def quiet_libraries() -> None:
    for name in LIBRARIES:
        os.environ.setdefault(f"{name.upper()}_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.captureWarnings(True)  # Python warnings become log records (py.warnings), filtered like the rest
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Optuna's database setup: "setup plugin ..." x7


def route_library_logs(to_log_file: bool = True) -> None:
    """No progress bars from the libraries; with `to_log_file` (a Hydra job, which keeps train.log) their warnings
    propagate to the root logger instead of printing, otherwise only their errors print."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for lib in (transformers_logging, diffusers_logging):
        lib.disable_progress_bar()
        if to_log_file:
            lib.disable_default_handler()
            lib.enable_propagation()
            lib.set_verbosity_warning()
        else:
            lib.set_verbosity_error()
    if not to_log_file:
        logging.getLogger("py.warnings").addHandler(logging.NullHandler())
        logging.getLogger("py.warnings").propagate = False


FILE_ONLY = {"file_only": True}  # log(..., extra=FILE_ONLY): train.log only, e.g. a traceback the console sums up


class ConsoleFilter(logging.Filter):
    """tinv's and Hydra's records, and anyone's errors; not those marked for the log file only (FILE_ONLY)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        return record.name.split(".")[0] in OWN or record.levelno >= logging.ERROR


class ConsoleFormatter(logging.Formatter):
    """Plain messages; warnings and errors say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def quiet_command() -> None:
    """For commands without a log file (tinv-eval, tinv-generate, tinv-toy, tinv-tiny): no library notices or bars;
    their errors still print."""
    quiet_libraries()
    route_library_logs(to_log_file=False)


def number(value) -> str:
    """Scores and losses with four decimals (1.0000 beside 0.9062, not 1 beside 0.982791); very small or large
    values in scientific notation."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.3e}"
