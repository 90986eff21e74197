"""A run's share of the machine.

CPU threads: runs that share cores split them instead of each taking all of them (two toy runs side by side with
every thread each took 2.7x longer than one after the other, measured here). A run takes `train.num_threads` when
given; else the thread count its launcher set (OMP_NUM_THREADS: joblib's workers, a user's own); else its cores (the
affinity mask, at most SLURM_CPUS_PER_TASK) divided by the runs registered on those cores in $TINV_CACHE/running,
rechecked every few seconds as runs start and end.

GPUs: in a local sweep on a machine with several GPUs each job takes GPU (job number mod count), unless the user
chose devices (CUDA_VISIBLE_DEVICES) or the run is one process of a distributed launch.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from pathlib import Path

import torch

from .cache import cache_root

log = logging.getLogger(__name__)


def my_cores() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ThreadShare:
    def __init__(self, num_threads: int | None = None, registry: Path | None = None, every_s: float = 2.0):
        self.cores = my_cores()
        slurm = os.environ.get("SLURM_CPUS_PER_TASK")
        self.budget = min(len(self.cores), int(slurm)) if slurm and slurm.isdigit() else len(self.cores)
        self.fixed = num_threads or (int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "")
                                     .isdigit() else None)
        self.registry = registry or cache_root() / "running"
        self.entry = self.registry / f"{socket.gethostname()}-{os.getpid()}.json"
        self.every_s, self.checked, self.threads = every_s, 0.0, None

    def claim(self) -> int:
        """Register this run and take its share; returns the thread count."""
        if self.fixed is None:
            self.registry.mkdir(parents=True, exist_ok=True)
            self.entry.write_text(json.dumps({"pid": os.getpid(), "cores": sorted(self.cores)}))
            atexit.register(self.release)
        return self.adjust(force=True)

    def sharing(self) -> int:
        """Live runs on this host whose cores overlap ours, this one included."""
        host, count = socket.gethostname(), 0
        for path in self.registry.glob(f"{host}-*.json"):
            try:
                other = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if other["pid"] == os.getpid() or (pid_alive(other["pid"]) and self.cores & set(other["cores"])):
                count += 1
            elif not pid_alive(other["pid"]):
                path.unlink(missing_ok=True)  # a run that died without cleaning up
        return max(count, 1)

    def adjust(self, force: bool = False) -> int:
        """Set the thread count for the runs sharing the cores now (at most every `every_s` seconds)."""
        now = time.monotonic()
        if not force and now - self.checked < self.every_s:
            return self.threads
        self.checked = now
        threads = self.fixed or max(1, self.budget // self.sharing())
        if threads != self.threads:
            torch.set_num_threads(threads)
            if self.threads is not None:
                log.info("%d threads now (runs sharing these cores changed)", threads)
            self.threads = threads
        return threads

    def release(self) -> None:
        self.entry.unlink(missing_ok=True)


def pick_gpu() -> None:
    """A local sweep's job takes its own GPU on a machine with several."""
    from .sweeping import sweep_identity

    if "CUDA_VISIBLE_DEVICES" in os.environ or "WORLD_SIZE" in os.environ or not torch.cuda.is_available():
        return
    count, sweep = torch.cuda.device_count(), sweep_identity()
    if count > 1 and sweep:
        torch.cuda.set_device(sweep["job_num"] % count)
        log.info("sweep job %d takes GPU %d of %d", sweep["job_num"], sweep["job_num"] % count, count)


def _timed(commands: list[list[str]], together: bool, cwd: Path) -> float:
    import subprocess
    import sys

    started = time.perf_counter()
    procs = []
    for n, command in enumerate(commands):
        log = open(cwd / f"bench-{time.time_ns()}-{n}.log", "w+")  # a file: a pipe nobody reads would block the run
        procs.append((subprocess.Popen([sys.executable, "-m", "tinv.train", *command], cwd=cwd,
                                       stdout=subprocess.DEVNULL, stderr=log), log))
        if not together:
            procs[-1][0].wait()
    for proc, log in procs:
        if proc.wait() != 0:
            log.seek(0)
            raise RuntimeError(log.read()[-2000:])
        log.close()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """`python -m tinv.resources WORK_DIR`: toy runs one after another, side by side, and as a joblib sweep; prints
    the wall times (a benchmark of how runs share the machine, not a test)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tinv.resources", description=main.__doc__.split(";")[0])
    parser.add_argument("work_dir")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    work = Path(args.work_dir).expanduser().resolve()
    common = [f"train.max_steps={args.steps}", "logger=none", "~callbacks.concept"]  # scoring off: training only
    run = lambda name, seed: [*common, f"train.seed={seed}", f"hydra.run.dir={work / name}"]  # noqa: E731
    result = {"steps": args.steps, "cores": len(my_cores())}
    print(f"{args.steps}-step toy runs on {result['cores']} cores (seconds of wall time):", flush=True)
    result["one_after_the_other_2"] = _timed([run("seq-a", 1), run("seq-b", 2)], False, work)
    result["side_by_side_2"] = _timed([run("par-a", 1), run("par-b", 2)], True, work)
    result["one_after_the_other_4"] = _timed([run(f"seq4-{s}", s) for s in range(4)], False, work)
    result["joblib_4_jobs_2_workers"] = _timed([["-m", *common, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                                 "train.seed=0,1,2,3", f"hydra.sweep.dir={work / 'joblib'}"]], False,
                                               work)
    result["side_by_side_vs_sequential"] = result["side_by_side_2"] / result["one_after_the_other_2"]
    result["joblib_speedup"] = result["one_after_the_other_4"] / result["joblib_4_jobs_2_workers"]
    for key, value in result.items():
        print(f"{key:<28} {value:.2f}" if isinstance(value, float) else f"{key:<28} {value}")
    if args.out:
        from .atomic import write_text_atomic

        write_text_atomic(Path(args.out), json.dumps(result, indent=1) + "\n")
    return 0 if result["side_by_side_vs_sequential"] <= 1.0 and result["joblib_speedup"] >= 1.4 else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
