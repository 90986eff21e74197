"""The composition root: build every piece of a run from the composed Hydra config, then train it.

`prepare` builds every piece from the config and checks it while nothing heavy has loaded (a bad key, file or
value costs seconds); `tinv.run.open_run` loads the models and places everything; `Trainer.fit` trains. The
command (`tinv-train`, `python -m tinv`) is tinv.commands.train.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from .atomic import write_text_atomic
from .callbacks import Callbacks
from .console import quiet_libraries
from .config import LOADING_KEYS, apply_deprecated, check_values
from .data import PromptBuilder
from .errors import ConfigError
from .losses import DiffusionLoss
from .optim import check_optimization
from .ownership import owned
from .resources import env_threads
from .run import Job, open_run
from .state import check_resumable, find_state, saved_step
from .sweeping.jobs import settings_digest
from .trained.token import ConceptToken
from .trainer import Trainer, TrainResult

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
        if dataset.has_masks:
            mask = sample.mask
            where = "none (every pixel counts)" if mask is None else \
                f"{mask.path} (alpha)" if mask.alpha else str(mask.path)
            subject = f", subject {item['mask'].mean().item():.0%} of the crop" if item["mask"] is not None else ""
            lines.append(f"    mask:    {where}{subject}")
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
    callbacks = Callbacks({name: build(node, f"callbacks.{name}") for name, node in cfg.callbacks.items()
                           if node is not None})  # a world may switch a callback off (conf/world/toy.yaml)
    dataset = callbacks.on_dataset(dataset)
    parts = {name: build(node, f"parts.{name}") for name, node in cfg.parts.items()}
    if not parts:
        raise ConfigError("parts is empty: nothing would train; keep parts.vectors (conf/train.yaml)")
    train = cfg.train
    loss = DiffusionLoss(train.noise_offset, train.min_snr_gamma, train.min_timestep, train.max_timestep,
                         **OmegaConf.to_container(cfg.loss))
    trainer = Trainer(loss,
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
        return job.trainer.fit(opened)


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
