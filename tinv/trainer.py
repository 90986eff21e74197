"""The training loop: data -> text encoders -> UNet -> loss -> step, for every model family.

Everything family-specific sits behind `Backbone`, everything token-specific behind `ConceptToken`; previews,
validation and the resumable state live in their own modules. accelerate places tensors, runs autocast and the
fp16 grad scaler, and counts gradient-accumulation micro-batches.

All randomness of a step is a pure function of (seed, epoch, position, micro-step): a resumed run, a run with
previews and a run split over several processes see exactly the same samples, noise and timesteps.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from .backbone.tiny import cache_root
from .data import BucketBatchSampler, LatentCache, collate
from .embedding import ConceptToken, EmbeddingMeta, save_embedding
from .errors import ConfigError
from .losses import diffusion_loss
from .state import RunState, find_state, load_state, save_state

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    embedding: Path
    step: int
    final_loss: float
    trainer: "Trainer"
    summary: dict = field(default_factory=dict)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the embedding and the state were saved."""

    def __init__(self, signum: int, run_dir: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} at a step boundary; embedding and state saved "
                         f"in {run_dir} - continue with the same command plus resume={run_dir}")
        self.signum = signum


class Trainer:
    def __init__(self, backbone, dataset, token: ConceptToken, optimizer, lr_scheduler, tracker,
                 run_dir: str | Path, output_name: str, save: dict, previewer=None, validator=None,
                 scorer=None, resume: str | None = None, run_config: dict | None = None, *, max_steps: int = 500,
                 batch_size: int = 4, gradient_accumulation: int = 1, seed: int = 42, mixed_precision: str = "no",
                 gradient_checkpointing: bool = False, cache_latents: bool = True,
                 cache_latents_to_disk: bool = False, no_half_vae: bool | None = None,
                 max_grad_norm: float | None = None, log_every_n_steps: int = 1, cpu: bool = False,
                 noise_offset: float = 0.0, min_snr_gamma: float | None = None, min_timestep: int = 0,
                 max_timestep: int | None = None, lr_scale: str = "none", max_bad_steps: int = 10,
                 compile: bool = False, cache_text_encoder_outputs: bool = False):
        self.backbone, self.dataset, self.token = backbone, dataset, token
        self.make_optimizer, self.make_lr_scheduler, self.tracker = optimizer, lr_scheduler, tracker
        self.previewer, self.validator, self.scorer = previewer, validator, scorer
        self.run_dir, self.output_name, self.resume_from = Path(run_dir), output_name, resume
        self.save_cfg = dict(save)
        # a plain dict for the trackers (Hydra hands kwargs over as DictConfig)
        self.config = OmegaConf.to_container(run_config) if isinstance(run_config, DictConfig) else run_config or {}
        self.max_steps, self.seed = max_steps, seed  # batch_size lives in train.*; the data pipeline uses it
        self.gradient_accumulation, self.mixed_precision = gradient_accumulation, mixed_precision
        self.gradient_checkpointing, self.compile = gradient_checkpointing, compile
        self.cache_latents, self.cache_latents_to_disk = cache_latents or cache_latents_to_disk, cache_latents_to_disk
        self.cache_text_encoder_outputs = cache_text_encoder_outputs
        self.no_half_vae = backbone.family == "sdxl" if no_half_vae is None else no_half_vae
        self.max_grad_norm, self.log_every_n_steps, self.cpu = max_grad_norm, log_every_n_steps, cpu
        self.loss_options = dict(noise_offset=noise_offset, min_snr_gamma=min_snr_gamma,
                                 min_timestep=min_timestep, max_timestep=max_timestep)
        self.lr_scale, self.max_bad_steps = lr_scale, max_bad_steps
        self.state = RunState()
        self.latent_cache = None
        self.cache_build_s: float | None = None  # seconds spent encoding the latent cache
        self.last_loss = float("nan")
        self._stop_signal: int | None = None

    @property
    def step(self) -> int:
        return self.state.step

    # ---- setup ----------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import GradientAccumulationPlugin

        # accelerate keeps process-wide singletons; several runs in one process (Hydra's basic multirun launcher,
        # tests) may differ in precision or accumulation. The distributed state (PartialState) is kept.
        AcceleratorState._reset_state()
        GradientState._reset_state()
        no_gpu = not torch.cuda.is_available()
        self.accelerator = acc = Accelerator(
            mixed_precision=self.mixed_precision, cpu=self.cpu or no_gpu,  # cpu=True: real gloo DDP on CPUs
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=self.gradient_accumulation,
                                                                    sync_with_dataloader=False))
        device = acc.device
        if self.mixed_precision == "fp16" and device.type == "cpu":
            raise ConfigError("train.mixed_precision=fp16 needs a GPU; on the CPU use train.mixed_precision=bf16 "
                              "or no")
        if self.resume_from:
            self.run_dir, self.resume_state = find_state(self.resume_from, self.run_dir)
        dtype = DTYPES[self.mixed_precision]
        self.backbone.load_models(device, dtype, torch.float32 if self.no_half_vae else dtype)
        self.token.install(self.backbone.encoders, self.seed)  # after the dtype cast: the vectors stay fp32
        if self.gradient_checkpointing:
            self.backbone.enable_gradient_checkpointing()
        if self.compile:
            self.backbone.unet = torch.compile(self.backbone.unet)
        if self.cache_text_encoder_outputs:
            if not self.token.frozen_keys():
                raise ConfigError("train.cache_text_encoder_outputs: an encoder whose vectors train cannot be "
                                  "cached, and every encoder trains here; for SDXL set token.train_encoders=clip_l "
                                  "or clip_g to cache the other one")
            self.backbone.cache_outputs_of(self.token.frozen_keys())

        params = self.token.parameters()
        optimizer = self.make_optimizer(params)
        if self.lr_scale == "batch":  # the original TI rule: lr grows with the samples per optimizer step
            sizes = {ds.batch_size for ds in self.dataset.specs}  # a kohya TOML may set its own
            if len(sizes) > 1:
                log.warning("train.lr_scale=batch: datasets have batch sizes %s; scaling by the largest", sorted(sizes))
            factor = max(sizes) * self.gradient_accumulation * acc.num_processes
            for group in optimizer.param_groups:
                group["lr"] *= factor
        self.lr_scheduler = self.make_lr_scheduler(optimizer=optimizer, num_training_steps=self.max_steps)
        self.optimizer = acc.prepare(optimizer)
        self.sampler = BucketBatchSampler(self.dataset, self.seed, acc.num_processes, acc.process_index)
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=collate,
                                 num_workers=self.dataset.num_workers)
        if self.cache_latents:
            self._cache_latents(device)
        if self.resume_from:
            load_state(self.resume_state, self)
            log.info("resumed %s at step %d", self.run_dir, self.step)
        self.tracker.start(self.run_dir, self.config, enabled=acc.is_main_process, resume_id=self.state.tracker_id,
                           resume_step=self.step)
        self.state.tracker_id = self.tracker.run_id
        n = sum(p.numel() for p in params)
        log.info("training %d vectors (%d floats) of token %r on %s x%d (%s); %d images, %d samples per epoch",
                 self.token.num_vectors, n, self.token.string, device, acc.num_processes, self.mixed_precision,
                 len(self.dataset.samples), len(self.dataset))

    def _cache_latents(self, device: torch.device) -> None:
        """Encode every image (and its mirror, with flip_aug) once; steps then do no VAE work."""
        blockers = sorted({k for sub in self.dataset.subsets for k in ("random_crop", "color_aug") if getattr(sub, k)})
        if blockers:
            log.warning("latent caching is off: %s change the pixels every step", " and ".join(blockers))
            return
        cache_dir = None
        if self.cache_latents_to_disk:
            cache_dir = self.dataset.cache_dir or str(cache_root() / "latents")
        self.latent_cache = LatentCache(self.dataset, self.backbone, cache_dir, self.dataset.vae_batch_size)
        started = time.perf_counter()
        self.latent_cache.build(device)
        self.cache_build_s = time.perf_counter() - started
        self.dataset.cached = True
        self.backbone.vae.to("cpu")  # no longer needed on the accelerator

    # ---- the loop ---------------------------------------------------------------------------------------------------

    def latents(self, batch: dict) -> torch.Tensor:
        if self.latent_cache is not None:
            return self.latent_cache.get(batch["sample"], batch["flip"])
        with torch.no_grad():
            return self.backbone.encode_latents(batch["pixel_values"]).float().to(self.accelerator.device)

    def training_loss(self, batch: dict) -> torch.Tensor:
        """This process's share of the global batch: noise and timesteps are drawn for the whole global batch
        from (seed, micro-step) and sliced, so any process count gives the same draws per sample."""
        latents = self.latents(batch)
        acc = self.accelerator
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.state.micro_step) % 2**63)
        input_ids = self.backbone.tokenize([self.token.expand(p) for p in batch["prompts"]])
        with acc.autocast():
            loss = diffusion_loss(self.backbone, latents, input_ids, batch, gen, acc.num_processes,
                                  acc.process_index, **self.loss_options)
        return loss + self.token.regularizer()

    def fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        ok, started, started_at = False, time.perf_counter(), time.time()
        try:
            self.setup()
            acc = self.accelerator
            self._install_signal_handlers()
            if self.previewer and self.previewer.at_start and self.step == 0 and acc.is_main_process:
                self.previewer.run(self, 0)
            bar = tqdm(total=self.max_steps, initial=self.step, desc="tinv", dynamic_ncols=True,
                       disable=not acc.is_main_process)
            batches, since, logged = self._batches(), time.perf_counter(), self.step
            while self.step < self.max_steps:
                step_loss, grad_norm, finite, lr = self.optimizer_step(batches)
                bar.update(self.step - bar.n)
                good = self._guard(finite, step_loss)  # a skipped step left the vectors as they were
                if good:
                    self.token.after_step()
                    self.last_loss = step_loss
                    bar.set_postfix(loss=f"{self.last_loss:.4f}")
                    if self.step % self.log_every_n_steps == 0 or self.step == self.max_steps:
                        rate = (self.step - logged) / max(time.perf_counter() - since, 1e-9)
                        self._log(grad_norm, lr, rate)
                        since, logged = time.perf_counter(), self.step
                self._after_step(good)
            bar.close()
            path = self.save("")
            best = self.state.best_summary()
            summary = dict(final_loss=self.last_loss, step=self.step, embedding=str(path),
                           base_model=self.backbone.source, family=self.backbone.family,
                           bad_steps=self.state.bad_steps_total, wall_s=round(time.perf_counter() - started, 2),
                           started_at=started_at, finished_at=time.time(),
                           objective=best.get("best_val_loss", self.last_loss),
                           objective_name="best_val_loss" if best else "final_loss", **best)
            if self.scorer and acc.is_main_process:
                scores = self.score()
                # what a sweep minimises when the judge can tell: the share of samples that miss the concept
                summary.update(scores, objective=1.0 - scores["concept_accuracy"], objective_name="concept_error")
            self.tracker.set_summary(**summary)
            ok = True
            return TrainResult(path, self.step, self.last_loss, self, summary)
        finally:
            self._restore_signal_handlers()
            self.tracker.finish(ok)

    def optimizer_step(self, batches) -> tuple[float, torch.Tensor, bool, float]:
        """One optimizer step: `gradient_accumulation` micro-batches, gradients averaged over processes, clipped,
        applied (or skipped when not finite). Returns (mean loss, grad norm, finite, the lr it used)."""
        acc, losses = self.accelerator, []
        while True:
            with acc.accumulate():
                loss = self.training_loss(next(batches))
                acc.backward(loss)
                self.state.micro_step += 1
                if acc.sync_gradients:
                    grad_norm, finite = self._reduce_and_clip(loss)
                    if finite or acc.scaler is not None:  # fp16: the scaler skips inf steps and lowers its scale
                        self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
            if acc.sync_gradients:
                break
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        self.state.step += 1
        return acc.reduce(torch.stack(losses).mean().to(acc.device), "mean").item(), grad_norm, finite, lr

    def _batches(self):
        """Batches from where the state says, epoch after epoch, counting the position for resume."""
        while True:
            self.sampler.epoch, self.sampler.start = self.state.epoch, self.state.position
            for batch in self.loader:
                self.state.position += 1
                yield batch
            self.state.epoch, self.state.position = self.state.epoch + 1, 0

    def _reduce_and_clip(self, loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Average the vectors' gradients over processes, unscale, clip; report whether all is finite."""
        acc, params = self.accelerator, self.token.parameters()
        if acc.num_processes > 1:  # the vectors live outside any DDP wrapper, so average them here
            for p in params:
                p.grad = acc.reduce(p.grad, "mean")
        if self.max_grad_norm:
            norm = acc.clip_grad_norm_(params, self.max_grad_norm)
        else:
            acc.unscale_gradients()
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        finite = bool(torch.isfinite(norm)) and bool(torch.isfinite(loss.detach()))
        if acc.num_processes > 1:  # every process must agree to step or skip
            finite = bool(acc.reduce(torch.tensor(float(finite), device=acc.device), "sum").item() ==
                          acc.num_processes)
        return norm, finite

    def _guard(self, finite: bool, step_loss: float) -> bool:
        """A non-finite step was skipped (the optimizer did not move); stop after too many in a row."""
        if finite and torch.isfinite(torch.tensor(step_loss)):
            self.state.bad_steps = 0
            return True
        self.state.bad_steps += 1
        self.state.bad_steps_total += 1
        self.tracker.log({"train/bad_steps": self.state.bad_steps_total}, self.step)
        log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", self.step,
                    self.state.bad_steps)
        if self.state.bad_steps >= self.max_bad_steps:
            raise ConfigError(f"{self.state.bad_steps} steps in a row had a non-finite loss or gradient "
                              f"(train.max_bad_steps={self.max_bad_steps}); the last good embedding is in "
                              f"{self.run_dir}. Lower optimizer.lr, or use train.mixed_precision=bf16/no")
        return False

    def _after_step(self, good: bool = True) -> None:
        """Periodic files after a step; a skipped step still keeps the state and honours a stop request."""
        every = self.save_cfg.get("every_n_steps", 0)
        if good and every and self.step % every == 0:
            self.save(f"-step{self.step:08d}")
        if good and self.validator and self.validator.every_n_steps and self.step % self.validator.every_n_steps == 0:
            self.validate()
        if good and self.previewer and self.previewer.every_n_steps and \
                self.step % self.previewer.every_n_steps == 0 and self.accelerator.is_main_process:
            self.previewer.run(self, self.step)
        state_every = self.save_cfg.get("state_every_n_steps", 0)
        if state_every and self.step % state_every == 0:
            self.save_state()
        stop = self._stop_signal
        if self.accelerator.num_processes > 1:  # signals reach processes at different moments: agree on one step
            flag = torch.tensor(float(stop or 0), device=self.accelerator.device)
            stop = int(self.accelerator.reduce(flag, "max").item()) or None
        if stop is not None:
            self.save("")
            self.save_state()
            raise Interrupted(stop, self.run_dir)

    def score(self) -> dict:
        """Concept scores of samples drawn with the token now (val.judge), logged as val/*."""
        scores = self.scorer.run(self)
        self.tracker.log({f"val/{k}": v for k, v in scores.items()}, self.step)
        log.info("step %d: %s", self.step, ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        return scores

    def validate(self) -> float:
        value = self.validator.loss(self)
        self.tracker.log({"val/loss": value}, self.step)
        if self.scorer and self.accelerator.is_main_process and self.step < self.max_steps:
            self.score()  # the last step's scores come with the summary
        if value < self.state.best_val_loss:
            self.state.best_val_loss, self.state.best_step = value, self.step
            self.save("-best")
        return value

    def _log(self, grad_norm: torch.Tensor, lr: float, steps_per_s: float) -> None:
        metrics = {"train/loss": self.last_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                   "train/it_per_s": steps_per_s}
        for key, vectors in self.token.vectors().items():
            for i, norm in enumerate(vectors.norm(dim=1).tolist()):
                metrics[f"embedding/{key}/norm_{i}"] = norm
        self.tracker.log(metrics, self.step)

    # ---- files ----------------------------------------------------------------------------------------------------

    def save(self, suffix: str) -> Path:
        fmt = self.save_cfg.get("format", "safetensors")
        path = self.run_dir / f"{self.output_name}{suffix}.{'safetensors' if fmt == 'safetensors' else 'pt'}"
        if self.accelerator.is_main_process:
            meta = EmbeddingMeta(self.token.string, self.backbone.family, self.backbone.source, self.step)
            save_embedding(path, self.token.vectors(), meta, fmt)
            log.info("saved %s (step %d)", path, self.step)
        return path

    def save_state(self) -> None:
        if self.accelerator.is_main_process:
            save_state(self.run_dir, self)

    def _install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM finish the current step, then save the embedding and the state and stop."""
        import threading

        self._previous_handlers = {}
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum, frame):
            if self._stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum
            log.warning("%s received: stopping after this step", signal.Signals(signum).name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[sig] = signal.signal(sig, request_stop)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, handler)
