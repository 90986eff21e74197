"""The resumable state of a run: small (the trained parts, optimizer, schedule, counters, callbacks' own state),
never the frozen models.

Written atomically as <run dir>/state/ (a new folder is filled, then swapped in), so a crash at any moment leaves
either the previous state or the new one. Randomness is derived from (seed, epoch, position, micro-step), so these
counters are all a resumed run needs to continue exactly where it stopped.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import ConfigError, first_line
from .ownership import holder

STATE_DIR = "state"


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches done (seeds each one's noise)
    epoch: int = 0
    position: int = 0  # batches of `epoch` already used
    bad_steps: int = 0
    bad_steps_total: int = 0
    tracker_id: str | None = None
    elapsed_s: float = 0.0  # wall time of the run's earlier invocations (a resumed run adds its own)


def save_state(run) -> Path:
    target = Path(run.run_dir) / STATE_DIR
    staging = Path(tempfile.mkdtemp(prefix=".state-", dir=run.run_dir))
    try:
        _save(trained_values(run), staging / "state.pt")
        (staging / "state.json").write_text(json.dumps({**asdict(run.state), "elapsed_s": round(run.elapsed_s(), 2),
                                                         "state_pt_sha256": _sha256(staging / "state.pt"),
                                                         "callbacks": run.callbacks.state_dict(),
                                                         "token": run.token.string,
                                                         "num_vectors": run.token.num_vectors,
                                                         "base_model": run.backbone.source,
                                                         "family": run.backbone.family}, indent=2))
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=".state-old-", dir=run.run_dir))
            os.replace(target, old / STATE_DIR)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def trained_values(run) -> dict:
    """What a resume needs besides the counters: the parts, the optimizer, the schedule and the grad scaler."""
    scaler = run.accelerator.scaler
    return {"parts": {name: part.state_dict() for name, part in run.parts.items()},
            "optimizer": run.optimizer.state_dict(), "lr_scheduler": run.lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else None}


def put_back(run, values: dict) -> None:
    """trained_values() into `run`."""
    for name, state in values["parts"].items():
        run.parts[name].load_state_dict(state)
    run.optimizer.load_state_dict(values["optimizer"])
    run.lr_scheduler.load_state_dict(values["lr_scheduler"])
    if values.get("scaler") and run.accelerator.scaler:
        run.accelerator.scaler.load_state_dict(values["scaler"])


def _save(data: dict, path: Path) -> None:
    """torch.save, with a failed write (torch says RuntimeError) raised as the OSError it is."""
    try:
        torch.save(data, path)
    except RuntimeError as err:
        if "write" not in str(err):
            raise
        free = shutil.disk_usage(path.parent).free
        raise OSError(errno.ENOSPC if free < 2**20 else errno.EIO, f"{path} could not be written ({free} bytes "
                      f"free; {first_line(err)})") from err


def find_state(resume: str, fallback_run_dir: Path) -> tuple[Path, Path]:
    """(run dir, state dir) for `resume=<run dir>|<state dir>|latest`."""
    if resume == "latest":  # the newest single run's state (a sweep's jobs are resumed by their folder)
        root = Path("outputs")
        candidates = [p for p in root.rglob(f"{STATE_DIR}/state.json")] if root.is_dir() else []
        candidates = [p for p in candidates if p.parent.parent.resolve() != Path(fallback_run_dir).resolve()
                      and "multirun" not in p.relative_to(root).parts]
        live = [p for p in candidates if holder(p.parent.parent)]  # still training: not for a resume to take
        candidates = [p for p in candidates if p not in live]
        if not candidates:
            raise ConfigError(f"resume=latest: no saved state of a single run under {root.resolve()}"
                              f"{f' but of {len(live)} still training' if live else ''}; give the run folder instead")
        state = max(candidates, key=lambda p: p.stat().st_mtime).parent
    else:
        path = Path(resume).expanduser()
        state = path if (path / "state.json").is_file() else path / STATE_DIR
        if not (state / "state.json").is_file():  # killed between the two renames of a save: the previous state
            older = sorted(path.glob(f".state-old-*/{STATE_DIR}/state.json"), key=lambda p: p.stat().st_mtime)
            state = older[-1].parent if older else state
        if not (state / "state.json").is_file():
            raise ConfigError(f"resume={resume!r}: no saved state there (expected {state / 'state.json'}); "
                              "runs save one with save.state_every_n_steps or when stopped by Ctrl-C/SIGTERM")
    state = state.resolve()
    return state.parent, state


def _broken(state_dir: Path, file: str, why: str) -> ConfigError:
    run_dir = state_dir.parent
    embeddings = [p for p in run_dir.glob("*.safetensors") if not re.search(r"-(step\d+|best|lora|bundle)$", p.stem)]
    newest = max(embeddings, key=lambda p: p.stat().st_mtime, default=None)
    start = f" (token.weights={newest} starts it from the vectors the run saved last)" if newest else ""
    return ConfigError(f"resume: {state_dir / file} is broken ({why}), so the run cannot go on from it; start a new "
                       f"run{start}")


def read_state_meta(state_dir: Path) -> dict:
    """state.json, checked: its counters and the token it trained; one line naming it when broken."""
    try:
        meta = json.loads((state_dir / "state.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:
        raise _broken(state_dir, "state.json", first_line(err)) from None
    if not isinstance(meta, dict):
        raise _broken(state_dir, "state.json", f"a JSON {type(meta).__name__}, not an object")
    wrong = [k for k, kind in (("step", int), ("micro_step", int), ("token", str), ("num_vectors", int))
             if not isinstance(meta.get(k), kind) or isinstance(meta.get(k), bool)]
    if wrong:
        raise _broken(state_dir, "state.json", f"{', '.join(wrong)} missing or of the wrong type")
    return meta


def check_resumable(state_dir: Path, family: str | None = None) -> None:
    """Before anything loads or is written: state.json is whole, state.pt holds the bytes written, and a state
    trained on another model family cannot go on here (states from before the family was recorded are checked when
    they load)."""
    meta = read_state_meta(state_dir)
    digest = meta.get("state_pt_sha256")  # states written before it was recorded load unchecked
    if digest is not None and (state_dir / "state.pt").is_file() and _sha256(state_dir / "state.pt") != digest:
        raise _broken(state_dir, "state.pt", "its bytes are not those written: cut short, or damaged on disk or in a "
                                             "copy")
    if family and meta.get("family") and meta["family"] != family:
        raise ConfigError(f"resume: the state in {state_dir} was trained on a {meta['family']} model "
                          f"({meta.get('base_model')}), not {family}; resume with the run's own model")


def saved_step(state_dir: Path) -> int:
    """The optimizer steps a saved state holds, read without loading anything else."""
    return read_state_meta(state_dir)["step"]


def load_state(state_dir: Path, run) -> RunState:
    """Put the saved parts, optimizer, schedule, scaler and callbacks' state into `run`; returns the counters."""
    meta = read_state_meta(state_dir)
    if meta["token"] != run.token.string or meta["num_vectors"] != run.token.num_vectors:
        raise ConfigError(f"resume: the state in {state_dir} is for token {meta['token']!r} with "
                          f"{meta['num_vectors']} vectors, not {run.token.string!r} with "
                          f"{run.token.num_vectors}; resume with the run's own settings")
    try:  # its bytes were checked before (check_resumable); a state from before the checksum may still be broken
        data = torch.load(state_dir / "state.pt", map_location="cpu", weights_only=True)
        parts = data["parts"] if "parts" in data else {"vectors": data["vectors"]}  # states before parts existed
    except Exception as err:  # noqa: BLE001 - cut short, flipped bytes, not a state: the same remedy
        raise _broken(state_dir, "state.pt", f"cut short or damaged: torch.load raised {type(err).__name__}") from None
    if set(parts) != set(run.parts):
        raise ConfigError(f"resume: the state in {state_dir} trains {', '.join(sorted(parts))}, this run "
                          f"{', '.join(sorted(run.parts))}; resume with the run's own method and parts")
    try:
        put_back(run, {**data, "parts": parts})
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as err:  # another model's shapes, keys
        raise ConfigError(f"resume: the state in {state_dir} does not fit this run ({type(err).__name__}: "
                          f"{first_line(err)}); resume with the run's own model and settings") from None
    if not all(torch.isfinite(p).all() for part in run.parts.values() for p in part.parameters()):
        raise _broken(state_dir, "state.pt", "its trained values hold NaN or inf")
    callbacks = meta.get("callbacks")
    if callbacks is None and meta.get("best_step", -1) >= 0:  # the best step, as states before callbacks kept it
        callbacks = {"best": {"best": meta["best_val_loss"], "step": meta["best_step"]}}
    run.callbacks.load_state_dict(callbacks or {})
    fields = RunState.__dataclass_fields__
    return RunState(**{k: v for k, v in meta.items() if k in fields})
