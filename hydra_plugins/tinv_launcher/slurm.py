"""tinv's SLURM launcher: hydra-submitit-launcher's, made to fail per job and to work without accounting.

- A job that dies without a result (scancel, SIGKILL, a node failure) fails alone: its folder's summary.json says
  so and the sweep goes on, where submitit's launcher lets the first such job end the whole sweep.
- On a cluster whose accounting storage is disabled (no slurmdbd, common on small clusters), `sacct` fails on every
  poll: submitit printed "Bypassing sacct error" each time and, knowing no state, waited forever for a job that had
  died. Job states are then read from `squeue` instead, with one line in the log that says so.
- Each job's threads follow its `cpus_per_task` (tinv.resources reads SLURM_CPUS_PER_TASK); a job that reaches its
  time limit or is preempted saves its state and is requeued (`max_num_timeout` times), then resumes from it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import threading
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

try:  # Hydra imports every hydra_plugins module at start-up; without the sweeps extra there is nothing to define
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # pragma: no cover
    SlurmLauncher = None

# squeue's states of a job that will still give a result, beyond those submitit knows (PENDING, RUNNING, ...)
_STILL_GOING = {"CONFIGURING", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT",
                "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}


def accounting_error() -> str | None:
    """Why `sacct` cannot tell job states here (None when it can)."""
    try:
        proc = subprocess.run(["sacct", "-n", "-X", "-j", "1", "-o", "JobID"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit status {proc.returncode}")


class QueueWatcherMark:
    """What the squeue watcher is (submitit's watcher class is built lazily, inside queue_watcher)."""


def queue_watcher(delay_s: int = 60):
    """A submitit state watcher that asks `squeue` (the controller's memory) instead of `sacct`."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class QueueWatcher(SlurmInfoWatcher, QueueWatcherMark):
        def _make_command(self):
            if not self._registered - self._finished:
                return None
            # every job of this user, array tasks one per line, finished ones too while the controller keeps them
            return ["squeue", "--noheader", "--array", "--states=all", "--me", "--format=%i|%T|%N"]

        def read_info(self, string):
            text = string.decode() if isinstance(string, bytes) else string
            info = super().read_info("JobID|State|NodeList\n" + text)
            for job_id in self._registered - set(info):  # gone from the controller's memory: it has ended
                info[job_id] = {"JobID": job_id, "State": "COMPLETED", "NodeList": ""}
            for stats in info.values():
                if stats["State"] in _STILL_GOING:  # submitit would take these for finished
                    stats["State"] = "PENDING"
            return info

    return QueueWatcher(delay_s=delay_s)


class TinvSlurmLauncher(SlurmLauncher or object):
    """hydra-submitit-launcher's SlurmLauncher (same keys), with per-job failures and squeue states."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        if not isinstance(submitit.SlurmJob.watcher, QueueWatcherMark):  # once per sweep process
            why = accounting_error()
            if why is not None:
                log.info("SLURM accounting is off on this cluster (sacct: %s): job states come from squeue", why)
                submitit.SlurmJob.watcher = queue_watcher()
        params = dict(self.params)
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        common = set(OmegaConf.structured(BaseQueueConf).keys())  # keys every submitit executor takes unprefixed
        executor.update_parameters(**{key if key in common else f"slurm_{key}": value
                                      for key, value in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("submitting %d job%s to SLURM; their folders are in %s", len(job_overrides),
                 "s"[:len(job_overrides) > 1], sweep_dir)
        numbers = [initial_job_idx + idx for idx in range(len(job_overrides))]
        for num, overrides in zip(numbers, job_overrides):
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        state = Singleton.get_state()
        jobs = executor.map_array(self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(numbers),
                                  numbers, [f"job_id_for_{num}" for num in numbers], [state] * len(numbers))
        with cancel_on_stop(jobs):
            return self._gather(jobs, numbers, job_overrides, sweep_dir)

    @staticmethod
    def _gather(jobs, numbers, job_overrides, sweep_dir: Path):
        from hydra.core.utils import JobReturn, JobStatus

        from tinv.errors import first_line

        from . import _record

        returns = []
        for num, overrides, job in zip(numbers, job_overrides, jobs):
            try:
                returns.append(job.results()[0])
            except Exception as err:  # noqa: BLE001 - the job ended without a result: it alone fails
                error = (f"SLURM job {job.job_id} ended without a result (state {job.watcher.get_state(job.job_id, 'cache')}"
                         f"; {type(err).__name__}: {first_line(err)})")
                log.error("job %d: %s", num, error)
                _record(sweep_dir, num, error)
                returns.append(JobReturn(overrides=list(overrides), status=JobStatus.FAILED,
                                         _return_value=RuntimeError(f"job {num}: {error}")))
        return returns


@contextlib.contextmanager
def cancel_on_stop(jobs):
    """Ctrl-C or SIGTERM to the sweep process cancels its jobs still queued or running (scancel: each running job
    saves its files and state, and resumes when the sweep is started again in its folder); jobs left behind would
    go on writing into folders a new sweep resumes."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    except BaseException:
        going = [job for job in jobs if not job.done()]
        for job in going:
            job.cancel(check=False)
        if going:
            log.warning("the sweep was stopped: cancelled its SLURM jobs %s (each saves its state; start the sweep "
                        "again in its folder to resume them)", " ".join(job.job_id for job in going))
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
