"""Runs that share cores split them: the thread count follows the runs registered on the same cores."""

import json
import os
import subprocess
import sys

import torch

from tinv.resources import ThreadShare, my_cores


def test_runs_on_the_same_cores_split_them_and_dead_ones_are_forgotten(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    before = torch.get_num_threads()
    cores = sorted(my_cores())
    # a live process of our own: the parent may be init itself (pid 1, the "elsewhere" entry) under nohup
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        share = ThreadShare(registry=tmp_path, every_s=0)
        assert share.claim() == len(cores)  # alone: every core
        host = share.entry.name.rsplit("-", 1)[0]
        other = tmp_path / f"{host}-{live.pid}.json"  # a live process on the same cores
        other.write_text(json.dumps({"pid": live.pid, "cores": cores}))
        (tmp_path / f"{host}-999999999.json").write_text(json.dumps({"pid": 999999999, "cores": cores}))  # dead
        elsewhere = tmp_path / f"{host}-1.json"
        elsewhere.write_text(json.dumps({"pid": 1, "cores": [max(cores) + 1]}))  # alive, on other cores
        assert share.adjust() == max(1, len(cores) // 2) == torch.get_num_threads()
        assert not (tmp_path / f"{host}-999999999.json").exists()
        other.unlink()  # the other run ended: take the cores back
        assert share.adjust() == len(cores)
        share.release()
        assert not share.entry.exists()
        assert ThreadShare(3, registry=tmp_path).claim() == 3 and not list(tmp_path.glob("*-%d.json" % os.getpid()))
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a launcher's share (joblib's workers) is kept
        assert ThreadShare(registry=tmp_path).claim() == 1
    finally:
        live.kill()
        live.wait()
        torch.set_num_threads(before)
