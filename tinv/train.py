"""`tinv-train`: compose the Hydra config, build the run from it, train.

    tinv-train                                   # built-in toy model and demo images, offline
    tinv-train model=sdxl data=folder data.image_dir=imgs token.string=mychar token.init_word=girl

`prepare` builds every piece from the config and checks it while nothing heavy has loaded (a bad key, file or
value costs seconds); `tinv.run.open_run` loads the models and places everything; `Trainer.fit` trains.
"""

from __future__ import annotations

import json
import logging
import shlex
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from .atomic import write_text_atomic
from .callbacks import Callbacks
from .commandline import resume_argument
from .console import FILE_ONLY, quiet_libraries, route_library_logs
from .config import LOADING_KEYS, apply_deprecated, check_values
from .data import PromptBuilder
from .embedding import ConceptToken
from .errors import ConfigError, TrainingDiverged
from .losses import DiffusionLoss
from .objective import sweep_value
from .report import number
from .resources import env_threads
from .optim import check_optimization
from .ownership import LOCK_NAME, hold, holder, holds_a_run, in_use, let_go, owned
from .run import Job, open_run
from .state import check_resumable, find_state, saved_step
from .sweeping import sweep_identity
from .rescue import RunFailed
from .tracking import read_summary
from .trainer import Interrupted, Trainer, TrainResult

log = logging.getLogger("tinv")
quiet_libraries()  # transformers and diffusers load later, when the model does


def build(node, label: str | None = None, **kwargs):
    """hydra.utils.instantiate, letting our one-line ConfigError through Hydra's wrapper exception. With a `label`
    (a user-configurable node such as callbacks.previews), any failure to build it is one line naming it."""
    if label and "_target_" in node:
        try:
            get_method(node["_target_"])
        except Exception as err:  # noqa: BLE001 - any import failure of a user's target is a config error
            raise ConfigError(f"{label}._target_={node['_target_']!r} cannot be imported ({one_line(err)}); your own "
                              "modules import from the folder you run in") from None
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{label}: {cause}" if label else str(cause)) from None
        if label:  # Hydra's text spans lines ("Error loading 'x':" then the ImportError): keep it, on one line
            raise ConfigError(f"{label}: {one_line(err)}") from None
        raise


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def describe_samples(dataset, token, backbone, count: int = 8) -> str:
    """`data.debug=true`: what the first samples become, down to token ids (new ids marked with *)."""
    lines = [f"{len(dataset.samples)} images, {len(dataset)} samples per epoch, "
             f"{len(dataset.specs)} dataset(s), {len(dataset.subsets)} subset(s)"]
    for position in range(min(count, len(dataset))):
        item = dataset[position]
        sample = dataset.samples[item["sample"]]
        prompt = token.expand(item["prompt"])
        lines.append(f"[{position}] {sample.path}  size {sample.size[0]}x{sample.size[1]} -> bucket "
                     f"{sample.bucket[0]}x{sample.bucket[1]}  crop {item['crop_top_left']}  flip {item['flip']}")
        lines.append(f"    caption: {item['caption']!r}")
        lines.append(f"    prompt:  {prompt!r}")
        for enc in backbone.encoders:
            ids = enc.tokenizer(prompt, add_special_tokens=False).input_ids
            first = token.first_ids[enc.key]
            lines.append(f"    {enc.key} ids: " + " ".join(f"{i}*" if i >= first else str(i) for i in ids))
    return "\n".join(lines)


