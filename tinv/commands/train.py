"""`tinv-train` (also `python -m tinv`): compose the Hydra config, build the run from it (tinv.train), train.

    tinv-train                                   # built-in toy model and demo images, offline
    tinv-train model=sdxl data=folder data.image_dir=imgs token.string=mychar token.init_word=girl
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..atomic import write_text_atomic
from ..commandline import CONF, claim_run_folder, command_line, import_from_cwd, quiet_launcher_schema_note
from ..console import FILE_ONLY, number, route_library_logs
from ..errors import USAGE, ConfigError, TrainingDiverged, refuse
from ..objective import sweep_value
from ..ownership import LOCK_NAME, hold, let_go
from ..rescue import RunFailed
from ..state import find_state
from ..sweeping.jobs import reuse, same_as_earlier_job, sweep_identity
from ..tracking import read_summary
from ..train import one_line, run
from ..trainer import Interrupted, TrainResult

log = logging.getLogger("tinv")


def outcome(result: TrainResult, cfg: DictConfig) -> str:
    """What a finished run says: its numbers, its files, and what to do next."""
    s, run = result.summary, result.run
    better = "higher" if s.get("objective_mode") == "max" else "lower"
    resumed = f" ({s['step'] - s['resumed_at_step']} of them after resuming)" if "resumed_at_step" in s else ""
    lines = [f"tinv-train: done, {s['step']} steps{resumed} in {s['wall_s']:.0f} s; {s['objective_name']} = "
             f"{number(s['objective'])} ({better} is better)"]
    scores = {k.split("/", 1)[1]: v[-1][1] for k, v in run.tracker.history.items()
              if k.startswith("val/") and isinstance(v[-1][1], float)}
    if scores:
        lines.append("  scores     " + ", ".join(f"{k} {number(v)}" for k, v in scores.items()) + f" (step {s['step']})")
    if s.get("scoring_s"):
        lines.append(f"  scoring    {s['scoring_s']:.0f} s, {s['scoring_s'] / max(s['wall_s'], 1e-9):.0%} of the run")
    files = [("embedding", s.get("embedding")), ("lora", s.get("lora")), ("bundle", s.get("lora_bundle"))]
    best = sorted(run.run_dir.glob(f"{run.output_name}-best*.*"))
    if best and "best_step" in s:
        files.append(("best", f"{', '.join(p.name for p in best)} (step {s['best_step']})"))
    files += [("samples", s.get("concept_samples") or s.get("fidelity_samples")), ("previews", run.run_dir / "samples"
                                                                  if any(run.run_dir.glob("samples/step-*")) else None),
              ("run folder", f"{run.run_dir} (metrics.jsonl, summary.json, train.log, state/)")]
    lines += [f"  {name:<10} {value}" for name, value in files if value]
    if s.get("embedding"):
        name = run.output_name  # one word everywhere: the file's name, its header, the prompts below
        lora = f" --lora {shlex.quote(s['lora'])}" if s.get("lora") else ""
        generate = (f"tinv-generate {shlex.quote(s['embedding'])} {shlex.quote(f'a photo of {name}')}{lora} "
                    f"--sampler {cfg.sample.sampler} --steps {cfg.sample.steps} --guidance {cfg.sample.guidance_scale}")
        steps = [generate, *run.callbacks.collect("next_steps", run),
                 f"A1111/Forge: copy it into embeddings/ and write {name} in a prompt; ComfyUI: models/embeddings/, "
                 f"embedding:{name}; diffusers: load_textual_inversion (docs/formats.md)"]
        if s.get("lora"):
            lora_name = Path(s["lora"]).stem
            steps.append(f"the LoRA: A1111/Forge models/Lora/ and <lora:{lora_name}:1> in the prompt (or the bundle "
                         f"alone there: LoRA and embedding in one file); ComfyUI: models/loras/ with a LoraLoader; "
                         f"diffusers: load_lora_weights")
        lines += ["  next       " + steps[0]] + [f"             {line}" for line in steps[1:]]
    if getattr(run.tracker, "mode", None) == "offline":
        wandb_dir = shlex.quote(str(run.run_dir / "wandb"))
        lines.append(f"  wandb      offline; upload with: wandb sync {wandb_dir}/offline-run-*")
    return "\n".join(lines)


def announce(result: TrainResult | None, cfg: DictConfig) -> None:
    """The end of a run on the console: a sweep's job says one line (the sweep's end names the best job), a single
    run its numbers, files and what to do next."""
    if result is None or not result.run.is_main:
        return
    s, sweep = result.summary, sweep_identity()
    print(f"tinv-train: job {sweep['job_num']} done, {s['objective_name']} = {number(s['objective'])}, "
          f"{s.get('embedding')}" if sweep else outcome(result, cfg), flush=True)


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Returns the run's objective to the sweeper (objective.*: the best val/loss by default, lower is better)."""
    route_library_logs()
    logging.raiseExceptions = False  # a full disk: train.log stops quietly; the run's last line says what happened
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    in_sweep = bool(sweep_identity())
    try:  # the job's folder is this process's (tinv.ownership) until its files are closed
        hold(job_dir, "the sweep job's folder" if in_sweep else "hydra.run.dir")
    except ConfigError as err:  # another process's folder: say so and touch nothing in it
        status = refuse("tinv-train", err)
        if in_sweep:
            raise
        sys.exit(status)
    try:
        if in_sweep and not cfg.resume and has_state(job_dir):
            return go_on(cfg, job_dir)
        earlier = same_as_earlier_job(cfg, job_dir) if in_sweep and not cfg.resume else None
        if earlier is not None:  # e.g. sweep=pivotal's method=ti jobs at other LoRA ranks
            return sweep_value(reuse(earlier, job_dir), cfg.objective.mode)
        result = run(cfg)
        announce(result, cfg)
        return sweep_value(result.summary, cfg.objective.mode) if result else None
    except (ConfigError, Interrupted, TrainingDiverged, RunFailed, OSError) as err:
        message = f"tinv-train: {'' if isinstance(err, Interrupted) else 'error: '}{one_line(err)}"
        if isinstance(err, OSError):  # a file that cannot be read or written, outside the loop: name it
            log.error("the traceback of %s", one_line(err), exc_info=err, extra=FILE_ONLY)
        print(message, file=sys.stderr)
        if in_sweep:  # record the failure in the job's folder and let the sweep go on with the other jobs
            record_failure(job_dir, one_line(err))
            if isinstance(err, Interrupted) and jobs_run_in_this_process():  # Ctrl-C stops the sweep, not a job
                sweep_dir = shlex.quote(str(HydraConfig.get().sweep.dir))
                print(f"tinv-train: the sweep stops; the same command with hydra.sweep.dir={sweep_dir} resumes it",
                      file=sys.stderr)
                sys.exit(128 + err.signum)
            raise
        if isinstance(err, Interrupted):
            sys.exit(128 + err.signum)
        if isinstance(err, (TrainingDiverged, RunFailed, OSError)):
            sys.exit(1)
        _discard_untouched_run_dir(job_dir)
        sys.exit(USAGE)
    except Exception as err:
        if in_sweep:
            record_failure(job_dir, repr(err))
        raise
    finally:
        let_go(job_dir)


