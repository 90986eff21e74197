"""tinv's parallel launcher for one machine: hydra-joblib-launcher's, with each job in a worker process of its own.

With joblib's shared pool, one worker that dies (killed, out of memory, a segfault) breaks the pool: the jobs
running beside it die too and the jobs not yet started never run. Here a job whose process dies fails alone: its
folder gets a summary.json saying so (tinv-report lists it as failed) and the other jobs run to the end.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

try:  # Hydra imports every hydra_plugins module at start-up; without the sweeps extra there is nothing to define
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
except ImportError:  # pragma: no cover
    JoblibLauncher = None


class IsolatedJoblibLauncher(JoblibLauncher or object):
    """`n_jobs` jobs at a time, each in a fresh process (loky's, as joblib uses) with its share of the cores."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        from hydra.core.singleton import Singleton
        from hydra.core.utils import configure_log, filter_overrides, setup_globals

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        cores = os.cpu_count() or 1
        n_jobs = self.joblib.get("n_jobs") or 1
        n_jobs = max(1, cores + 1 + n_jobs if n_jobs < 0 else n_jobs)  # joblib's meaning of -1, -2, ...
        threads = max(1, cores // min(n_jobs, max(len(job_overrides), 1)))
        log.info("launching %d jobs, %d at a time, each in its own process (at most %d thread%s), in %s",
                 len(job_overrides), n_jobs, threads, "s"[:threads > 1], sweep_dir)
        for idx, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", initial_job_idx + idx, " ".join(filter_overrides(overrides)))
        state = Singleton.get_state()
        pool = ThreadPoolExecutor(max_workers=n_jobs)
        try:
            futures = [pool.submit(self._one, initial_job_idx + idx, list(overrides), state, threads)
                       for idx, overrides in enumerate(job_overrides)]
            return [future.result() for future in futures]
        finally:  # Ctrl-C: the running jobs get the signal too (and save); the queued ones never start
            pool.shutdown(wait=True, cancel_futures=True)

    def _one(self, idx: int, overrides: list[str], singleton_state, threads: int):
        from hydra.core.utils import JobReturn, JobStatus
        from hydra_plugins.hydra_joblib_launcher._core import execute_job
        from joblib.externals.loky import ProcessPoolExecutor

        from tinv.errors import first_line

        env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        try:
            with ProcessPoolExecutor(max_workers=1, env=env, initializer=_quiet) as worker:
                return worker.submit(execute_job, idx, overrides, self.hydra_context, self.config,
                                     self.task_function, singleton_state).result()
        except Exception as err:  # noqa: BLE001 - the worker died (or could not start): this job alone fails
            error = f"its worker process died ({type(err).__name__}: {first_line(err)})"
            log.error("job %d %s", idx, error)
            _record(Path(str(self.config.hydra.sweep.dir)), idx, error)
            return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=RuntimeError(
                f"job {idx} ({' '.join(overrides)}): {error}"))


def _quiet() -> None:
    """In the worker as in the sweep's process (tinv.commandline.quiet_launcher_schema_note)."""
    from tinv.commandline import quiet_launcher_schema_note

    quiet_launcher_schema_note()


def _record(sweep_dir: Path, idx: int, error: str) -> None:
    """summary.json (ok false, the error) in the folder of job `idx`, found by the job number Hydra recorded."""
    import yaml

    from tinv.atomic import write_text_atomic

    for hydra_file in sweep_dir.glob("*/.hydra/hydra.yaml"):
        try:
            num = yaml.safe_load(hydra_file.read_text())["hydra"]["job"]["num"]
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            continue
        if num == idx:
            path = hydra_file.parent.parent / "summary.json"
            summary = json.loads(path.read_text()) if path.is_file() else {}
            summary.update(ok=False, error=error)
            write_text_atomic(path, json.dumps(summary, indent=2))
            return
