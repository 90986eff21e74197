"""`tinv-train`: compose the Hydra config, instantiate dataset, backbone and trainer, and train.

    tinv-train                                   # built-in tiny model and demo images, offline
    tinv-train model=sdxl data=folder data.image_dir=imgs token.string=mychar token.init_word=girl
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import config as _config  # noqa: F401 - registers the schemas and resolvers
from .config import check_values
from .data import PromptBuilder
from .embedding import ConceptToken
from .errors import ConfigError
from .optim import check_optimization
from .atomic import write_text_atomic
from .sampling import Previewer
from .sweeping import sweep_identity
from .trainer import Interrupted, TrainResult
from .validation import Validator

log = logging.getLogger("tinv")


def build(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, letting our one-line ConfigError through Hydra's wrapper exception."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


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


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> TrainResult | None:
    """Train one embedding (None for data.debug, which only prints)."""
    trainer = prepare(cfg, run_dir)
    if trainer is None:
        return None
    result = trainer.fit()
    log.info("embedding: %s", result.embedding)
    return result


def prepare(cfg: DictConfig, run_dir: str | Path | None = None, **trainer_overrides):
    """Compose everything a run needs into a Trainer. Cheap checks first, so bad input fails before any weights
    load. `trainer_overrides` replace built parts (tinv-bench passes its own tracker)."""
    check_values(cfg)
    hydra_ready = HydraConfig.initialized()
    choices = HydraConfig.get().runtime.choices if hydra_ready else {}
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    check_optimization(cfg.optimizer, cfg.scheduler, cfg.train.max_steps, choices)

    token = ConceptToken(cfg.token.string, cfg.token.num_vectors, cfg.token.init_word, cfg.token.weights,
                         cfg.token.norm, cfg.token.norm_weight, cfg.token.train_encoders)
    dataset = build(cfg.data, family=cfg.model.family, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    backbone = build(cfg.model)  # tokenizers only; weights load in the trainer
    token.add_to_tokenizers(backbone.encoders)
    token.check_start(backbone.encoders)  # token.weights against the encoders' keys and widths, before loading
    dataset.check_token(token, cfg.template.kind)
    dataset.prompts = PromptBuilder(cfg.template.kind, token, cfg.template.templates, cfg.data.missing_token)
    if dataset.debug:
        print(describe_samples(dataset, token, backbone))
        return None
    validator = None
    if cfg.val.every_n_steps:
        validator = Validator.for_dataset(dataset, cfg.val.every_n_steps, cfg.val.split, cfg.val.max_images,
                                          cfg.val.num_timesteps, cfg.val.seed)
    scorer = None
    if cfg.val.judge:
        from .toy.evaluation import ConceptScorer

        scorer = ConceptScorer.for_dataset(dataset, cfg.val.judge, cfg.val.concept, num_samples=cfg.val.num_samples,
                                           guidance_scale=cfg.val.guidance_scale, seed=cfg.val.seed)
    previewer = None
    if cfg.sample.every_n_steps or cfg.sample.at_start:
        previewer = Previewer(**OmegaConf.to_container(cfg.sample), token=token.string,
                              resolution=cfg.model.resolution)
    parts = dict(backbone=backbone, dataset=dataset, token=token, optimizer=build(cfg.optimizer),
                 lr_scheduler=build(cfg.scheduler), run_dir=run_dir, output_name=cfg.output_name or token.string,
                 save=OmegaConf.to_container(cfg.save), previewer=previewer, validator=validator, scorer=scorer,
                 resume=cfg.resume,
                 run_config=OmegaConf.to_container(cfg, resolve=True))
    parts.update(trainer_overrides)
    if "tracker" not in parts:
        parts["tracker"] = build(cfg.logger)
    return build(cfg.train, _recursive_=False, **parts)


def objective(result: TrainResult) -> float:
    """What a sweep minimises: the best validation loss when validation ran, else the final training loss."""
    return result.summary["objective"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    in_sweep = bool(sweep_identity())
    try:
        result = run(cfg)
        return objective(result) if result else None
    except (ConfigError, Interrupted) as err:
        message = f"tinv-train: {'error: ' if isinstance(err, ConfigError) else ''}{err}"
        print(message, file=sys.stderr)
        if in_sweep:  # record the failure in the job's folder and let the sweep go on with the other jobs
            write_text_atomic(job_dir / "summary.json", json.dumps({"ok": False, "error": str(err)}, indent=2))
            raise
        if isinstance(err, Interrupted):
            sys.exit(128 + err.signum)
        _discard_untouched_run_dir(job_dir)
        sys.exit(2)
    except Exception as err:
        if in_sweep:
            write_text_atomic(job_dir / "summary.json", json.dumps({"ok": False, "error": repr(err)}, indent=2))
        raise


def _discard_untouched_run_dir(run_dir: Path) -> None:
    """A run refused at start leaves nothing behind: remove Hydra's own files if nothing else was written."""
    import shutil

    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}:
        logging.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    """Console entry. Under torchrun / accelerate launch only rank 0 writes the run dir; the other ranks get a
    throw-away Hydra dir (they save nothing), so no two processes race for one timestamped folder."""
    import os
    import tempfile

    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += [f"hydra.run.dir={tempfile.mkdtemp(prefix='tinv-rank-')}", "hydra.output_subdir=null"]
    hydra_main()


if __name__ == "__main__":
    main()
