"""Callbacks: everything a run does around the loop, each a small object chosen in config (`callbacks.<name>`).

A callback is any object with some of these methods; a hook it does not define is skipped, so a user's own
callback is a plain class with just the hooks it needs, added with `+callbacks.mine._target_=mymodule.MyCallback`:

    on_dataset(dataset) -> dataset | None   before any model loads: check inputs, fail early; may return the
                                            training set to use instead (validation holds images out)
    on_start(run)                           after setup (and resume), before the first step
    on_step_end(run, step: StepOutput)      after every optimizer step, skipped ones included (step.skipped)
    on_log(run, metrics)                    whenever the run logs metrics
    on_files(run, files)                    after the parts wrote files ({summary key: path})
    on_end(run)                             after the last step
    next_steps(run) -> list[str]            commands worth running next, printed at the end of the run
    state_dict() / load_state_dict(state)   what a resumed run needs (kept in <run dir>/state)

`run` is the tinv.run.Run context: its public fields are all a callback needs. Callbacks run in config order.
This module holds the file-writing ones; validation and previews live beside what they compute.
"""

from __future__ import annotations

import math

from .choices import Mode
from .errors import ConfigError


def every(step: int, n: int) -> bool:
    """True on each n-th step; n = 0 (or less) is off."""
    return n > 0 and step % n == 0


class Callbacks:
    """A run's callbacks by name, in config order."""

    def __init__(self, items: dict[str, object] | None = None):
        self.items = dict(items or {})

    def __getitem__(self, name: str):
        return self.items[name]

    def __contains__(self, name: str) -> bool:
        return name in self.items

    def call(self, hook: str, *args) -> None:
        for callback in self.items.values():
            method = getattr(callback, hook, None)
            if method is not None:
                method(*args)

    def collect(self, hook: str, *args) -> list:
        """The lists a hook returns, joined."""
        return [item for callback in self.items.values() if hasattr(callback, hook)
                for item in getattr(callback, hook)(*args)]

    def on_dataset(self, dataset):
        for callback in self.items.values():
            method = getattr(callback, "on_dataset", None)
            replaced = method(dataset) if method is not None else None
            if replaced is not None:
                dataset = replaced
        return dataset

    def state_dict(self) -> dict:
        return {name: cb.state_dict() for name, cb in self.items.items() if hasattr(cb, "state_dict")}

    def load_state_dict(self, states: dict) -> None:
        for name, state in states.items():
            if name in self.items and hasattr(self.items[name], "load_state_dict"):
                self.items[name].load_state_dict(state)


class EmbeddingFiles:
    """The trained files (every part's) at the end, and `<name>-step<N>` every `every_n_steps` (save.every_n_steps)."""

    def __init__(self, every_n_steps: int = 0):
        self.every_n_steps = every_n_steps

    def on_step_end(self, run, step) -> None:
        if not step.skipped and every(step.step, self.every_n_steps):
            run.write_files(f"-step{step.step:08d}")

    def on_end(self, run) -> None:
        run.tracker.set_summary(**{key: str(path) for key, path in run.write_files("").items()})


class BestFiles:
    """`<name>-best` holds the files of the step where `monitor` was best so far (by default the validation loss,
    lowest); the summary keeps best_<monitor> and best_step up to date."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min"):
        if mode not in Mode.values():
            raise ConfigError(f"mode={mode!r}; use min (lower is better) or max")
        self.monitor, self.mode = monitor, mode
        self.best, self.step = (math.inf if mode == "min" else -math.inf), -1

    def on_start(self, run) -> None:
        if self.step >= 0:  # resumed
            self._summarise(run)

    def on_log(self, run, metrics: dict) -> None:
        value = metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if value < self.best if self.mode == "min" else value > self.best:
            self.best, self.step = value, run.step
            run.write_files("-best")
            self._summarise(run)

    def _summarise(self, run) -> None:
        run.tracker.set_summary(**{f"best_{self.monitor.replace('/', '_')}": self.best, "best_step": self.step})

    def state_dict(self) -> dict:
        return {"best": self.best, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.step = state["best"], state["step"]


class ResumableState:
    """<run dir>/state every `every_n_steps` (save.state_every_n_steps), skipped steps included, and whenever files
    are written (so a resume never redoes work the files already hold). The end of a run and a stop by Ctrl-C or
    SIGTERM write it whatever this says."""

    def __init__(self, every_n_steps: int = 0):
        self.every_n_steps = every_n_steps

    def on_step_end(self, run, step) -> None:
        if every(step.step, self.every_n_steps):
            run.save_state()

    def on_files(self, run, files: dict) -> None:
        run.save_state()
