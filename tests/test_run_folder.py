"""A run owns its folder: names never collide, a folder with a run in it is never taken over, a live run's folder
is nobody else's (not a second run's, not a resume's, not resume=latest's), and a resume changes nothing in the
folder until it is accepted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import with_test_model
from tinv.errors import ConfigError
from tinv.ownership import LOCK_NAME, hold, holder, let_go


def tinv(args, cwd, **kw):
    return subprocess.Popen([sys.executable, "-m", "tinv", *with_test_model(args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def holding(folder):
    """Another process holding `folder` the way a run does (until it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from tinv.ownership import hold; "
                             "hold(sys.argv[1]); print('held', flush=True); time.sleep(300)", str(folder)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_runs_started_together_get_their_own_folders(tmp_path):
    procs = [tinv(["train.max_steps=2", "logger=none", f"train.seed={seed}"], tmp_path) for seed in (1, 2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    runs = sorted(p.parent for p in tmp_path.glob("outputs/*/*/summary.json"))
    assert len(runs) == 2 and all((run / "mychar.safetensors").is_file() for run in runs)
    seeds = sorted(json.loads((run / ".hydra" / "config.yaml").read_text().split("seed: ")[1].split()[0])
                   for run in runs)
    assert seeds == [1, 2]  # each folder holds one run's files, not a mix


def finished_run(tmp_path):
    """A finished two-step run, and a check that its files are as it left them."""
    run = tmp_path / "run"
    first = tinv(["train.max_steps=2", "logger=none", f"hydra.run.dir={run}"], tmp_path)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]

    def snapshot():
        return {p.name: p.read_bytes() for p in [*(run / ".hydra").iterdir(), run / "summary.json",
                                                 run / "metrics.jsonl", run / "mychar.safetensors"]}

    record = snapshot()
    return run, lambda: snapshot() == record


def test_a_folder_with_a_run_in_it_is_never_taken_over(tmp_path):
    run, unchanged = finished_run(tmp_path)
    second = tinv(["train.max_steps=2", "logger=none", f"hydra.run.dir={run}"], tmp_path)
    assert second.wait(timeout=300) == 2
    err = second.stderr.read()
    assert f"hydra.run.dir={run} already holds a run" in err and f"resume={run}" in err
    assert len(err.strip().splitlines()) == 1 and unchanged()


@pytest.mark.slow  # three runs, about 15 s; the sibling above checks the folder is refused and left as it was
def test_a_failed_resume_changes_nothing_and_the_plain_resume_still_works(tmp_path):
    run, unchanged = finished_run(tmp_path)
    wrong = tinv([f"resume={run}", "model=tiny_sdxl", "train.max_steps=3"], tmp_path)  # another model: it fails
    assert wrong.wait(timeout=300) != 0 and unchanged(), wrong.stderr.read()[-2000:]
    again = tinv([f"resume={run}", "train.max_steps=3"], tmp_path)  # so the plain resume still works
    assert again.wait(timeout=300) == 0, again.stderr.read()[-2000:]
    assert "train.max_steps=3" in (run / ".hydra" / "overrides.yaml").read_text()  # recorded once accepted


def test_a_live_runs_folder_is_nobody_elses(tmp_path, monkeypatch):
    from tinv.state import find_state
    from tinv.commandline import claim_run_folder

    outputs = tmp_path / "outputs" / "day"
    older, live = outputs / "older", outputs / "live"
    for n, folder in enumerate((older, live)):  # two saved states; the live one is newer
        (folder / "state").mkdir(parents=True)
        (folder / "state" / "state.json").write_text(json.dumps({"step": 1}))
        os.utime(folder / "state" / "state.json", (time.time() + n, time.time() + n))
    owner = holding(live)
    try:
        assert holder(live).startswith(f"pid {owner.pid} on ")
        for args in ([f"hydra.run.dir={live}"], [f"resume={live}", f"hydra.run.dir={live}"]):
            with pytest.raises(ConfigError, match=rf"{live} is in use by another tinv run \(pid {owner.pid} on "):
                claim_run_folder(args)
        monkeypatch.chdir(tmp_path)
        assert find_state("latest", tmp_path / "new")[0] == older.resolve()  # the newest state not in use
    finally:
        owner.send_signal(signal.SIGKILL)  # a killed run keeps nothing
        owner.wait()
    assert holder(live) is None and find_state("latest", tmp_path / "new")[0] == live.resolve()
    hold(live)
    hold(live)  # the same process again (the command line, then the run): re-entrant
    let_go(live)
    assert holder(live) is None and (live / LOCK_NAME).is_file()
    let_go(live)


def test_what_a_run_prints_to_paste_runs_no_code(tmp_path, capsys):
    """A folder named with spaces, quotes and `$(...)`: every command the run prints pastes back as exactly the
    arguments it means (shlex reads it as bash does), so nothing in a name runs."""
    import shlex

    from conftest import train

    run = tmp_path / "it's a $(touch pwned) `id` run"
    train(run, ["train.max_steps=1", "logger=wandb", "logger.mode=offline"])
    printed = capsys.readouterr().out
    generate = shlex.split(printed.split("  next       ")[1].splitlines()[0])
    assert generate[:3] == ["tinv-generate", str(run / "mychar.safetensors"), "a photo of mychar"]
    sync = shlex.split(printed.split("upload with: ")[1].splitlines()[0])
    assert sync == ["wandb", "sync", f"{run / 'wandb'}/offline-run-*"]  # the glob left for the shell to expand
    assert not (tmp_path / "pwned").exists()
