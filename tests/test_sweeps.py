"""Sweeps through the real CLI: a grid with wandb groups and a report, a resumable Optuna study, parallel and
failing jobs."""

import csv
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TEST_MODEL, hydra_quoted, odd_image_folders, with_test_model

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
pytest.importorskip("hydra_plugins.hydra_joblib_launcher")


def tinv(args, cwd, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "tinv", *with_test_model(args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, **kw)


def summaries(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))]


def test_grid_sweep_wandb_group_and_report(tmp_path):
    sweep = tmp_path / "grid"
    proc = tinv(["-m", "optimizer.lr=1e-3,1e-2", "token.num_vectors=1,2", "train.max_steps=2",
                 "val.every_n_steps=2", f"hydra.sweep.dir={sweep}", "logger.tags=[grid-test]"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1", "2", "3"]
    assert len(list(sweep.glob("*/mychar.safetensors"))) == 4
    assert (sweep / "multirun.yaml").is_file()
    found = summaries(sweep)
    assert len({s["wandb_id"] for s in found}) == 4  # four wandb runs...
    assert len({s["wandb_group"] for s in found}) == 1 and found[0]["wandb_group"].startswith("multirun-")  # one group
    assert len(list(sweep.glob("*/wandb/offline-run-*/run-*.wandb"))) == 4
    assert all(s["objective"] == s["best_val_loss"] for s in found)
    best = min(found, key=lambda s: s["objective"])  # the sweep's last words name its winner
    assert "sweep done, 4 of 4 jobs finished" in proc.stdout and f"embedding  {best['embedding']}" in proc.stdout

    report = subprocess.run([sys.executable, "-m", "tinv.commands.report", str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert len(rows) == 4 and [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    objectives = [float(r["objective"]) for r in rows]
    assert objectives == sorted(objectives)
    markdown = (sweep / "report.md").read_text()
    assert markdown.count("| ok |") == 4
    header = [c.strip() for c in markdown.split("\n| rank |")[1].split("\n")[0].split("|")]
    assert header.count("optimizer.lr") == 1 and header.count("token.num_vectors") == 1  # each swept key once
    assert "concept_accuracy" not in markdown and "concept_accuracy" not in rows[0]  # nobody reported it
    for png in ("loss_curves.png", "objective_vs_optimizer.lr.png", "objective_vs_token.num_vectors.png"):
        assert (sweep / png).stat().st_size > 1000 and f"]({png})" in markdown  # written and linked


def _complete_trials(db: Path) -> int:
    try:
        with sqlite3.connect(db) as con:
            return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:  # the file exists before optuna has created its tables
        return 0


@pytest.mark.slow  # a study, interrupted and run again (about 25 s)
def test_optuna_study_interrupted_and_resumed(tmp_path):
    sweep = tmp_path / "study"
    args = ["sweep=optuna", "hydra.sweeper.n_trials=3", "train.max_steps=3", "logger=none",
            f"hydra.sweep.dir={sweep}"]
    first = subprocess.Popen([sys.executable, "-m", "tinv", *with_test_model(args)], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    db = sweep / "optuna.db"
    deadline = time.time() + 300
    while time.time() < deadline and not (db.is_file() and _complete_trials(db) >= 1):
        assert first.poll() is None, first.stderr.read()[-2000:]
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = _complete_trials(db)
    assert 1 <= done < 3
    second = tinv(args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    # A SIGKILL between a trial's ask and the record of its owner leaves a running trial with no owner: the second
    # process counts it as running elsewhere and runs it again once its heartbeat is stale (seen once in CI).
    said = second.stdout + second.stderr
    assert (f"{done} trials finished, 0 running elsewhere, {3 - done} to run" in said
            or f"{done} trials finished, 1 running elsewhere, {2 - done} to run" in said), said[-2000:]
    assert _complete_trials(db) == 3
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_value" in results and (sweep / "multirun.yaml").is_file()
    numbers = [p.name.split("_")[0] for p in sweep.iterdir() if p.is_dir()]
    assert len(numbers) == len(set(numbers))  # resumed trials got new job folders


@pytest.mark.slow  # a sweep and its resume as subprocesses (about 20 s)
def test_a_named_sweeps_job_resumes_as_one_run(tmp_path):
    """The job's recorded overrides hold sweep=optuna, whose file starts a multirun: resuming it must not."""
    sweep = tmp_path / "study"
    first = tinv(["sweep=optuna", "hydra.sweeper.n_trials=1", "train.max_steps=2", "logger=none",
                  f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    job = next(p for p in sweep.iterdir() if p.is_dir())
    again = tinv([f"resume={job}", "train.max_steps=3"], cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep done" not in again.stdout and [p for p in sweep.iterdir() if p.is_dir()] == [job]
    summary = json.loads((job / "summary.json").read_text())
    assert (summary["step"], summary["resumed_at_step"]) == (3, 2)


@pytest.mark.parametrize("value", ["/data/imgs", "a=b", "a,b", "my images", "it's", 'say "hi"', "back\\slash",
                                   "new\nline", "..", "x" * 400, "ünï/cödé " * 40])
def test_a_job_folder_name_is_one_flat_name_whatever_the_value(value, tmp_path):
    from tinv.sweeping.jobs import NAME_BYTES, job_folder_name

    overrides = f"data.image_dir={value},optimizer.lr=0.01"
    name = job_folder_name(7, overrides)
    assert name.startswith("7_") and "/" not in name and len(name.encode()) <= NAME_BYTES
    assert name == job_folder_name(7, overrides) != job_folder_name(8, overrides)  # the same job finds it again
    assert not set(name) & set("'\"\\ \n")  # pastes into a shell as it is
    (tmp_path / name).mkdir()  # a name the file system takes
    assert [p.name for p in tmp_path.iterdir()] == [name]


def job_folders(sweep: Path) -> list[Path]:
    """The sweep's job folders; each must be flat: its summary and embedding right inside it."""
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))  # not .submitit
    for job in jobs:
        assert (job / "summary.json").is_file() and (job / "mychar.safetensors").is_file(), list(job.rglob("*"))
    return jobs


def _odd_path_sweep(tmp_path):
    """A finished two-job sweep over values holding `/`, `=`, `,`, spaces and quotes, checked: one flat folder per
    job, the end line names the best job, the report it pastes reads them. (its arguments, folder, jobs, values)"""
    folders = odd_image_folders(tmp_path)
    sweep = tmp_path / "my sweeps" / "grid"
    args = ["-m", f"data.image_dir={','.join(map(hydra_quoted, folders))}", "train.max_steps=3", "logger=none",
            f"hydra.sweep.dir={sweep}"]
    first = tinv(args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = job_folders(sweep)
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    assert "sweep done, 2 of 2 jobs finished" in first.stdout and "  best " in first.stdout
    best = first.stdout.split("  embedding  ")[1].splitlines()[0]
    assert Path(best).parent in jobs
    pasted = first.stdout.split("  report     ")[1].splitlines()[0]  # a command that pastes into a shell
    report = subprocess.run([sys.executable, "-m", "tinv.commands.report", *shlex.split(pasted)[1:]], capture_output=True,
                            text=True)
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert sorted(r["data.image_dir"] for r in rows) == sorted(map(str, folders))  # the values as given
    assert all(r["status"] == "ok" for r in rows)
    return args, sweep, jobs, folders


def test_a_sweep_over_odd_paths_gives_flat_job_folders_and_a_report(tmp_path):
    _odd_path_sweep(tmp_path)


@pytest.mark.slow  # the sweep above, then started again and one job resumed (about 25 s); the joblib test below
# resumes a finished sweep in the default suite, test_run_features a single run
def test_a_sweep_over_odd_paths_resumes_as_a_whole_and_job_by_job(tmp_path):
    args, sweep, jobs, folders = _odd_path_sweep(tmp_path)
    files = sorted(sweep.glob("*/mychar.safetensors"))
    before = [p.stat().st_mtime_ns for p in files]
    again = tinv(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("resumes from its state") == 2 and "sweep done, 2 of 2 jobs finished" in again.stdout
    assert [p.stat().st_mtime_ns for p in files] == before  # finished: nothing trained or written again

    one = tinv([f"resume={jobs[1]}", "train.max_steps=4"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    summary = json.loads((jobs[1] / "summary.json").read_text())
    assert (summary["step"], summary["resumed_at_step"]) == (4, 3) and job_folders(sweep) == jobs
    assert summary["job_num"] == 1  # still the sweep's job: the report lists it with its values
    assert subprocess.run([sys.executable, "-m", "tinv.commands.report", str(sweep)], capture_output=True).returncode == 0
    rows = {r["job"]: r for r in csv.DictReader((sweep / "report.csv").open())}
    assert rows[jobs[1].name]["data.image_dir"] == str(folders[1]) and rows[jobs[1].name]["steps"] == "4"


def test_a_trial_whose_sweep_process_is_gone_is_failed_others_are_left_alone(tmp_path):
    """Another host's trial: failed once its heartbeat is older than the grace period, not before; a trial of a
    dead process on this host: failed at once."""
    import socket

    import optuna
    from hydra_plugins.tinv_sweeper import GRACE_S, OWNER, Heartbeat, ResumableOptunaSweeper

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = tmp_path / "optuna.db"
    storage = ResumableOptunaSweeper._storage(f"sqlite:///{db}")
    study = optuna.create_study(study_name="s", storage=storage)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owners = {"far-fresh": "elsewhere:1", "far-stale": "elsewhere:2",
              "here-dead": f"{socket.gethostname()}:{dead.stdout.strip()}",
              "here-alive": f"{socket.gethostname()}:{os.getpid()}"}
    trials = {}
    for name, owner in owners.items():
        trial = study.ask()
        trial.set_system_attr(OWNER, owner)
        storage.record_heartbeat(trial._trial_id)
        trials[name] = trial.number
    with sqlite3.connect(db) as con:  # the far-stale trial's machine went silent a while ago
        con.execute(f"update trial_heartbeats set heartbeat = datetime(heartbeat, '-{GRACE_S + 30} seconds') "
                    "where trial_id = (select trial_id from trials where number = ?)", (trials["far-stale"],))
    ResumableOptunaSweeper._fail_dead_trials(study, "me:0")
    states = {name: study.trials[number].state.name for name, number in trials.items()}
    assert states == {"far-fresh": "RUNNING", "far-stale": "FAIL", "here-dead": "FAIL", "here-alive": "RUNNING"}

    fresh = study.ask()  # a new trial beats at once: one without a heartbeat row is never taken for dead
    Heartbeat(storage).add(t._trial_id for t in [fresh])
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from trial_heartbeats where trial_id = ?", (fresh._trial_id,)).fetchone()[0]


def test_ctrl_c_stops_a_local_sweep_not_just_its_job(tmp_path):
    """The basic launcher runs the jobs in the sweep's own process: SIGINT saves the job and ends the sweep (130),
    saying how to resume it; the next job never starts."""
    sweep = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "tinv", *with_test_model([
        "-m", "optimizer.lr=1e-3,1e-2", "train.max_steps=400", "logger=none", f"hydra.sweep.dir={sweep}"])],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not any(p.stat().st_size for p in sweep.glob("0_*/metrics.jsonl")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    err = proc.stderr.read()
    assert f"the sweep stops; the same command with hydra.sweep.dir={sweep} resumes it" in err
    assert "Traceback" not in err and [p.name[0] for p in sweep.iterdir() if p.is_dir()] == ["0"]
    assert json.loads(next(sweep.glob("0_*/summary.json")).read_text())["stopped_by"] == "SIGINT"


def joblib_sweep_with_a_failing_job(tmp_path) -> list[str]:
    """Three jobs, two at a time, one with a bad value: its arguments, once checked."""
    sweep = tmp_path / "par"
    folder = odd_image_folders(tmp_path)[0]  # a value with `/`, `=`, `,`, spaces and quotes: still flat folders
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optimizer.lr=5e-3,1e-2,-1", "train.max_steps=3",
            "logger=none", f"data.image_dir={hydra_quoted(folder)}", f"hydra.sweep.dir={sweep}"]
    proc = tinv(args, cwd=tmp_path)
    assert proc.returncode != 0  # the sweep says a job failed...
    found = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert len(found) == 3 and len([p for p in sweep.iterdir() if p.is_dir()]) == 3
    failed = [s for s in found.values() if not s["ok"]]
    assert len(failed) == 1 and "optimizer.lr=-1 must be at least 0" in failed[0]["error"]
    good = sorted((s for s in found.values() if s["ok"]), key=lambda s: s["started_at"])
    assert len(good) == 2 and len(list(sweep.glob("*/mychar.safetensors"))) == 2  # ...and the others finished
    assert good[1]["started_at"] < good[0]["finished_at"]  # the two ran at the same time (each in a fresh process)
    assert subprocess.run([sys.executable, "-m", "tinv.commands.report", str(sweep)], capture_output=True).returncode == 0
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [r["status"].split(":")[0] for r in rows] == ["ok", "ok", "failed"]
    return args


def test_joblib_runs_in_parallel_and_a_failing_job_leaves_the_rest(tmp_path):
    joblib_sweep_with_a_failing_job(tmp_path)


@pytest.mark.slow  # the sweep above and its restart, about 35 s
def test_a_joblib_sweep_started_again_gives_its_finished_jobs_results_again(tmp_path):
    args = joblib_sweep_with_a_failing_job(tmp_path)
    again = tinv(args, cwd=tmp_path)  # started again in its folder: the finished jobs give their results again
    assert again.stdout.count("resumes from its state") == 2, again.stdout + again.stderr[-2000:]


def submitit_local_sweep(tmp_path):
    """A two-job sweep through submitit's local launcher over an odd folder name: (its arguments, its folder)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sub"
    folder = odd_image_folders(tmp_path)[1]  # a value with `/`, `=`, `,`, spaces and quotes: still flat folders
    args = ["-m", "hydra/launcher=submitit_local", "optimizer.lr=5e-3,1e-2", "train.max_steps=2", "logger=none",
            f"data.image_dir={hydra_quoted(folder)}", f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10"]
    proc = tinv(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(job_folders(sweep)) == 2 and "sweep done, 2 of 2 jobs finished" in proc.stdout
    return args, sweep


@pytest.mark.slow  # about 10 s; the same plugin runs real SLURM jobs in the cluster set, and its shipped config
# composes by default (test_shipped_slurm_launcher_config)
def test_submitit_local_launcher(tmp_path):
    submitit_local_sweep(tmp_path)


@pytest.mark.slow  # the same sweep twice; the basic launcher's resume is in the default suite, SLURM's in cluster
def test_submitit_local_sweep_started_again_resumes_each_job(tmp_path):
    args, sweep = submitit_local_sweep(tmp_path)
    again = tinv(args, cwd=tmp_path)  # started again in its folder: each job resumes from its own state
    assert again.returncode == 0 and "sweep done, 2 of 2 jobs finished" in again.stdout, again.stderr[-3000:]
    assert sum("resumes from its state" in p.read_text() for p in sweep.glob(".submitit/*/*_log.out")) == 2


@pytest.mark.parametrize("name,jobs", [("templates", 3), ("optimizers", 3)])
def test_named_sweeps_compose(name, jobs, tmp_path):
    proc = tinv([f"sweep={name}", "--cfg", "hydra", "-p", "hydra.sweeper.params"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    values = next(line for line in proc.stdout.splitlines() if ":" in line).split(":", 1)[1]
    assert len(values.split(",")) == jobs


def test_shipped_slurm_launcher_config(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    gpu = tinv(["hydra/launcher=slurm", "--cfg", "hydra", "-p", "hydra.launcher"], cwd=tmp_path, timeout=120)
    assert gpu.returncode == 0, gpu.stderr
    assert "TinvSlurmLauncher" in gpu.stdout and "gpus_per_node: 1" in gpu.stdout
    assert "max_num_timeout: 3" in gpu.stdout  # requeued at the time limit
    cpu = tinv(["hydra/launcher=slurm_cpu", "--cfg", "hydra", "-p", "hydra.launcher"], cwd=tmp_path, timeout=120)
    assert cpu.returncode == 0, cpu.stderr
    assert "gpus_per_node: null" in cpu.stdout and "cpus_per_task: 2" in cpu.stdout and "mem_gb: 4" in cpu.stdout


def test_named_sweep_runs_from_any_directory(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # optimizer.lr given on the command line wins over the sweep's lr values: 2 jobs (token.num_vectors 1, 4)
    proc = subprocess.run([sys.executable, "-m", "tinv", TEST_MODEL, "sweep=lr_vectors", "optimizer.lr=1e-3",
                           "train.max_steps=1", "logger=none", f"hydra.sweep.dir={sweep_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(sweep_dir.glob("*/mychar.safetensors"))
    assert len(files) == 2
    from safetensors.torch import load_file

    shapes = sorted(load_file(f)["emb_params"].shape[0] for f in files)
    assert shapes == [1, 4]
    configs = [(p.parent / ".hydra" / "config.yaml").read_text() for p in files]
    assert all("lr: 0.001" in c for c in configs)


def test_report_ranks_by_each_objectives_own_direction(tmp_path):
    from tinv.sweeping.report import write_report

    for n, (accuracy, ok) in enumerate([(0.5, True), (0.9, True), (None, False), (0.7, True)]):
        job = tmp_path / f"{n}_job"
        if n == 3:  # a sweep from before job folders were flat: a `/` in a value nested the folder
            job = tmp_path / "3_data.image_dir=" / "data" / "3_job"
        job.mkdir(parents=True)
        summary = {"ok": ok, "overrides": [f"optimizer.lr={n}"]}
        if ok:
            summary.update(objective=accuracy, objective_name="last val/concept_accuracy", objective_mode="max")
        (job / "summary.json").write_text(json.dumps(summary))
    write_report(tmp_path)
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [(r["job"], r["rank"]) for r in rows] == [("1_job", "1"), ("3_job", "2"), ("0_job", "3"), ("2_job", "")]
    assert "last val/concept_accuracy, higher is better" in (tmp_path / "report.md").read_text()


def test_the_objective_reads_the_configured_metric_and_keeps_the_sweeps_direction():
    from tinv.objective import read_objective, sweep_value

    history = {"val/loss": [(2, 0.5), (4, 0.3), (6, 0.4)], "val/acc": [(2, 0.2), (6, 0.9), (8, 0.7)]}
    assert read_objective(history, 1.0)["objective"] == 0.3  # best val/loss by default
    last = read_objective(history, 1.0, metric="val/acc", mode="max", reduce="last")
    assert (last["objective"], last["objective_name"], last["objective_mode"]) == (0.7, "last val/acc", "max")
    assert read_objective(history, 1.0, metric="val/acc", mode="max")["objective"] == 0.9
    fallback = read_objective({}, 0.25, metric="val/acc", mode="max", reduce="last")
    assert (fallback["objective"], fallback["objective_name"], fallback["objective_mode"]) == \
        (0.25, "last train/loss", "min")
    # a sweep maximising accuracy must not maximise a fallback loss: it sees the loss negated
    assert sweep_value(fallback, "max") == -0.25 and sweep_value(last, "max") == 0.7


def test_report_helpers_smooth_and_pick_log_axes():
    from tinv.sweeping.report import _log_scaled, smooth
    from tinv.tracking import summary_direction

    noisy = [1.0, 0.0] * 50
    assert max(smooth(noisy, 10)[20:]) - min(smooth(noisy, 10)[20:]) < 0.25  # the zig-zag is flattened
    assert _log_scaled("optimizer.lr", [1e-3, 5e-3]) and not _log_scaled("token.num_vectors", [1, 4])
    assert (summary_direction("val/loss"), summary_direction("val/concept_accuracy"),
            summary_direction("train/lr")) == ("min", "max", None)


@pytest.mark.parametrize("count", [3, 20])
def test_the_loss_plot_gives_each_job_a_panel_best_first(count, tmp_path):
    """Overlaid, jobs' losses (mostly timestep noise) cannot be told apart: one labelled panel per job, shared axes."""
    from tinv.sweeping.report import LOSS_PANELS, Job, _loss_panels, ranked

    jobs = [Job(tmp_path / f"{n}_job", {"ok": True, "objective": n / 100, "overrides": [f"optimizer.lr={n}"]},
                {"train/loss": [(step, 0.1 + 0.01 * (step % 2) + n / 1000) for step in range(1, 41)]})
            for n in range(count)]
    fig = _loss_panels(ranked(jobs), lambda job: job.folder.name)
    drawn = [ax for ax in fig.axes if ax.axison]
    assert len(drawn) == min(count, LOSS_PANELS)
    assert [ax.get_title().split()[0] for ax in drawn[:3]] == ["#1", "#2", "#3"]
    assert drawn[0].get_title() == "#1 0_job" and len({ax.get_ylim() for ax in drawn}) == 1  # best first, shared
    assert all(len(ax.get_lines()) == 2 for ax in drawn)  # each step, and smoothed
    assert (f"best {LOSS_PANELS} of {count}" in fig._suptitle.get_text()) == (count > LOSS_PANELS)


def test_pivotal_sweep_runs_each_distinct_job_once(tmp_path):
    """sweep=pivotal's grid crosses method with LoRA keys that method=ti does not read: those ti jobs reuse the
    first one's result instead of training again."""
    sweep = tmp_path / "pivotal"
    proc = tinv(["sweep=pivotal", "lora.rank=2,4", "lora.lr=1e-3", "train.max_steps=2", "logger=none",
                 f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {tuple(s["overrides"]): s for s in summaries(sweep)}
    assert len(found) == 4
    ti = [s for o, s in found.items() if "method=ti" in o]
    pivotal = [s for o, s in found.items() if "method=pivotal" in o]
    assert sorted("same_as" in s for s in ti) == [False, True]  # one trained, the other is its result
    assert ti[0]["objective"] == ti[1]["objective"] and ti[0]["embedding"] == ti[1]["embedding"]
    assert not any("same_as" in s for s in pivotal) and pivotal[0]["objective"] != pivotal[1]["objective"]
    assert all(s.get("lora", "").endswith("mychar-lora.safetensors") for s in pivotal)
    assert len(list(sweep.glob("*/mychar.safetensors"))) == 3
    assert "would repeat job" in proc.stdout and "sweep done, 4 of 4 jobs finished" in proc.stdout


def scored_sweep(tmp_path, *params):
    """A sweep of scored tiny runs (the tiny CLIP and DINO), checked: each job's objective is its val/fidelity, the
    sweep names the highest, tinv-report ranks in the same order and links each job's grid. Returns the summaries."""
    from tinv.scoring.tiny import tiny_scorer_path

    sweep = tmp_path / "scored"
    proc = tinv(["-m", *params, "~world", "logger=none", f"score.clip={tiny_scorer_path('clip')}",
                 f"score.dino={tiny_scorer_path('dino')}", "token.init_word=shape", "train.max_steps=2",
                 "sample.steps=2", "score.num_samples=1", "score.subject_prompts=['a {} in the snow']",
                 f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = summaries(sweep)
    assert all(s["objective_name"] == "best val/fidelity" and s["objective"] == s["fidelity"] for s in found)
    best = max(found, key=lambda s: s["objective"])
    assert f"embedding  {best['embedding']}" in proc.stdout
    report = subprocess.run([sys.executable, "-m", "tinv.commands.report", str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [float(r["objective"]) for r in rows] == sorted((s["objective"] for s in found), reverse=True)
    assert {"dino", "clip_i", "clip_t", "word_dino"} <= rows[0].keys()
    assert (sweep / "report.md").read_text().count("[grid](") == len(found)  # each job's sample grid, linked
    return found


def test_a_sweep_of_scored_runs_ranks_by_fidelity_and_the_report_agrees(tmp_path):
    found = scored_sweep(tmp_path, "optimizer.lr=1e-3,5e-2")
    assert len(found) == 2 and found[0]["objective"] != found[1]["objective"]


@pytest.mark.slow  # six scored jobs, about 20 s; the sibling above sweeps SD1 alone
def test_a_sweep_over_scored_tiny_sd1_sd2_and_sdxl_ranks_by_fidelity(tmp_path):
    found = scored_sweep(tmp_path, "model=tiny_sd15,tiny_sd2,tiny_sdxl", "optimizer.lr=1e-3,5e-2")
    assert len(found) == 6 and {s["family"] for s in found} == {"sd1", "sd2", "sdxl"}
