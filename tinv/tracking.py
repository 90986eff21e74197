"""Run tracking: `metrics.jsonl` in the run dir always; wandb on top when `logger=wandb`.

metrics.jsonl is the record that tests, reports and offline users read: one JSON object per logged step. wandb
runs offline (no account, no network) unless an API key is configured or `logger.mode` says otherwise. The dashboard
is never fatal: if wandb fails (its service killed, a timeout, the network gone), training goes on with
metrics.jsonl, one warning says so, and the summary records the step where wandb stopped.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import socket
from pathlib import Path

from .atomic import write_text_atomic
from .errors import ConfigError, first_line

log = logging.getLogger(__name__)

WANDB_REACH_TIMEOUT_S = 5  # is wandb's server there at all (DNS and a TCP connection)
WANDB_INIT_TIMEOUT_S = 30  # then wandb.init's own wait (its default is 90 s)


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """metrics.jsonl's records, and how many lines were not whole records (cut short while being written, or
    damaged bytes)."""
    records, cut = [], 0
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line.decode("utf-8")) if line.strip() else None
        except ValueError:  # JSON or UTF-8
            record = None
            cut += 1
        if isinstance(record, dict):
            records.append(record)
    return records, cut


def read_summary(run_dir: Path) -> dict:
    """A run's summary.json, or {} when there is none or it cannot be read."""
    return summary_or_why(run_dir)[0] or {}


def summary_or_why(run_dir: Path) -> tuple[dict | None, str | None]:
    """(a run's summary.json, None), or (None, why it cannot be read: missing, cut short, damaged)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:
        return None, getattr(err, "strerror", None) or first_line(err)
    return (summary, None) if isinstance(summary, dict) else (None, f"a JSON {type(summary).__name__}, not an object")


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
        self.history: dict[str, list[tuple[int, object]]] = {}  # metric -> [(step, value)], resumed records included

    run_id: str | None = None

    def start(self, run_dir: Path, config: dict, enabled: bool = True, resume_id: str | None = None,
              resume_step: int = 0) -> None:
        """Open metrics.jsonl; a resumed run keeps the records up to its step and appends after them."""
        self.run_dir = Path(run_dir)
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from .sweeping.jobs import sweep_identity

        sweep = sweep_identity()
        if sweep:
            self.set_summary(sweep=sweep["sweep"], job_num=sweep["job_num"], overrides=sweep["overrides"])
        elif resume_step:  # a sweep's job resumed on its own stays that sweep's job in its report
            self.set_summary(**{k: v for k, v in read_summary(self.run_dir).items()
                                if k in ("sweep", "job_num", "overrides")})
        path = self.run_dir / "metrics.jsonl"
        kept = []
        if resume_step and path.is_file():
            records, cut = read_metrics(path)
            if cut:
                log.warning("%s: left out %d line(s) cut short (a full disk or a kill while writing)", path, cut)
            kept = [r for r in records if r.get("step", 0) <= resume_step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        for record in kept:
            self._remember(record.pop("step"), record)
        self._file = open(path, "a", encoding="utf-8")

    def _remember(self, step: int, record: dict) -> None:
        for key, value in record.items():
            self.history.setdefault(key, []).append((step, value))

    def log(self, metrics: dict, step: int) -> None:
        if self._file is None:
            return
        record = {k: _plain(v) for k, v in metrics.items()}
        self._remember(step, record)
        self._file.write(json.dumps({"step": step, **record}) + "\n")
        self._file.flush()

    @staticmethod
    def _online_or_offline(base_url: str) -> str:
        """Online when wandb's server answers a connection within seconds; without a network wandb would wait
        its init timeout on every run (each sweep job). Offline keeps everything for `wandb sync`."""
        from urllib.parse import urlsplit

        where = urlsplit(base_url)
        host, port = where.hostname or base_url, where.port or (80 if where.scheme == "http" else 443)
        try:
            socket.create_connection((host, port), timeout=WANDB_REACH_TIMEOUT_S).close()
        except OSError as err:
            log.warning("wandb: %s:%d cannot be reached (%s); logging offline instead (wandb sync uploads it "
                        "later)", host, port, getattr(err, "strerror", None) or first_line(err))
            return "offline"
        log.info("wandb: connecting to %s (giving up after %d s)", base_url, WANDB_INIT_TIMEOUT_S)
        return "online"

    def log_images(self, images: dict, step: int) -> None:
        """{key: [PIL images]}; the files themselves are written by the previewer."""

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        """A table for the dashboard; its numbers go to metrics.jsonl through log()."""

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


def summary_direction(metric: str) -> str | None:
    """Which value of a metric wandb's summary should keep: lower losses, higher accuracies and similarities."""
    if "loss" in metric:
        return "min"
    if any(word in metric for word in ("accuracy", "reconstruction", "score")):
        return "max"
    return None


