"""Sweeps against real servers: a SLURM cluster (through hydra/launcher=slurm_cpu) and an Optuna study in
PostgreSQL. `.ci/servers start` brings both up on loopback; without them each test skips with the reason.
Run with `python -m pytest -q -m cluster` (about 5 minutes: every SLURM job is a short tiny-model run)."""

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import hydra_quoted, odd_image_folders, with_test_model

pytestmark = pytest.mark.cluster
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

POSTGRES = os.environ.get("TINV_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:55432/optuna")
START = "start them with `.ci/servers install && .ci/servers start`"


def missing(reason: str):
    """Skip, saying why; where the servers must be there (.ci/run sets TINV_REQUIRE_SERVERS), fail instead."""
    (pytest.fail if os.environ.get("TINV_REQUIRE_SERVERS") else pytest.skip)(reason)


@pytest.fixture(scope="module")
def partition() -> str:
    """The cluster's default partition; skips when no SLURM controller answers."""
    if shutil.which("sinfo") is None:
        missing(f"no SLURM on this machine (sinfo not found): {START}")
    proc = subprocess.run(["sinfo", "--noheader", "--format=%P %a"], capture_output=True, text=True, timeout=30)
    up = [line.split()[0] for line in proc.stdout.splitlines() if line.endswith(" up")]
    if proc.returncode != 0 or not up:
        missing(f"no SLURM controller answers (sinfo: {proc.stderr.strip() or 'no partition up'}): {START}")
    return next((p for p in up if p.endswith("*")), up[0]).rstrip("*")


@pytest.fixture(scope="module")
def postgres():
    """A psycopg2 connection factory for the study database; skips when no PostgreSQL answers."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        psycopg2.connect(POSTGRES, connect_timeout=5).close()
    except psycopg2.OperationalError as err:
        missing(f"no PostgreSQL at {POSTGRES} ({str(err).strip().splitlines()[0]}): {START} or set "
                    f"TINV_TEST_POSTGRES")
    return lambda: psycopg2.connect(POSTGRES)


def trial_states(connect, study: str) -> list[str]:
    """The states of the study's trials, in trial order, as PostgreSQL holds them."""
    with connect() as con, con.cursor() as cur:
        cur.execute("select t.state from trials t join studies s on s.study_id = t.study_id "
                    "where s.study_name = %s order by t.number", (study,))
        return [row[0] for row in cur.fetchall()]


def slurm(partition: str, *extra: str) -> list[str]:
    return ["hydra/launcher=slurm_cpu", f"hydra.launcher.partition={partition}", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1", "logger=none", *extra]


def tinv_args(args) -> list[str]:
    return [sys.executable, "-m", "tinv", *with_test_model(args)]


def tinv(args, cwd, timeout=600):
    return subprocess.run(tinv_args(args), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def summaries(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))}