def prepare(cfg: DictConfig, run_dir: str | Path | None = None, tracker=None) -> Job | None:
    """Every piece of the run, built from the config and checked before any weights load; None when there is
    nothing to train (data.debug, which only prints; a resumed run that is already complete). `tracker` replaces
    the configured logger (tinv-bench passes its own)."""
    apply_deprecated(cfg)
    check_values(cfg)
    env_threads()  # a bad TINV_THREADS is said before anything loads
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    if cfg.resume:
        state_dir = find_state(cfg.resume, run_dir)[1]
        check_resumable(state_dir, cfg.model.family)
        done = saved_step(state_dir)
        if done >= cfg.train.max_steps:
            print(f"tinv-train: {state_dir.parent} is complete at step {done} (train.max_steps={cfg.train.max_steps});"
                  f" nothing to do - raise train.max_steps to train further")
            return None
    check_optimization(cfg.optimizer, cfg.scheduler, cfg.train.max_steps, choices)

    token = ConceptToken(cfg.token.string, cfg.token.num_vectors, cfg.token.init_word, cfg.token.weights,
                         cfg.token.norm, cfg.token.norm_weight, cfg.token.train_encoders, cfg.token.init_from)
    prompts = PromptBuilder(cfg.template.kind, token, cfg.template.templates, cfg.data.missing_token)
    data_keys = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in LOADING_KEYS}
    dataset = build(data_keys, family=cfg.model.family, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                    prompts=prompts)
    backbone = build(cfg.model)  # tokenizers only; weights load in open_run
    token.add_to_tokenizers(backbone.encoders)
    token.check_start(backbone.encoders)  # token.weights against the encoders' keys and widths, before loading
    if cfg.data.debug:
        print(describe_samples(dataset, token, backbone))
        return None
    callbacks = Callbacks({name: build(node, f"callbacks.{name}") for name, node in cfg.callbacks.items()})
    dataset = callbacks.on_dataset(dataset)
    parts = {name: build(node, f"parts.{name}") for name, node in cfg.parts.items()}
    if not parts:
        raise ConfigError("parts is empty: nothing would train; keep parts.vectors (conf/train.yaml)")
    train = cfg.train
    trainer = Trainer(DiffusionLoss(train.noise_offset, train.min_snr_gamma, train.min_timestep, train.max_timestep),
                      max_grad_norm=train.max_grad_norm, log_every_n_steps=train.log_every_n_steps,
                      max_bad_steps=train.max_bad_steps, objective=dict(cfg.objective))
    return Job(cfg=cfg, run_dir=run_dir, backbone=backbone, token=token, dataset=dataset, parts=parts,
               callbacks=callbacks, tracker=tracker or build(cfg.logger), trainer=trainer,
               make_optimizer=build(cfg.optimizer, _convert_="all"), make_lr_scheduler=build(cfg.scheduler))


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> TrainResult | None:
    """Train one embedding (None when there is nothing to train), holding the run's folder (tinv.ownership)."""
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    job = prepare(cfg, run_dir)  # checks everything and writes nothing
    if job is None:
        return None
    folder = find_state(cfg.resume, run_dir)[0] if cfg.resume else run_dir
    with owned(folder, "resume" if cfg.resume else "hydra.run.dir"):
        job.tracker.set_summary(settings=settings_digest(cfg))
        opened = open_run(job)
        if cfg.resume:  # the state loaded into this run: the resume is accepted
            record_resumed_command(cfg, folder)
        result = job.trainer.fit(opened)
    if result.run.is_main:
        s = result.summary
        sweep = sweep_identity()  # a sweep's job says one line; the sweep's end names the best one
        print(f"tinv-train: job {sweep['job_num']} done, {s['objective_name']} = {number(s['objective'])}, "
              f"{s.get('embedding')}" if sweep else outcome(result, cfg), flush=True)
    return result


