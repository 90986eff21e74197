"""A run's threads: fixed when asked; else its cores shared with the tinv runs on them, never more than other programs
leave idle."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from tinv.errors import ConfigError
from tinv.resources import IDLE_SLACK, CoreLoad, ThreadShare, cpu_quota, my_cores


class FakeStat:
    """A /proc/stat of this process's cores whose counters the test advances: `busy` of every 100 ticks per core."""

    def __init__(self, path):
        self.path, self.cores, self.ticks = path, sorted(my_cores()), {"busy": 500, "idle": 500}
        self.write()

    def advance(self, busy_share: float, ticks: int = 100_000) -> None:
        self.ticks["busy"] += int(ticks * busy_share)
        self.ticks["idle"] += ticks - int(ticks * busy_share)
        self.write()

    def write(self) -> None:
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"] + [f"cpu{c} {self.ticks['busy']} 0 0 {self.ticks['idle']} 0 0 0 0 0 0"
                                                for c in self.cores]
        self.path.write_text("\n".join(lines) + "\nintr 0\n")


def test_runs_on_the_same_cores_split_them_and_dead_ones_are_forgotten(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("TINV_THREADS", raising=False)
    before = torch.get_num_threads()
    cores = sorted(my_cores())
    stat = FakeStat(tmp_path / "stat")  # nothing else on the cores: the load never limits here
    idle = lambda: CoreLoad(set(cores), stat.path)  # noqa: E731
    registry = tmp_path / "running"
    # a live process of our own: the parent may be init itself (pid 1, the "elsewhere" entry) under nohup
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        share = ThreadShare(registry=registry, every_s=0, load=idle())
        stat.advance(0.0)
        assert share.claim() == len(cores)  # alone: every core
        host = share.entry.name.rsplit("-", 1)[0]
        other = registry / f"{host}-{live.pid}.json"  # a live process on the same cores
        other.write_text(json.dumps({"pid": live.pid, "cores": cores}))
        (registry / f"{host}-999999999.json").write_text(json.dumps({"pid": 999999999, "cores": cores}))  # dead
        elsewhere = registry / f"{host}-1.json"
        elsewhere.write_text(json.dumps({"pid": 1, "cores": [max(cores) + 1]}))  # alive, on other cores
        stat.advance(0.0)
        assert share.adjust() == max(1, len(cores) // 2) == torch.get_num_threads()
        assert not (registry / f"{host}-999999999.json").exists()
        other.unlink()  # the other run ended: take the cores back
        stat.advance(0.0)
        assert share.adjust() == len(cores)
        share.release()
        assert not share.entry.exists()
        assert ThreadShare(3, registry=registry).claim() == 3 and not list(registry.glob("*-%d.json" % os.getpid()))
        monkeypatch.setenv("TINV_THREADS", "2")  # the same for every tinv command, unless a run says otherwise
        assert ThreadShare(registry=registry).claim() == 2 and ThreadShare(1, registry=registry).claim() == 1
        for bad in ("0", "x", "1.5"):  # said, not ignored
            monkeypatch.setenv("TINV_THREADS", bad)
            with pytest.raises(ConfigError, match=rf"TINV_THREADS='{re.escape(bad)}' is not a thread count"):
                ThreadShare(registry=registry)
        monkeypatch.delenv("TINV_THREADS")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a launcher's share (joblib's workers) caps it
        assert ThreadShare(registry=registry, load=idle()).claim() == 1
    finally:
        live.kill()
        live.wait()
        torch.set_num_threads(before)


@pytest.mark.parametrize("busy_cores", [0.0, 0.2, 0.8, 1.0, 1.5, 2.0, 3.0])
def test_threads_never_outnumber_the_cores_other_programs_leave_idle(busy_cores, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TINV_THREADS", raising=False)
    cores = len(my_cores())
    stat = FakeStat(tmp_path / "stat")
    share = ThreadShare(registry=tmp_path / "running", every_s=0, load=CoreLoad(my_cores(), stat.path))
    stat.advance(min(1.0, busy_cores / cores))
    threads = share.claim()
    idle = cores - min(busy_cores, cores)
    assert threads == max(1, min(share.budget, int(idle + IDLE_SLACK)))
    if threads < share.budget:
        assert "busy with other processes" in share.describe()
    share.release()


def test_a_program_keeping_the_cores_busy_takes_threads_away_and_gives_them_back(tmp_path, monkeypatch):
    """The real /proc/stat: a busy loop on every core (not a tinv run, so the registry knows nothing of it)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TINV_THREADS", raising=False)
    cores = len(my_cores())
    if cores < 2 or not os.path.exists("/proc/stat"):
        pytest.skip("needs two cores and /proc/stat")
    before = torch.get_num_threads()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.5)
        share = ThreadShare(registry=tmp_path, every_s=0, load=CoreLoad(my_cores()))
        time.sleep(1.0)
        assert share.claim() == 1, share.describe()
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    try:
        time.sleep(1.0)
        assert share.adjust() == share.budget  # the program ended: the cores are ours again
    finally:
        share.release()
        torch.set_num_threads(before)


def test_a_containers_cpu_quota_limits_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus=1.5
    assert cpu_quota(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1) == 1