def wait_for(condition, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def job_ids(name: str) -> list[str]:
    """SLURM ids of this user's running or pending jobs named `name` (array tasks one per line)."""
    out = subprocess.run(["squeue", "--noheader", "--array", "--me", f"--name={name}", "--format=%i"],
                         capture_output=True, text=True).stdout
    return out.split()


@contextlib.contextmanager
def sweep_running(args, cwd: Path, name: str):
    """A sweep started in the background; however the test ends, the sweep and its SLURM jobs (named `name`)
    are gone after it."""
    proc = subprocess.Popen(tinv_args(args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        subprocess.run(["scancel", f"--name={name}"])
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_until_training(sweep: Path, job: int, proc) -> None:
    log = lambda: next(iter(sweep.glob(f"{job}_*/train.log")), None)  # noqa: E731
    wait_for(lambda: log() is not None and "training vectors" in log().read_text(), 300,
             f"job {job} to start training", proc)


def job_pid(sweep: Path, task: int) -> int:
    """The pid of the Python process running array task `task` of the sweep's SLURM jobs (on this machine). The
    batch script's `srun` (and srun's helper) carry the same command line and task id: killing one of those makes
    SLURM end the job with SIGTERM, which the run survives by saving, so only the python itself counts."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            environ = dict(line.split(b"=", 1) for line in (proc / "environ").read_bytes().split(b"\0") if b"=" in line)
        except OSError:
            continue
        if (command[0].rsplit(b"/", 1)[-1].startswith(b"python") and b"submitit.core._submit" in command
                and str(sweep).encode() in b" ".join(command)
                and environ.get(b"SLURM_ARRAY_TASK_ID") == str(task).encode()):
            return int(proc.name)
    raise AssertionError(f"no process of task {task} of {sweep}")


def test_grid_sweep_on_slurm(partition, tmp_path):
    sweep = tmp_path / "grid"
    folder = odd_image_folders(tmp_path)[0]  # the README's data.image_dir=/shared/imgs, with `=`, `,` and quotes too
    proc = tinv(["-m", "train.seed=1,2", "train.max_steps=3", *slurm(partition), f"data.image_dir={hydra_quoted(folder)}",
                 f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = summaries(sweep)
    assert len(found) == 2 and all(s["ok"] and s["step"] == 3 for s in found.values())
    assert len([p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 2  # flat job folders
    assert len(list(sweep.glob("*/mychar.safetensors"))) == 2
    assert len(list(sweep.glob(".submitit/*/*_log.out"))) == 2  # they ran as SLURM jobs
    for log in sweep.glob("*/train.log"):  # each job's threads: its cpus_per_task
        assert "1 process, 1 thread," in log.read_text()
    console = proc.stdout + proc.stderr
    assert "sacct" not in console.replace("(sacct: ", "") and "Bypassing" not in console  # no accounting noise
    assert "sweep done, 2 of 2 jobs finished" in proc.stdout
    report = subprocess.run([sys.executable, "-m", "tinv.commands.report", str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_optuna_sweep_on_slurm_with_a_postgres_study(partition, postgres, tmp_path):
    study, sweep = f"grid-{uuid.uuid4().hex[:8]}", tmp_path / "study"
    proc = tinv(["sweep=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2", f"hydra.sweeper.storage={POSTGRES}",
                 f"hydra.sweeper.study_name={study}", "train.max_steps=3", *slurm(partition),
                 f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert trial_states(postgres, study) == ["COMPLETE"] * 3
    assert sorted(int(name.split("_")[0]) for name in summaries(sweep)) == [0, 1, 2]  # folders = trial numbers
    assert all(s["ok"] for s in summaries(sweep).values())
    assert "best_value" in (sweep / "optimization_results.yaml").read_text()
    assert "Bypassing" not in proc.stdout + proc.stderr


def test_two_sweep_processes_share_one_study(partition, postgres, tmp_path):
    """As two machines would: the same study, started side by side; together exactly n_trials trials."""
    study = f"shared-{uuid.uuid4().hex[:8]}"
    procs = [subprocess.Popen(tinv_args(["sweep=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=1",
                                         f"hydra.sweeper.storage={POSTGRES}", f"hydra.sweeper.study_name={study}",
                                         "train.max_steps=3", *slurm(partition),
                                         f"hydra.sweep.dir={tmp_path / f'machine{n}'}"]),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (1, 2)]
    outs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    assert trial_states(postgres, study) == ["COMPLETE"] * 4  # none lost, none run twice, none failed
    numbers = {n: sorted(int(name.split("_")[0]) for name in summaries(tmp_path / f"machine{n}")) for n in (1, 2)}
    assert sorted(numbers[1] + numbers[2]) == [0, 1, 2, 3]  # each trial ran once, in one of the two
    assert numbers[1] and numbers[2]  # both took part
    tried = [tuple(s["overrides"]) for n in (1, 2) for s in summaries(tmp_path / f"machine{n}").values()]
    assert len(set(tried)) == 4  # with the same train.seed, yet each process drew values of its own


def test_a_stopped_sweep_cancels_its_jobs_and_resumes_them_when_started_again(partition, tmp_path):
    sweep, name = tmp_path / "grid", f"tinv-{uuid.uuid4().hex[:6]}"
    args = ["-m", "train.seed=1,2", "train.max_steps=300", *slurm(partition, f"hydra.launcher.name={name}"),
            f"hydra.sweep.dir={sweep}"]
    with sweep_running(args, tmp_path, name) as proc:
        logs = lambda: [p.read_text() for p in sweep.glob("*/train.log")]  # noqa: E731
        wait_for(lambda: sum("training vectors" in text for text in logs()) == 2, 300, "both jobs to train", proc)
        proc.send_signal(signal.SIGINT)  # Ctrl-C on the login node
        out, err = proc.communicate(timeout=120)
        wait_for(lambda: not job_ids(name), 60, "the jobs to leave the queue")
    assert "cancelled its SLURM jobs" in out + err and "Traceback" not in err and proc.returncode == 130
    stopped = summaries(sweep)
    assert len(stopped) == 2 and all(s["stopped_by"] == "SIGTERM" and s["step"] < 300 for s in stopped.values())
    again = tinv(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    for job, summary in summaries(sweep).items():
        assert summary["ok"] and summary["step"] == 300 and summary["resumed_at_step"] == stopped[job]["step"]


def test_a_cancelled_job_fails_its_trial_which_runs_again_and_stays_resumable(partition, postgres, tmp_path):
    study, sweep = f"cancel-{uuid.uuid4().hex[:8]}", tmp_path / "study"
    name = f"tinv-{uuid.uuid4().hex[:6]}"
    with sweep_running(["sweep=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                        f"hydra.sweeper.storage={POSTGRES}", f"hydra.sweeper.study_name={study}",
                        "train.max_steps=250", *slurm(partition, f"hydra.launcher.name={name}"),
                        f"hydra.sweep.dir={sweep}"], tmp_path, name) as proc:
        wait_until_training(sweep, 0, proc)
        cancelled = next(j for j in job_ids(name) if j.endswith("_0"))
        subprocess.run(["scancel", cancelled], check=True)
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert trial_states(postgres, study) == ["FAIL", "COMPLETE", "COMPLETE"]  # cancelled, then run again
    job0 = next(sweep.glob("0_*"))
    s0 = summaries(sweep)[job0.name]
    assert not s0["ok"] and s0["stopped_by"] == "SIGTERM" and 0 < s0["step"] < 250
    assert (job0 / "mychar.safetensors").is_file()
    resumed = tinv([f"resume={job0}"], cwd=tmp_path)  # the cancelled job's run goes on from its saved state
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = json.loads((job0 / "summary.json").read_text())
    assert after["step"] == 250 and after["resumed_at_step"] == s0["step"]


def test_a_job_killed_without_a_result_fails_alone(partition, tmp_path):
    """SIGKILL leaves no result: that job fails (its summary says so), the other finishes, the sweep says one
    failed."""
    sweep, name = tmp_path / "grid", f"tinv-{uuid.uuid4().hex[:6]}"
    with sweep_running(["-m", "train.seed=1,2", "train.max_steps=250",
                        *slurm(partition, f"hydra.launcher.name={name}"), f"hydra.sweep.dir={sweep}"],
                       tmp_path, name) as proc:
        wait_until_training(sweep, 0, proc)
        os.kill(job_pid(sweep, task=0), signal.SIGKILL)  # as the OOM killer would: SLURM's scancel sends SIGTERM first
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    found = summaries(sweep)
    killed, other = (found[next(k for k in found if k.startswith(f"{n}_"))] for n in (0, 1))
    assert not killed["ok"] and "ended without a result" in killed["error"]
    assert other["ok"] and other["step"] == 250


def test_a_job_at_its_time_limit_is_requeued_and_resumes(partition, tmp_path):
    """SLURM signals USR2 signal_delay_s before the limit: the job saves, submitit requeues it, it resumes.
    SLURM checks the limits about once a minute, so the signal can come up to 60 s early: the limit must leave
    more than a minute before it, or a requeued attempt may be signalled before it has started (it then dies of
    the USR2 with exit status 140)."""
    sweep, name = tmp_path / "limit", f"tinv-{uuid.uuid4().hex[:6]}"
    with sweep_running(["-m", "train.seed=1", "train.max_steps=5000",
                        *slurm(partition, f"hydra.launcher.name={name}", "hydra.launcher.timeout_min=3",
                               "hydra.launcher.signal_delay_s=90"), f"hydra.sweep.dir={sweep}"],
                       tmp_path, name) as proc:
        logs = lambda: "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.out"))  # noqa: E731
        wait_for(lambda: "resumed " in logs(), 300, "the requeued job to resume", proc)
    err_log = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.err"))
    assert "this job is timed-out" in err_log  # submitit's handler saw the time limit...
    assert "resumes from its state" in logs()  # ...and the job, started again by SLURM, went on from its state
    step = int(logs().split("resumed ", 1)[1].split(" at step ", 1)[1].split()[0])
    assert step > 0
