"""Run tracking: `metrics.jsonl` in the run dir always; wandb on top when `logger=wandb`.

metrics.jsonl is the record that tests, reports and offline users read: one JSON object per logged step. wandb
runs offline (no account, no network) unless an API key is configured or `logger.mode` says otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from pathlib import Path

from .atomic import write_text_atomic
from .errors import ConfigError

log = logging.getLogger(__name__)


def _plain(value):
    """JSON-safe scalar: tensors to floats, non-finite floats to null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Tracker:
    """Writes metrics.jsonl and summary.json in the run dir. Subclasses add a remote dashboard."""

    def __init__(self, **_ignored):
        self.run_dir: Path | None = None
        self._file = None
        self.summary: dict = {}

    def start(self, run_dir: Path, config: dict, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.run_dir / "metrics.jsonl", "w", encoding="utf-8")

    def log(self, metrics: dict, step: int) -> None:
        if self._file is None:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def set_summary(self, **values) -> None:
        self.summary.update({k: _plain(v) for k, v in values.items()})

    def finish(self, ok: bool = True) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            write_text_atomic(self.run_dir / "summary.json", json.dumps({"ok": ok, **self.summary}, indent=2))


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbTracker(Tracker):
    def __init__(self, project: str = "tinv", mode: str | None = None, entity: str | None = None,
                 name: str | None = None, group: str | None = None, tags: list[str] | None = None, **_ignored):
        super().__init__()
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("logger=wandb needs the wandb package: pip install wandb, or use logger=none") from None
        self.project, self.entity, self.name, self.group = project, entity, name, group
        self.tags = list(tags or [])
        self.mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_configured() else "offline")
        if self.mode == "online" and not wandb_api_key_configured():
            raise ConfigError("logger.mode=online needs a wandb API key: run `wandb login` or set WANDB_API_KEY, "
                              "or use logger.mode=offline (and `wandb sync` later)")
        self.run = None

    def start(self, run_dir: Path, config: dict, enabled: bool = True) -> None:
        super().start(run_dir, config, enabled)
        if not enabled:
            return
        import wandb

        self.run = wandb.init(project=self.project, entity=self.entity, name=self.name, group=self.group,
                              tags=self.tags, config=config, dir=str(run_dir), mode=self.mode)
        log.info("wandb run %s (%s)", self.run.id, self.mode)

    def log(self, metrics: dict, step: int) -> None:
        super().log(metrics, step)
        if self.run is not None:
            self.run.log({k: _plain(v) for k, v in metrics.items()}, step=step)

    def finish(self, ok: bool = True) -> None:
        if self.run is not None:
            self.run.summary.update(self.summary)
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
        super().finish(ok)