def record_resumed_command(cfg: DictConfig, folder: Path) -> None:
    """A resume's Hydra record (.hydra/config.yaml, overrides.yaml), written once the command is accepted: Hydra
    itself is told not to write it at start (tinv.commandline.resumed_args), so a resume that fails leaves the run's
    record as it was and the plain resume= still works."""
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
        return
    record = folder / ".hydra"
    record.mkdir(exist_ok=True)
    write_text_atomic(record / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text_atomic(record / "overrides.yaml", OmegaConf.to_yaml(list(HydraConfig.get().overrides.task)))


def settings_digest(cfg: DictConfig) -> str:
    """What a run trains, as a digest: the resolved config without the keys its parts do not read (lora.* under
    method=ti), so two sweep jobs that differ only there have the same digest."""
    import hashlib

    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if "lora" not in plain.get("parts", {}):
        plain.pop("lora", None)
        for key in ("lora_format", "lora_bundle"):
            plain.get("save", {}).pop(key, None)
    plain.pop("resume", None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def same_as_earlier_job(cfg: DictConfig, job_dir: Path) -> dict | None:
    """In a sweep: the summary of a finished earlier job whose run this one would repeat exactly, else None."""
    sweep = sweep_identity()
    digest = settings_digest(cfg)
    for summary_file in sorted(Path(sweep["sweep_dir"]).glob("*/summary.json")):
        if summary_file.parent.resolve() == job_dir.resolve():
            continue
        summary = json.loads(summary_file.read_text())
        if summary.get("ok") and summary.get("settings") == digest:
            return {**summary, "same_as": summary_file.parent.name}
    return None


def reuse(earlier: dict, job_dir: Path) -> dict:
    """This job's summary.json: the earlier job's result under this job's number and overrides."""
    sweep = sweep_identity()
    summary = {**earlier, "job_num": sweep["job_num"], "overrides": sweep["overrides"]}
    job_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(job_dir / "summary.json", json.dumps(summary, indent=2))
    print(f"tinv-train: job {sweep['job_num']} would repeat job {earlier['same_as']} exactly (the keys it varies "
          f"are not read by this run's parts); its result: {earlier['objective_name']} = "
          f"{number(earlier['objective'])}", flush=True)
    return summary


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
    files = [("embedding", s.get("embedding")), ("lora", s.get("lora")), ("bundle", s.get("lora_bundle"))]
    best = sorted(run.run_dir.glob(f"{run.output_name}-best*.*"))
    if best and "best_step" in s:
        files.append(("best", f"{', '.join(p.name for p in best)} (step {s['best_step']})"))
    files += [("samples", s.get("concept_samples")), ("previews", run.run_dir / "samples"
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
                 f"embedding:{name}; diffusers: load_textual_inversion (README: Using the embedding)"]
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Returns the run's objective to the sweeper (objective.*: the best val/loss by default, lower is better)."""
    route_library_logs()
    logging.raiseExceptions = False  # a full disk: train.log stops quietly; the run's last line says what happened
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    in_sweep = bool(sweep_identity())
    try:  # the job's folder is this process's (tinv.ownership) until its files are closed
        hold(job_dir, "the sweep job's folder" if in_sweep else "hydra.run.dir")
    except ConfigError as err:  # another process's folder: say so and touch nothing in it
        print(f"tinv-train: error: {err}", file=sys.stderr)
        if in_sweep:
            raise
        sys.exit(2)
    try:
        if in_sweep and not cfg.resume and has_state(job_dir):
            return go_on(cfg, job_dir)
        earlier = same_as_earlier_job(cfg, job_dir) if in_sweep and not cfg.resume else None
        if earlier is not None:  # e.g. sweep=pivotal's method=ti jobs at other LoRA ranks
            return sweep_value(reuse(earlier, job_dir), cfg.objective.mode)
        result = run(cfg)
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
        sys.exit(2)
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
    import shutil

    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log", LOCK_NAME}:
        logging.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
        chosen = any(o.startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra)
        if not chosen and run_dir.parent.is_dir() and not any(run_dir.parent.iterdir()):
            run_dir.parent.rmdir()  # outputs/<date>/, made for this run alone


def main() -> None:
    """Console entry. Under torchrun / accelerate launch only rank 0 writes the run dir; the other ranks get a
    throw-away Hydra dir (they save nothing), so no two processes race for one timestamped folder."""
    import os
    import tempfile

    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += [f"hydra.run.dir={tempfile.mkdtemp(prefix='tinv-rank-')}", "hydra.output_subdir=null"]
    import_from_cwd()
    quiet_launcher_schema_note()
    sys.argv[1:] = command_line("tinv-train", sys.argv[1:])
    try:
        claim_run_folder(sys.argv[1:])
    except ConfigError as err:
        print(f"tinv-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        hydra_main()
    except KeyboardInterrupt:  # a sweep stopped while it waits for its jobs (a single run saves and says so itself)
        print("tinv-train: stopped", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def command_line(prog: str, args: list[str]) -> list[str]:
    """The arguments as Hydra should get them (tinv.commandline); exits with one line for what cannot run."""
    from .commandline import expand_home, help_text, precheck, resumed_args

    if prog == "tinv-train" and ("--help" in args or "-h" in args):
        print(help_text())
        sys.exit(0)
    try:
        args = resumed_args(expand_home(args))
        precheck(args)
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    return args


HYDRA_INFO_FLAGS = {"-c", "--cfg", "-p", "--package", "-i", "--info", "--resolve", "--hydra-help", "--version",
                    "-sc", "--shell-completion"}  # Hydra prints, runs nothing


def claim_run_folder(args: list[str]) -> None:
    """Before Hydra writes anything: a run folder named on the command line (hydra.run.dir=, a resume's own) is this
    run's alone. One that holds another run's files is refused unless resumed, one in use is refused, and a fresh
    folder (the default, a new name each time) is taken once Hydra made it."""
    from .commandline import override_value

    if any(a in ("-m", "--multirun") or a in HYDRA_INFO_FLAGS for a in args):
        return
    given = [override_value(a) for a in args if a.startswith("hydra.run.dir=")]
    if not given:
        return
    folder = Path(given[-1]).expanduser()
    resuming = any(a.startswith("resume=") and override_value(a) not in ("", "null", "None") for a in args)
    what = "resume" if resuming else "hydra.run.dir"
    owner = holder(folder)  # asked before anything is written there, the lock file included
    if owner:
        raise in_use(folder, what, owner)
    if not resuming and holds_a_run(folder):
        raise ConfigError(f"hydra.run.dir={folder} already holds a run, whose files a new run would overwrite; "
                          f"continue it with {resume_argument(folder)}, or give another folder")
    hold(folder, what)


def quiet_launcher_schema_note() -> None:
    """conf/hydra/launcher/joblib.yaml shares the joblib plugin schema's name on purpose (the same command line gets
    tinv's launcher); Hydra's deprecation note about that is not the user's concern."""
    import warnings

    warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema with the same name")


def import_from_cwd() -> None:
    """A `_target_` of your own (a callback, a part) imports from the folder you run the command in, as it would
    with `python -m`; console scripts do not put that folder on the path themselves."""
    import os

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


if __name__ == "__main__":
    main()
