"""The training loop: batches -> latents -> text encoders -> UNet -> loss -> backward -> step -> callbacks.

The loop trains the run's parts (tinv.parts) and knows nothing else: family differences sit behind the backbone,
files, validation, previews and scores are callbacks (tinv.callbacks), and everything it touches is the public
surface of the run context (tinv.run.Run). accelerate places tensors, runs autocast and the fp16 grad scaler, and
counts gradient-accumulation micro-batches.

All randomness of a step is a pure function of (seed, epoch, position, micro-step): a resumed run, a run with
previews and a run split over several processes see exactly the same samples, noise and timesteps.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .commandline import resume_argument
from .errors import TrainingDiverged, first_line
from .losses import DiffusionLoss
from .objective import read_objective
from .parts import MicroBatch
from .rescue import LastGood, keep_work, trained_values_finite
from .seeds import derive_seed

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one optimizer step did, as callbacks see it."""

    step: int  # the step just finished (1-based)
    loss: float  # mean over its micro-batches and processes
    grad_norm: float
    lr: float  # the learning rate it used
    skipped: bool  # non-finite loss, gradient or update: the parts did not move
    cause: str | None = None  # what was not finite: "loss", "gradient" or "update"


@dataclass
class TrainResult:
    embedding: Path | None
    step: int
    final_loss: float
    run: object  # the tinv.run.Run it trained
    summary: dict = field(default_factory=dict)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the files and the state were saved."""

    def __init__(self, signum: int, run_dir: Path, when: str = "at a step boundary"):
        self.signum, self.signal = signum, signal.Signals(signum).name
        self.run_dir, self.when = run_dir, when
        self.resume = resume_argument(run_dir)
        super().__init__(f"stopped by {self.signal} {when}; embedding and state saved in {run_dir} - continue with "
                         f"tinv-train {self.resume}")

    def __reduce__(self):  # a sweep's worker process sends it back pickled
        return type(self), (self.signum, self.run_dir, self.when)


class StopNow(Exception):
    """A signal after the last step (during the final scoring): the work is saved, so stop at once."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self):
        return type(self), (self.signum,)


