"""Faults a real machine meets, injected: a crash keeps the last complete step and resumes exactly, a failing
dashboard never stops training, a full disk is one line, no file in the data folder stops or hangs a run, and a
killed sweep worker fails alone."""

import errno
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import cli, train, with_test_model
from tinv.errors import ConfigError
from tinv.rescue import RunFailed

ARGS = ["train.max_steps=8", "token.num_vectors=2", "train.batch_size=2", "scheduler=cosine",
        "scheduler.num_warmup_steps=2", "val.every_n_steps=3"]


def step_of(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["tinv.step"])


def steps_logged(run_dir: Path) -> list[int]:
    return sorted({json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if "train/loss" in x})


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run every recovered one must equal."""
    run_dir = tmp_path_factory.mktemp("whole")
    train(run_dir, ARGS)
    return load_file(str(run_dir / "mychar.safetensors"))["emb_params"]


def user_module(folder: Path, source: str) -> None:
    """A module of the user's own callbacks, importable from the folder tinv-train runs in."""
    (folder / "faults_here.py").write_text(textwrap.dedent(source))


# ---- a crash keeps the last complete step ----------------------------------------------------------------------------

def test_a_callback_failing_at_step_k_keeps_step_k_minus_1_and_resume_equals_uninterrupted(tmp_path, whole,
                                                                                             monkeypatch):
    from tinv.callbacks import EmbeddingFiles

    def boom(self, run, step):
        if step.step == 5:
            raise RuntimeError("boom")

    monkeypatch.setattr(EmbeddingFiles, "on_step_end", boom)
    run_dir = tmp_path / "run"
    with pytest.raises(RunFailed, match=r"RuntimeError: boom at step 5; kept step 4: mychar.safetensors and the "
                                        r"state in .* - continue with tinv-train resume=") as failed:
        train(run_dir, ARGS)
    assert step_of(run_dir / "mychar.safetensors") == 4
    assert json.loads((run_dir / "state" / "state.json").read_text())["step"] == 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["ok"], summary["kept_step"], summary["resume"]) == (False, 4, failed.value.resume)
    assert "boom" in summary["error"]
    monkeypatch.undo()
    train(run_dir, [*ARGS, f"resume={run_dir}"])
    torch.testing.assert_close(load_file(str(run_dir / "mychar.safetensors"))["emb_params"], whole, rtol=0,
                               atol=1e-6)
    assert steps_logged(run_dir) == list(range(1, 9))


class FailAtTheEnd:
    """A callback whose final work fails (as a scorer or an upload might), after every step is done."""

    def on_end(self, run) -> None:
        raise RuntimeError("the final scoring failed")


def test_a_failure_after_the_last_step_keeps_the_last_step(tmp_path, whole):
    run_dir = tmp_path / "run"
    with pytest.raises(RunFailed, match="the final scoring failed after the last step; kept step 8"):
        train(run_dir, [*ARGS, "+callbacks.end._target_=test_faults.FailAtTheEnd"])
    kept = load_file(str(run_dir / "mychar.safetensors"))["emb_params"]
    torch.testing.assert_close(kept, whole, rtol=0, atol=1e-6)
    assert step_of(run_dir / "mychar.safetensors") == 8
    assert json.loads((run_dir / "state" / "state.json").read_text())["step"] == 8


def test_the_errors_a_sweep_worker_sends_back_survive_pickling(tmp_path):
    from tinv.trainer import Interrupted

    failed = pickle.loads(pickle.dumps(RunFailed("OSError: disk full at step 3; kept step 2", "resume=/x")))
    assert (str(failed), failed.resume) == ("OSError: disk full at step 3; kept step 2", "resume=/x")
    stopped = pickle.loads(pickle.dumps(Interrupted(signal.SIGTERM, tmp_path)))
    assert str(stopped) == str(Interrupted(signal.SIGTERM, tmp_path)) and stopped.signal == "SIGTERM"


def test_a_metrics_line_cut_short_does_not_stop_a_resume(tmp_path, caplog):
    run_dir = tmp_path / "run"
    common = ["train.max_steps=4", "save.state_every_n_steps=2"]
    train(run_dir, common)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "train/lo')  # what a full disk or a kill leaves
    with caplog.at_level(logging.WARNING, logger="tinv.tracking"):
        train(run_dir, ["train.max_steps=6", "save.state_every_n_steps=2", f"resume={run_dir}"])
    assert "cut short" in caplog.text
    assert steps_logged(run_dir) == list(range(1, 7))


