"""A run's share of the machine.

CPU threads: a run takes `train.num_threads` (a command's `--threads`, or TINV_THREADS for every command) when
given. Otherwise it takes what is free of its cores, rechecked every few seconds:
- its cores: the affinity mask, at most SLURM_CPUS_PER_TASK and a container's CPU quota;
- shared with the other tinv runs registered on those cores in $TINV_CACHE/running (two toy runs side by side with
  every thread each took 2.7x longer than one after the other, measured here), at most OMP_NUM_THREADS (a
  launcher's share, or a user's limit);
- and no more threads than cores left idle by everything else on them (/proc/stat, less this process's own time):
  OpenMP threads that wait for a core another program holds stall each other, so a default run beside a busy
  process took 11x longer with 2 threads than with 1 (measured here).

GPUs: in a local sweep on a machine with several GPUs each job takes GPU (job number mod count), unless the user
chose devices (CUDA_VISIBLE_DEVICES) or the run is one process of a distributed launch.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import socket
import time
from pathlib import Path

from .cache import cache_root
from .errors import ConfigError

log = logging.getLogger(__name__)

IDLE_SLACK = 0.3  # cores: background noise (a daemon, a logger) that should not cost a thread


def my_cores() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def env_threads() -> int | None:
    """TINV_THREADS: a fixed thread count for every tinv command (a run's own train.num_threads or --threads wins)."""
    value = os.environ.get("TINV_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"TINV_THREADS={value!r} is not a thread count; set a whole number of at least 1, or unset "
                          "it to use the cores other programs leave free")
    return int(value)


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """A container's CPU limit in whole cores (cgroup v2 cpu.max or v1 cfs quota), None when unlimited."""
    try:
        if (root / "cpu.max").is_file():
            quota, period = (root / "cpu.max").read_text().split()[:2]
        else:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def core_budget(cores: set[int]) -> int:
    """The cores this process may use: its affinity mask, at most SLURM's cpus per task and a container's quota."""
    caps = [len(cores), _int_env("SLURM_CPUS_PER_TASK"), cpu_quota()]
    return max(1, min(c for c in caps if c))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CoreLoad:
    """How many of `cores` other programs kept busy since the last reading: the cores' busy time (/proc/stat) less
    this process's own CPU time (every thread of it), in cores. None where /proc/stat cannot be read.

    A new one starts from the process's latest reading of the same cores when that is at most `FRESH_S` old (the
    one taken at import, or by the run before in the same process), so its first look needs no wait of its own."""

    FRESH_S = 30.0
    _latest: dict = {}  # (stat file, cores) -> (monotonic time, reading): the process's latest reading

    def __init__(self, cores: set[int], stat: Path = Path("/proc/stat")):
        self.cores, self.stat = cores, stat
        self.key = (str(stat), frozenset(cores))
        when, reading = self._latest.get(self.key, (None, None))
        self.last = reading if when is not None and time.monotonic() - when <= self.FRESH_S else self._read()

    def _read(self) -> tuple[int, int, float] | None:
        try:
            lines = self.stat.read_text().splitlines()
        except OSError:
            return None
        busy = total = 0
        for line in lines:
            name, *ticks = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cores:
                values = [int(t) for t in ticks[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(values)
                busy += sum(values) - values[3] - values[4]
        own = os.times()
        if not total:
            return None
        CoreLoad._latest[self.key] = (time.monotonic(), (busy, total, own.user + own.system))
        return busy, total, own.user + own.system

    def seconds_since(self) -> float:
        """Wall seconds covered since the last reading (0 when unknown)."""
        now = self._read()
        if now is None or self.last is None:
            return 0.0
        return (now[1] - self.last[1]) / os.sysconf("SC_CLK_TCK") / len(self.cores)

    def others(self) -> float | None:
        """Cores' worth of work not ours since the last reading; the reading restarts."""
        now, last = self._read(), self.last
        self.last = now
        if now is None or last is None or now[1] <= last[1]:
            return None
        share_busy = (now[0] - last[0]) / (now[1] - last[1])  # of the cores' time
        seconds = (now[1] - last[1]) / os.sysconf("SC_CLK_TCK") / len(self.cores)
        return max(0.0, share_busy * len(self.cores) - (now[2] - last[2]) / seconds)


CoreLoad(my_cores())  # the first reading, at import: a command's first look at the load spans its start-up


class ThreadShare:
    """This process's thread count: fixed (`num_threads`), or its cores shared with the tinv runs on them and
    limited to the cores other programs leave idle. `register=False` for a process that only starts tinv runs one
    at a time and waits for them (they must not count it)."""

    FIRST_LOOK_S = 0.3  # how long the first reading of the cores' load lasts

    def __init__(self, num_threads: int | None = None, registry: Path | None = None, every_s: float = 2.0,
                 register: bool = True, load: CoreLoad | None = None):
        self.cores = my_cores()
        self.budget = core_budget(self.cores)
        self.cap = _int_env("OMP_NUM_THREADS")  # a launcher's share (hydra's joblib workers) or a user's limit
        self.fixed = num_threads or env_threads()
        self.registry = registry or cache_root() / "running"
        self.entry = self.registry / f"{socket.gethostname()}-{os.getpid()}.json"
        self.register = register and self.fixed is None
        self.load = load or CoreLoad(self.cores)
        self.every_s, self.checked, self.threads = every_s, 0.0, None
        self.idle: float | None = None  # cores other programs left idle at the last look

    def claim(self) -> int:
        """Register this run and take its share (follow_load() adjusts it from then on); returns the thread count."""
        global _claimed
        _claimed = self
        if self.register:
            self.registry.mkdir(parents=True, exist_ok=True)
            self.entry.write_text(json.dumps({"pid": os.getpid(), "cores": sorted(self.cores)}))
            atexit.register(self.release)
        looked = self.load.seconds_since() if self.fixed is None else self.FIRST_LOOK_S
        if looked < self.FIRST_LOOK_S:
            time.sleep(self.FIRST_LOOK_S - looked)
        return self.adjust(force=True)

    def sharing(self) -> int:
        """Live runs on this host whose cores overlap ours, this one included."""
        host, count = socket.gethostname(), 0 if self.register else 1
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

    def wanted(self) -> int:
        """The thread count for now: the cores shared among the tinv runs on them, at most the cores idle."""
        share = max(1, min(self.budget // self.sharing(), self.cap or self.budget))
        others = self.load.others()
        if others is None:
            return share
        self.idle = len(self.cores) - others
        return max(1, min(share, math.floor(self.idle + IDLE_SLACK)))

    def adjust(self, force: bool = False) -> int:
        """Set the thread count for what shares the cores now (at most every `every_s` seconds)."""
        now = time.monotonic()
        if not force and now - self.checked < self.every_s:
            return self.threads
        self.checked = now
        threads = self.fixed or self.wanted()
        if threads != self.threads:
            import torch

            torch.set_num_threads(threads)
            if self.threads is not None:
                log.info("%d thread%s now (%s)", threads, "s"[:threads > 1], self.reason())
            self.threads = threads
        return threads

    def describe(self) -> str:
        """"2 threads", "1 thread (fixed)", or why fewer than the cores: "1 thread (1.9 of 2 cores busy with other
        processes)" (other tinv runs are processes too)."""
        text = f"{self.threads} thread{'s'[:self.threads > 1]}"
        if self.fixed:
            return f"{text} (fixed)"
        return text if self.threads >= self.budget else f"{text} ({self.reason()})"

    def reason(self) -> str:
        """Why the thread count is what it is, in words."""
        if self.fixed:
            return "fixed"
        runs = self.sharing()
        parts = [f"{runs} tinv runs share {self.budget} cores"] if runs > 1 else []
        if self.cap and self.cap < self.budget:
            parts.append(f"OMP_NUM_THREADS={self.cap}")
        if self.idle is not None and self.idle < len(self.cores) - IDLE_SLACK:
            parts.append(f"{len(self.cores) - self.idle:.1f} of {len(self.cores)} cores busy with other processes")
        return "; ".join(parts) or "the cores' load changed"

    def release(self) -> None:
        global _claimed
        if _claimed is self:
            _claimed = None
        self.entry.unlink(missing_ok=True)


_claimed: ThreadShare | None = None  # the share this process claimed last


def follow_load() -> None:
    """For a long loop (pretraining, say): the share this process claimed, if any, follows what else runs on its
    cores (at most every few seconds; nothing when no share was claimed)."""
    if _claimed is not None:
        _claimed.adjust()


def follow_load_in_pipeline(pipe, step: int, timestep, tensors: dict) -> dict:
    """follow_load() as a diffusers pipeline's `callback_on_step_end`: long sampling follows the load too."""
    follow_load()
    return tensors


def thread_count(text: str) -> int:
    """argparse type of `--threads`: a whole number of at least 1."""
    import argparse

    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a thread count; give a whole number of at least 1, or "
                                         "leave --threads out to use the cores other programs leave free")
    return int(text)


def add_threads_option(parser) -> None:
    """The `--threads` option of every command that samples or trains (the rule in this module's docstring)."""
    parser.add_argument("--threads", type=thread_count, metavar="N",
                        help="CPU threads (default: this process's cores, shared with other tinv runs and never "
                             "more than other programs leave idle; rechecked as that changes)")


def pick_gpu() -> None:
    """A local sweep's job takes its own GPU on a machine with several."""
    import torch

    from .sweeping.jobs import sweep_identity

    if "CUDA_VISIBLE_DEVICES" in os.environ or "WORLD_SIZE" in os.environ or not torch.cuda.is_available():
        return
    count, sweep = torch.cuda.device_count(), sweep_identity()
    if count > 1 and sweep:
        torch.cuda.set_device(sweep["job_num"] % count)
        log.info("sweep job %d takes GPU %d of %d", sweep["job_num"], sweep["job_num"] % count, count)
