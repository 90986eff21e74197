"""Keeping the work when a run fails: whatever goes wrong in the loop or its callbacks (a tracker, a full disk, out of
memory, a bug), the run ends with the embedding and the resumable state of its last complete step on disk.

A step is complete when its update and all its callbacks are done. `LastGood` copies the trained parts, optimizer,
schedule, counters and callbacks' state (to the CPU, so a failing GPU cannot take them along) before each step;
`keep_work` puts that copy back and writes the files and the state, in the run folder or, when that cannot take them,
in a folder under the system's temp folder. Resuming from it redoes the failed step exactly.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from .commandline import resume_argument
from .console import FILE_ONLY
from .errors import TrainingDiverged, first_line
from .state import put_back, trained_values

log = logging.getLogger(__name__)


class RunFailed(Exception):
    """The run failed; its last complete step was kept. The CLI prints this as one line and exits with 1."""

    def __init__(self, message: str, resume: str | None):
        super().__init__(message)
        self.resume = resume

    def __reduce__(self):  # a sweep's worker process sends it back pickled
        return type(self), (str(self), self.resume)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return copy.deepcopy(value)


class LastGood:
    """Everything a resume needs, as it was after the last complete step."""

    def __init__(self, run):
        self.step = run.step
        self.values = _to_cpu(trained_values(run))  # what the state file holds, as tinv.state gathers it
        self.state = replace(run.state)
        self.callbacks = _to_cpu(run.callbacks.state_dict())

    def restore(self, run) -> None:
        put_back(run, self.values)
        run.state = replace(self.state)
        run.callbacks.load_state_dict(self.callbacks)

    def put_back_trained(self, run) -> None:
        """Undo an update that left non-finite values: the parts and the optimizer's moments as before it; the
        counters and the schedule move on past the skipped step."""
        put_back(run, {**self.values, "lr_scheduler": run.lr_scheduler.state_dict()})


def trained_values_finite(run) -> bool:
    """Whether every trained value is a finite number (one device sync)."""
    checks = [torch.isfinite(p).all() for part in run.parts.values() for p in part.parameters()]
    return bool(torch.stack(checks).all()) if checks else True


def keep_work(run, last_good: LastGood | None, err: BaseException) -> RunFailed:
    """Put the last complete step back, write its files and state (the run folder, else the temp folder); the
    one-line error to raise. The traceback goes to the log (train.log)."""
    cause = f"{type(err).__name__}: {first_line(err)}"
    log.error("the run failed at step %d: %s", run.step + 1, cause, exc_info=err, extra=FILE_ONLY)
    if not run.is_main:  # the main process holds the same values and writes them, if it can still run
        return RunFailed(f"{cause} on process {run.accelerator.process_index} at step {run.step + 1}", None)
    if last_good is None:
        return RunFailed(f"{cause} (before the first step; nothing trained to keep)", None)
    where = f"at step {last_good.step + 1}" if last_good.step < run.max_steps else "after the last step"
    traceback.clear_frames(err.__traceback__)  # out of memory: let the failed step's tensors go first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        last_good.restore(run)
    except Exception as again:  # noqa: BLE001 - e.g. the device is gone: the files on disk are all there is
        return RunFailed(f"{cause} {where}; the trained values could not be read back ({first_line(again)}), so "
                         f"only files written earlier are in {run.run_dir}", None)
    folder, note = run.run_dir, ""
    try:
        files = _write(run)
    except Exception as first:  # noqa: BLE001 - whatever stopped the write, the temp folder is the next place
        note = f" (the run folder could not take them: {getattr(first, 'strerror', None) or first_line(first)})"
        try:
            folder = Path(tempfile.gettempdir()) / f"tinv-kept-{run.output_name}-{time.strftime('%Y%m%d-%H%M%S')}"
            original, run.run_dir = run.run_dir, folder
            folder.mkdir(parents=True, exist_ok=True)
            for name in (".hydra", "metrics.jsonl"):  # the overrides resume= reads; the history the objective reads
                if (original / name).is_dir():
                    shutil.copytree(original / name, folder / name, dirs_exist_ok=True)
                elif (original / name).is_file():
                    shutil.copy2(original / name, folder / name)
            files = _write(run)
        except Exception as second:  # noqa: BLE001
            return RunFailed(f"{cause} {where}; the embedding of step {last_good.step} could not be written "
                             f"anywhere ({first_line(first)}; {folder}: {first_line(second)})", None)
    resume = resume_argument(folder)
    run.tracker.set_summary(kept_step=last_good.step, resume=resume, **{k: str(p) for k, p in files.items()})
    names = ", ".join(p.name for p in files.values())
    if isinstance(err, TrainingDiverged):  # the settings are the cause: a resume would meet them again
        trained = last_good.step - last_good.state.bad_steps  # the skipped steps before it left the values as is
        return RunFailed(f"{first_line(err)}; kept the values of step {trained}, the last that trained: {names} "
                         f"and the state in {folder}{note}. Start a new run with the change", None)
    return RunFailed(f"{cause} {where}; kept step {last_good.step}: {names} and the state in {folder}{note} - "
                     f"continue with tinv-train {resume}", resume)


def _write(run) -> dict[str, Path]:
    files = run.write_files("", notify=False)  # no callbacks: one of them may be what failed
    run.save_state()
    return files