def test_the_cli_ends_a_crash_with_one_line_and_the_traceback_in_the_log(tmp_path):
    user_module(tmp_path, """
        class FailAt:
            def on_step_end(self, run, step):
                if step.step == 3:
                    raise ValueError("a bug in my callback")
    """)
    run_dir = tmp_path / "run"
    proc = cli(["logger=none", "train.max_steps=6", "+callbacks.bug._target_=faults_here.FailAt",
                f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tinv-train: error: ValueError: a bug in my callback at step 3; kept step 2")
    assert f"resume={run_dir}" in last
    assert "Traceback" in (run_dir / "train.log").read_text()  # for whoever debugs it
    assert step_of(run_dir / "mychar.safetensors") == 2


# ---- the dashboard is never fatal --------------------------------------------------------------------------------------

def test_killing_the_wandb_service_mid_run_does_not_stop_training(tmp_path):
    user_module(tmp_path, """
        import os, signal

        class KillWandb:  # the wandb service is a child process of the run
            def on_step_end(self, run, step):
                if step.step != 3:
                    return
                for pid in os.listdir("/proc"):
                    try:
                        stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                        cmd = open(f"/proc/{pid}/cmdline").read()
                    except (OSError, ValueError):
                        continue
                    if int(stat[1]) == os.getpid() and "wandb" in cmd:
                        os.kill(int(pid), signal.SIGKILL)
    """)
    run_dir = tmp_path / "run"
    proc = cli(["logger=wandb", "logger.mode=offline", "train.max_steps=8", "+callbacks.kill._target_=faults_here.KillWandb",
                f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "Traceback" not in said and said.count("wandb failed") == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] and summary["step"] == 8 and summary["wandb_stopped_at_step"] == 4
    assert "Connection" in summary["wandb_error"]
    assert steps_logged(run_dir) == list(range(1, 9))
    assert step_of(run_dir / "mychar.safetensors") == 8
    kept = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))  # what wandb saved before, for wandb sync
    assert kept and kept[0].stat().st_size > 0


def test_wandb_failing_to_start_leaves_training_to_metrics_jsonl(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def no_service(**kwargs):
        raise TimeoutError("wandb.init timed out after 90 s")

    monkeypatch.setattr(wandb, "init", no_service)
    from tinv.train import run
    from conftest import compose

    run(compose(["logger=wandb", "logger.mode=offline", "train.max_steps=3"]), run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["wandb_stopped_at_step"] == 0 and "TimeoutError" in summary["wandb_error"]
    assert steps_logged(tmp_path) == [1, 2, 3]


# ---- disk space ----------------------------------------------------------------------------------------------------------

def test_no_room_on_disk_is_one_line_before_the_first_step(tmp_path, monkeypatch):
    import shutil

    from tinv import diskspace

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(ConfigError, match=r"not enough disk space: .* has 1000 B free and this run writes up to "
                                          r".*files .*state .*previews"):
        train(tmp_path / "run", ["train.max_steps=4", "sample.every_n_steps=2"])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training


def test_what_a_run_will_write_counts_files_previews_and_the_latent_cache(tmp_path):
    from types import SimpleNamespace

    from conftest import compose
    from tinv.diskspace import planned_writes

    params = [torch.zeros(1000)]
    run = SimpleNamespace(parameters=lambda: params, max_steps=100, step=0, run_dir=tmp_path)
    quiet = planned_writes(run, compose(["train.max_steps=100"]))[str(tmp_path)]
    busy = planned_writes(run, compose(["train.max_steps=100", "save.every_n_steps=10", "sample.every_n_steps=10"]))
    busy = busy[str(tmp_path)]
    assert busy["files"] > 5 * quiet["files"] and busy["previews"] > 10 * 64 * 64 * 3 and quiet["previews"] == 0
    subset = SimpleNamespace(flip_aug=True, random_crop=False, color_aug=False)
    run.dataset = SimpleNamespace(subsets=[subset], samples=[SimpleNamespace(bucket=(64, 96))] * 3)
    run.backbone = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(latent_channels=4)))
    cached = compose(["train.max_steps=100", "train.cache_latents_to_disk=true", f"data.cache_dir={tmp_path / 'c'}"])
    assert planned_writes(run, cached)[str(tmp_path / "c")]["latent cache"] == 3 * (2 * 4 * 8 * 12 * 4 + 4096)
    subset.random_crop = True  # the pixels change every step: nothing is cached
    assert str(tmp_path / "c") not in planned_writes(run, cached)


def test_a_full_disk_mid_run_keeps_the_last_step_in_the_temp_folder(tmp_path, whole, monkeypatch):
    from tinv.trained import token as token_part

    real = token_part.save_embedding
    run_dir = tmp_path / "run"
    full = []

    def disk_full(path, *args, **kwargs):
        if "step00000004" in str(path):  # the disk fills up at step 4: from then on nothing fits in the run folder
            full.append(path)
        if full and Path(path).parent == run_dir:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(token_part, "save_embedding", disk_full)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "systemp"))
    (tmp_path / "systemp").mkdir()
    with pytest.raises(RunFailed, match=r"OSError: \[Errno 28\] No space left on device: .* at step 4; kept step 3: "
                                        r"mychar.safetensors and the state in .*systemp.*the run folder could not "
                                        r"take them: No space left on device") as failed:
        train(run_dir, [*ARGS, "save.every_n_steps=2"])
    kept = next((tmp_path / "systemp").glob("tinv-kept-mychar-*"))
    assert step_of(kept / "mychar.safetensors") == 3 and failed.value.resume == f"resume={kept}"
    assert not list(run_dir.glob(".*.tmp"))  # no half-written file
    monkeypatch.undo()
    train(kept, [*ARGS, "save.every_n_steps=2", f"resume={kept}"])
    torch.testing.assert_close(load_file(str(kept / "mychar.safetensors"))["emb_params"], whole, rtol=0, atol=1e-6)