class Trainer:
    """Runs `run.max_steps` optimizer steps of `loss` (micro-batches per step: the accelerator's accumulation)."""

    def __init__(self, loss: DiffusionLoss, *, max_grad_norm: float | None = None, log_every_n_steps: int = 1,
                 max_bad_steps: int = 10, objective: dict | None = None):
        self.loss, self.max_grad_norm, self.log_every_n_steps = loss, max_grad_norm, log_every_n_steps
        self.max_bad_steps, self.objective = max_bad_steps, dict(objective or {})

    def fit(self, run) -> TrainResult:
        from tqdm.auto import tqdm

        ok, last_loss, last_good, bar, out = False, float("nan"), None, None, None
        try:
            with stop_signals() as stop:
                run.callbacks.call("on_start", run)
                bar = tqdm(total=run.max_steps, initial=run.step, desc="tinv", dynamic_ncols=True,
                           disable=not run.is_main, mininterval=0.1 if sys.stderr.isatty() else 30)  # logs: sparse
                batches, speed = run.batches(), Throughput(run.step)
                while run.step < run.max_steps:
                    last_good = LastGood(run)  # what a failure before this step completes leaves (tinv.rescue)
                    out = self.step(run, batches)  # micro-batches -> latents -> encoders -> UNet -> loss -> step
                    if out.cause == "update":  # the values before the update, and the optimizer's moments
                        last_good.put_back_trained(run)
                    run.threads.adjust()  # other runs on these cores started or ended: share them
                    bar.update(run.step - bar.n)
                    if not out.skipped:
                        for part in run.parts.values():
                            part.after_step()
                        last_loss = out.loss
                        bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
                        if run.step % self.log_every_n_steps == 0 or run.step == run.max_steps:
                            run.log(self.metrics(run, out, speed.since_last(run.step)))
                    run.callbacks.call("on_step_end", run, out)
                    if (signum := stop.agreed(run.accelerator)) is not None:
                        bar.close()
                        raise self.save_and_stop(run, signum, stop=stop)
                bar.close()
                if self.ended_skipping(run, out):
                    raise TrainingDiverged(f"{'all' if run.state.bad_steps_total >= run.step else 'the last'} "
                                           f"{run.state.bad_steps} steps were skipped: {self.advice(run, out.cause)}")
                last_good = LastGood(run)  # the last step is complete: a failure in the final work keeps it
                stop.at_once = True  # from here on a signal stops the final work (scores) at once
                try:
                    run.callbacks.call("on_end", run)
                except StopNow as err:
                    raise self.save_and_stop(run, err.signum, "during the final scoring", stop) from None
            run.save_state()  # a finished run resumes as finished
            run.tracker.set_summary(final_loss=last_loss, step=run.step, base_model=run.backbone.source,
                                    model=run.backbone.name, family=run.backbone.family,
                                    bad_steps=run.state.bad_steps_total,
                                    wall_s=round(run.elapsed_s(), 2), started_at=run.started[1],
                                    finished_at=time.time(),
                                    **read_objective(run.tracker.history, last_loss, **self.objective))
            summary = dict(run.tracker.summary)
            ok = True
            embedding = summary.get("embedding")
            return TrainResult(Path(embedding) if embedding else None, run.step, last_loss, run, summary)
        except Interrupted as err:
            run.tracker.set_summary(step=run.step, stopped_by=err.signal, resume=err.resume)
            raise
        except Exception as err:  # anything else: keep the last complete step, then say so in one line
            failed = keep_work(run, last_good, err)
            run.tracker.set_summary(step=run.step, error=str(failed))
            raise (TrainingDiverged(str(failed)) if isinstance(err, TrainingDiverged) else failed) from err
        except BaseException as err:
            if not run.tracker.summary.get("requeued"):
                run.tracker.set_summary(step=run.step, error=f"{type(err).__name__}: {first_line(err)}")
            raise
        finally:
            if bar is not None:
                bar.close()  # before whatever the CLI prints next
            run.threads.release()
            try:
                run.tracker.finish(ok)
            except OSError as err:  # e.g. the disk is full: the error on its way out says more
                log.warning("summary.json and metrics.jsonl could not be closed: %s", first_line(err))

    @staticmethod
    def save_and_stop(run, signum: int, when: str = "at a step boundary", stop=None) -> Interrupted:
        """Write the files and the state as they are now; the Interrupted error to raise. A signal a launcher
        handles too (SLURM's time limit, through submitit) goes on to it: it requeues the job and exits."""
        run.tracker.set_summary(**{key: str(path) for key, path in run.write_files("").items()})
        run.save_state()
        if stop is not None and stop.passes_on(signum):
            run.tracker.set_summary(step=run.step, stopped_by=signal.Signals(signum).name, requeued=True)
            stop.pass_on(signum)
        return Interrupted(signum, run.run_dir, when)

    @staticmethod
    def metrics(run, out: StepOutput, steps_per_s: float) -> dict:
        metrics = {"train/loss": out.loss, "train/lr": out.lr, "train/grad_norm": out.grad_norm,
                   "train/it_per_s": steps_per_s}
        for part in run.parts.values():
            metrics.update(part.metrics())
        return metrics

    def step(self, run, batches) -> StepOutput:
        """One optimizer step: `gradient_accumulation` micro-batches, gradients averaged over processes, clipped,
        applied (or skipped when not finite)."""
        acc, losses = run.accelerator, []
        params = run.training_parameters()  # the parts in their phase (token.stop_frac, lora.start_frac/stop_frac)
        while True:
            with acc.accumulate():
                loss = self.micro_batch_loss(run, next(batches))
                acc.backward(loss)
                run.state.micro_step += 1
                if acc.sync_gradients:
                    grad_norm, finite = self._reduce_and_clip(run, loss, params)
                    if finite or acc.scaler is not None:  # fp16: the scaler skips inf steps and lowers its scale
                        run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
            if acc.sync_gradients:
                break
        lr = run.lr_scheduler.get_last_lr()[0]
        run.lr_scheduler.step()
        run.state.step += 1
        step_loss = acc.reduce(torch.stack(losses).mean().to(acc.device), "mean").item()
        cause = ("loss" if not math.isfinite(step_loss) else "gradient" if not finite else
                 "update" if not trained_values_finite(run) else None)  # the update itself overflowed
        return StepOutput(run.step, step_loss, float(grad_norm), lr, skipped=not self._guard(run, cause), cause=cause)

    def micro_batch_loss(self, run, batch: dict) -> torch.Tensor:
        """This process's share of the global batch: noise and timesteps are drawn for the whole global batch
        from (seed, micro-step) and sliced, so any process count gives the same draws per sample."""
        acc, bb = run.accelerator, run.backbone
        latents = run.latents.of(batch)
        gen = torch.Generator().manual_seed(derive_seed(run.seed, run.state.micro_step) % 2**63)
        noise, timesteps = self.loss.draw(gen, tuple(latents.shape), bb.noise_scheduler.config.num_train_timesteps,
                                          acc.num_processes, acc.process_index)
        masks = self.loss.mask_for_step(gen, run.latents.masks_of(batch, latents), acc.num_processes,
                                        acc.process_index)
        predict = bb.predictor(run.input_ids(batch["prompts"]), batch)  # text encoders -> conditioning -> UNet
        noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
        with acc.autocast():
            loss, pred = self.loss.with_prediction(predict, bb.noise_scheduler, bb.prediction_type, latents, noise,
                                                   timesteps, masks)
            micro = MicroBatch(bb.noise_scheduler.add_noise(latents, noise, timesteps), timesteps, batch, pred, masks)
            return loss + sum(part.loss_term(micro) for part in run.parts.values())

    def _reduce_and_clip(self, run, loss: torch.Tensor, params: list) -> tuple[torch.Tensor, bool]:
        """Average the trained parameters' gradients over processes, unscale, clip; report whether all is finite."""
        acc = run.accelerator
        # a weight the loss does not reach has no gradient (SDXL's last text-encoder layer feeds only the pooled
        # output); it is the same on every process, and the optimizer skips it
        params = [p for p in params if p.grad is not None]
        if acc.num_processes > 1:  # the parts live outside any DDP wrapper, so average them here
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

    def _guard(self, run, cause: str | None) -> bool:
        """A step whose loss, gradient or update was not finite was skipped (the trained values are as before it);
        stop after too many in a row."""
        if cause is None:
            run.state.bad_steps = 0
            return True
        run.state.bad_steps += 1
        run.state.bad_steps_total += 1
        run.log({"train/bad_steps": run.state.bad_steps_total})
        log.warning("step %d: non-finite %s, step skipped (%d in a row)", run.step, cause, run.state.bad_steps)
        if run.state.bad_steps >= self.max_bad_steps:
            raise TrainingDiverged(f"{run.state.bad_steps} steps in a row were skipped (train.max_bad_steps="
                                   f"{self.max_bad_steps}): {self.advice(run, cause)}")
        return False

    @staticmethod
    def ended_skipping(run, out: StepOutput | None) -> bool:
        """The run's last step was skipped: its file would hold values the loss cannot use. fp16's own overflow of
        the gradient is the one exception: the grad scaler skips such steps by design and lowers its scale."""
        if out is None or not run.state.bad_steps:
            return False
        return out.cause != "gradient" or run.accelerator.mixed_precision != "fp16" \
            or run.state.bad_steps_total >= run.step

    @staticmethod
    def advice(run, cause: str | None) -> str:
        """What made the steps non-finite, and the setting to change."""
        lr = run.optimizer.param_groups[0]["lr"]
        if cause == "update":
            return (f"the gradient was finite but the update made the trained values NaN or inf (learning rate "
                    f"{lr:g}): lower optimizer.lr")
        fp16 = run.accelerator.mixed_precision == "fp16"
        if cause == "gradient":
            return ("the loss was finite but its gradient was not: " + ("fp16 overflows, use "
                    "train.mixed_precision=bf16 or no" if fp16 else f"lower optimizer.lr ({lr:g}) or set "
                    "train.max_grad_norm"))
        largest = max((float(p.detach().abs().max()) for part in run.parts.values() for p in part.parameters()
                       if p.numel()), default=0.0)
        if largest > 1e3:  # embedding rows hold values well under 1; the updates made them this large
            return (f"the loss was NaN or inf because the trained values grew to {largest:.3g} (learning rate "
                    f"{lr:g}): lower optimizer.lr")
        return ("the loss itself was NaN or inf with finite trained values: " + ("fp16 overflows, use "
                "train.mixed_precision=bf16 or no" if fp16 else "the inputs or a loss setting are not finite (the "
                "latent cache, train.noise_offset, loss weights); check them or clear the cache (train.log names "
                "the step)"))