def jobs_run_in_this_process() -> bool:
    """Hydra's basic launcher runs a sweep's jobs one after another in the sweep's own process (a signal reaches the
    job and the sweep alike); the other launchers give each job a process of its own."""
    return HydraConfig.get().runtime.choices.get("hydra/launcher") == "basic"


def has_state(run_dir: Path) -> bool:
    try:
        find_state(str(run_dir), run_dir)
    except ConfigError:
        return False
    return True


def go_on(cfg: DictConfig, job_dir: Path) -> float | None:
    """A sweep job whose folder holds its own saved state: SLURM requeued it (its time limit, a preemption), or the
    sweep was started again in its folder. It resumes from that state; a finished one gives its result again."""
    print(f"tinv-train: job {sweep_identity()['job_num']} resumes from its state in {job_dir}", flush=True)
    cfg.resume = str(job_dir)
    result = run(cfg)
    announce(result, cfg)
    summary = result.summary if result else json.loads((job_dir / "summary.json").read_text())
    return sweep_value(summary, cfg.objective.mode)


def record_failure(job_dir: Path, error: str) -> None:
    """A failed sweep job's summary.json: the run's own (what it kept, how to resume) with ok false and the error."""
    path = job_dir / "summary.json"
    try:
        write_text_atomic(path, json.dumps({**read_summary(job_dir), "ok": False, "error": error}, indent=2))
    except OSError as err:
        log.warning("%s could not be written: %s", path, err)


def _discard_untouched_run_dir(run_dir: Path) -> None:
    """A run refused at start leaves nothing behind: remove Hydra's own files if nothing else was written."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log", LOCK_NAME}:
        logging.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
        chosen = any(o.startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra)
        if not chosen and run_dir.parent.is_dir() and not any(run_dir.parent.iterdir()):
            run_dir.parent.rmdir()  # outputs/<date>/, made for this run alone


def main() -> None:
    """Console entry. Under torchrun / accelerate launch only rank 0 writes the run dir; the other ranks get a
    throw-away Hydra dir (they save nothing), so no two processes race for one timestamped folder."""
    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += [f"hydra.run.dir={tempfile.mkdtemp(prefix='tinv-rank-')}", "hydra.output_subdir=null"]
    import_from_cwd()
    quiet_launcher_schema_note()
    sys.argv[1:] = command_line("tinv-train", sys.argv[1:])
    try:
        claim_run_folder(sys.argv[1:])
    except ConfigError as err:
        sys.exit(refuse("tinv-train", err))
    try:
        hydra_main()
    except KeyboardInterrupt:  # a sweep stopped while it waits for its jobs (a single run saves and says so itself)
        print("tinv-train: stopped", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