class WandbTracker(Tracker):
    def __init__(self, project: str = "tinv", mode: str | None = None, entity: str | None = None,
                 name: str | None = None, group: str | None = None, tags: list[str] | None = None,
                 log_embedding: bool = False, **_ignored):
        super().__init__()
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("logger=wandb needs the wandb package: pip install wandb, or use logger=none") from None
        self.project, self.entity, self.name, self.group = project, entity, name, group
        self.tags = list(tags or [])
        self.log_embedding = log_embedding
        self.mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_configured() else "offline")
        if self.mode == "online" and not wandb_api_key_configured():
            raise ConfigError("logger.mode=online needs a wandb API key: run `wandb login` or set WANDB_API_KEY, "
                              "or use logger.mode=offline (and `wandb sync` later)")
        self.run = None
        self.defined: set[str] = set()
        self.step = 0  # the last step handed to wandb

    def _remote(self, what: str, call) -> None:
        """call() on wandb; if it fails, wandb is left out for the rest of the run."""
        if self.run is None:
            return
        try:
            call()
        except Exception as err:  # noqa: BLE001 - whatever the dashboard raises, training goes on
            self._lost(what, err)

    def _lost(self, what: str, err: Exception) -> None:
        import wandb

        self.run = None
        self.set_summary(wandb_stopped_at_step=self.step, wandb_error=f"{type(err).__name__}: {first_line(err)}")
        where = Path(self.run_dir) / "wandb" if self.run_dir else "the run folder"
        log.warning("wandb failed %s at step %d (%s: %s); training goes on without it (metrics.jsonl keeps every "
                    "metric; what wandb saved is in %s, for wandb sync)", what, self.step, type(err).__name__,
                    first_line(err), where)
        try:  # its exit hook would otherwise print the broken connection's traceback at exit
            wandb.teardown()
        except Exception:  # noqa: BLE001 - the service is gone; nothing more to close
            pass

    def start(self, run_dir: Path, config: dict, enabled: bool = True, resume_id: str | None = None,
              resume_step: int = 0) -> None:
        super().start(run_dir, config, enabled, resume_id, resume_step)
        if not enabled:
            return
        import wandb

        from .sweeping.jobs import sweep_identity

        sweep = sweep_identity()  # a multirun job: one wandb group per sweep, named runs, overrides in the config
        if sweep:
            config = {**config, "sweep": {k: sweep[k] for k in ("sweep", "sweep_dir", "job_num", "overrides")}}
        token = config.get("token", {}).get("string", "run")  # a single run: "<token>-<date>-<time>" of its folder
        name = self.name or sweep.get("job_name") or f"{token}-{Path(run_dir).parent.name}-{Path(run_dir).name}"
        self.step, self.run_id = resume_step, resume_id  # wandb failing to start keeps the id for the next resume
        if self.mode == "online":
            self.mode = self._online_or_offline(wandb.Settings().base_url)
        try:
            self.run = wandb.init(project=self.project, entity=self.entity, name=name,
                                  group=self.group or sweep.get("group"), tags=self.tags, config=config,
                                  dir=str(run_dir), mode=self.mode, id=resume_id,
                                  resume="allow" if resume_id else None,
                                  settings=wandb.Settings(silent=True, init_timeout=WANDB_INIT_TIMEOUT_S))
        except Exception as err:  # noqa: BLE001 - no dashboard is no reason not to train
            self._lost("to start", err)
            return
        self.run_id = self.run.id
        self.set_summary(wandb_id=self.run.id, wandb_name=self.run.name, wandb_group=self.run.group or "")
        log.info("wandb run %s (%s)", self.run.id, self.mode)

    def log_images(self, images: dict, step: int) -> None:
        import wandb

        self._remote("logging images", lambda: self.run.log(
            {k: [wandb.Image(im) for im in v] for k, v in images.items()}, step=step))

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        import wandb

        def cell(value):  # images (PIL) become wandb images
            return wandb.Image(value) if hasattr(value, "getpixel") else value

        self._remote("logging a table", lambda: self.run.log(
            {key: wandb.Table(columns=columns, data=[[cell(v) for v in row] for row in rows])}, step=step))

    def log(self, metrics: dict, step: int) -> None:
        super().log(metrics, step)
        self._remote("logging metrics", lambda: self._log_remote(metrics, step))

    def _log_remote(self, metrics: dict, step: int) -> None:
        self.step = step
        for key in metrics.keys() - self.defined:  # the summary keeps each metric's best value, not its last
            self.defined.add(key)
            if summary_direction(key):
                self.run.define_metric(key, summary=summary_direction(key))
        self.run.log({k: _plain(v) for k, v in metrics.items()}, step=step)

    def finish(self, ok: bool = True) -> None:
        self._remote("finishing", lambda: self._finish_remote(ok))
        self.run = None
        super().finish(ok)

    def _finish_remote(self, ok: bool) -> None:
        self.run.summary.update(self.summary)
        embedding = self.summary.get("embedding")
        if ok and self.log_embedding and embedding and Path(embedding).is_file():
            import wandb

            artifact = wandb.Artifact(f"embedding-{self.run.id}", type="embedding",
                                      metadata={k: v for k, v in self.summary.items() if k != "embedding"})
            artifact.add_file(embedding)
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if ok else 1)