def test_a_real_full_disk_is_one_line_and_the_work_survives(tmp_path):
    """A 8 MB tmpfs as the run folder, filled by a callback at step 3 (root and mount rights needed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root and mount rights; the patched test covers the logic")
    try:
        user_module(tmp_path, """
            import os, shutil

            class FillDisk:
                def on_step_end(self, run, step):
                    if step.step == 3:
                        free = shutil.disk_usage(run.run_dir).free
                        with open(run.run_dir.parent / "filler", "wb") as f:
                            f.write(b"0" * (free - 512))
        """)
        env = {**os.environ, "TMPDIR": str(tmp_path)}
        proc = subprocess.run([sys.executable, "-m", "tinv", *with_test_model([
            "logger=none", "train.max_steps=40", "save.every_n_steps=4", "+callbacks.fill._target_=faults_here.FillDisk",
            f"hydra.run.dir={disk / 'run'}"])], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert "No space left on device" in last and "at step 4; kept step 3" in last, last
        kept = next(tmp_path.glob("tinv-kept-mychar-*"))
        assert step_of(kept / "mychar.safetensors") == 3 and (kept / "state" / "state.json").is_file()
        assert not list((disk / "run").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ---- no file in the data folder stops or hangs a run ----------------------------------------------------------------

def _images(folder: Path, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (64, 64), (40 * i, 100, 200)).save(folder / f"{i:03d}.png")
    return folder


def test_an_image_bomb_is_skipped_with_a_warning_or_read_when_the_limit_allows(tmp_path, caplog):
    from tinv.data.images import probe

    folder = _images(tmp_path / "imgs")
    Image.new("1", (16000, 16000)).save(folder / "bomb.png")  # 256 Mpx, a few hundred KB on disk
    with caplog.at_level(logging.WARNING):
        result = train(tmp_path / "run", ["data=folder", f"data.image_dir={folder}", "train.max_steps=2"])
    assert result.step == 2
    assert f"skipping {folder / 'bomb.png'}: 16000x16000 is 256,000,000 pixels" in caplog.text
    assert "data.max_image_pixels" in caplog.text
    assert probe(folder / "bomb.png", max_pixels=300_000_000) == (16000, 16000)  # a raised limit reads it
    with pytest.raises(ConfigError, match="no usable image"):  # and a low one refuses every image
        train(tmp_path / "low", ["data=folder", f"data.image_dir={folder}", "data.max_image_pixels=1000"])


def test_fifos_sockets_and_link_loops_are_skipped_with_a_warning_and_never_hang(tmp_path):
    folder = _images(tmp_path / "imgs")
    os.mkfifo(folder / "fifo.png")
    os.mkfifo(folder / "000.txt")  # the caption of a real image: reading it would block forever
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "socket.png"))
    os.symlink("loop.png", folder / "loop.png")
    os.symlink("missing.png", folder / "dangling.png")
    (folder / "sub").mkdir()
    os.symlink("..", folder / "sub" / "back")  # a folder loop
    try:
        proc = cli(["logger=none", "data=folder", f"data.image_dir={folder}", "train.max_steps=2",
                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=180)
    finally:
        sock.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"skipping {folder / 'fifo.png'}: a FIFO" in log and f"skipping {folder / 'socket.png'}: a socket" in log
    assert f"skipping {folder / 'loop.png'}: a broken or looping link" in log
    assert f"skipping {folder / 'dangling.png'}: a broken or looping link" in log
    assert f"skipping {folder / '000.txt'}: a FIFO" in log
    assert "4 images" in log  # each real image once, though sub/back leads to the folder again


# ---- a killed sweep worker fails alone ----------------------------------------------------------------------------------

@pytest.mark.slow  # a parallel sweep with a worker killed (about 20 s); test_sweeps runs joblib sweeps by default
def test_a_killed_joblib_worker_fails_its_job_alone(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    user_module(tmp_path, """
        import os, signal

        class KillSeed2:
            def on_step_end(self, run, step):
                if run.seed == 2 and step.step == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
    """)
    sweep = tmp_path / "sweep"
    proc = cli(["-m", "logger=none", "train.max_steps=4", "train.seed=1,2,3", "hydra/launcher=joblib",
                "hydra.launcher.n_jobs=2", "+callbacks.kill._target_=faults_here.KillSeed2",
                f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode != 0  # the sweep says a job failed...
    found = {yaml.safe_load((p / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["num"]:
             json.loads((p / "summary.json").read_text()) for p in sweep.iterdir() if (p / "summary.json").is_file()}
    assert sorted(found) == [0, 1, 2]
    assert not found[1]["ok"] and "worker process died" in found[1]["error"]
    assert found[0]["ok"] and found[2]["ok"]  # ...and the others finished
    assert len(list(sweep.glob("*/mychar.safetensors"))) == 2
    assert "is validated against ConfigStore schema" not in proc.stderr