class Throughput:
    """Steps per second since the last call."""

    def __init__(self, step: int):
        self.step, self.since = step, time.perf_counter()

    def since_last(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) / max(now - self.since, 1e-9)
        self.step, self.since = step, now
        return rate


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second signal stops at once. After the last
    step (`at_once`) the first signal stops at once: the files are written by then.

    SIGUSR2, where a launcher handles it (submitit: SLURM's time limit or a preemption is near), stops the same way;
    once the state is saved, the launcher's own handler gets it (`pass_on`) and requeues the job, which resumes."""

    def __init__(self):
        self.signum: int | None = None
        self.at_once = False
        self.then: dict[int, object] = {}  # signal -> the handler it was taken from, to call once saved
        self.previous: dict[int, object] = {}  # every signal's handler before this one

    def passes_on(self, signum: int) -> bool:
        return signum in self.then

    def pass_on(self, signum: int) -> None:
        for sig, handler in self.previous.items():  # the requeue ends this process with SIGTERM: the launcher's way
            signal.signal(sig, handler)
        self.then[signum](signum, None)

    def __call__(self, signum, frame) -> None:
        if self.at_once:
            raise StopNow(signum)
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping after this step", signal.Signals(signum).name)

    def agreed(self, accelerator) -> int | None:
        """The signal to stop on, the same on every process (they receive it at different moments)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor(float(self.signum or 0), device=accelerator.device)
        return int(accelerator.reduce(flag, "max").item()) or None


@contextmanager
def stop_signals():
    request = StopRequest()
    previous = request.previous
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request)
        preempt = getattr(signal, "SIGUSR2", None)
        if preempt is not None and callable(signal.getsignal(preempt)):  # a launcher's (submitit's) requeue
            request.then[preempt] = previous[preempt] = signal.signal(preempt, request)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
