"""How tinv shares a machine, measured (benchmarks, not tests; the numbers are in docs/measurements.md):

    tinv-bench threads WORK_DIR    # the default thread count against every fixed one, with and without a busy machine
    tinv-bench sharing WORK_DIR    # toy runs one after another, side by side, and as a joblib sweep

Every command runs through its real entry point in a subprocess and is timed whole (start-up included: what a user
waits for).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..atomic import write_text_atomic
from ..resources import core_budget, my_cores

TARGET = 1.25  # the default's time within this factor of the best fixed thread count's
# A program that is not tinv keeping every core busy: a plain matmul loop, one thread per core.
FOREIGN_LOAD = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); a = torch.randn(1024, 1024)\n"
                "while True: a @ a")


def _fresh(*folders: Path) -> None:
    """The benchmark's own run folders from an earlier time: gone, so every run is timed from scratch."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _run(command: list[str], cwd: Path) -> float:
    """Wall seconds of one command; its stderr (to a file: a pipe nobody reads would block it) on failure."""
    started = time.perf_counter()
    with open(cwd / f"bench-{time.time_ns()}.log", "w+") as log:
        proc = subprocess.run(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{log.read()[-2000:]}")
    return time.perf_counter() - started


def _timed(commands: list[list[str]], together: bool, cwd: Path) -> float:
    """Wall seconds of tinv-train commands, one after the other or all at once."""
    if not together:
        return sum(_run([sys.executable, "-m", "tinv", *c], cwd) for c in commands)
    started = time.perf_counter()
    procs = []
    for n, command in enumerate(commands):
        log = open(cwd / f"bench-{time.time_ns()}-{n}.log", "w+")
        procs.append((subprocess.Popen([sys.executable, "-m", "tinv", *command], cwd=cwd,
                                       stdout=subprocess.DEVNULL, stderr=log), log))
    for proc, log in procs:
        if proc.wait() != 0:
            log.seek(0)
            raise RuntimeError(log.read()[-2000:])
        log.close()
    return time.perf_counter() - started


def sharing(work: Path, steps: int) -> dict:
    """Toy runs one after another, side by side, and as a joblib sweep (scoring off: training only)."""
    common = [f"train.max_steps={steps}", "logger=none", "~callbacks.concept"]
    run = lambda name, seed: [*common, f"train.seed={seed}", f"hydra.run.dir={work / name}"]  # noqa: E731
    result = {"steps": steps, "cores": len(my_cores())}
    _fresh(*(work / name for name in ("seq-a", "seq-b", "par-a", "par-b", "joblib")),
           *(work / f"seq4-{s}" for s in range(4)))
    print(f"{steps}-step toy runs on {result['cores']} cores (seconds of wall time):", flush=True)
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
    result["ok"] = result["side_by_side_vs_sequential"] <= 1.0 and result["joblib_speedup"] >= 1.4
    return result


def fixed_counts(cores: int) -> list[int]:
    """The fixed thread counts worth comparing: 1, 2, 4, ... and every core."""
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return counts + [cores]


def threads(work: Path, steps: int, images: int) -> dict:
    """The default rule against each fixed thread count, on an idle machine and beside FOREIGN_LOAD: a toy
    training run of `steps` steps (scoring off) and `tinv-generate --n images` of its embedding."""
    cores = core_budget(my_cores())
    settings = [None, *fixed_counts(cores)]  # None: tinv's default
    trained = work / "embedding"
    _fresh(trained, *(p for p in work.iterdir() if p.is_dir() and p.name.startswith(("train-", "generate-"))))
    train = [sys.executable, "-m", "tinv", f"train.max_steps={steps}", "logger=none", "~callbacks.concept"]
    _run([*train, f"hydra.run.dir={trained}"], work)  # the embedding tinv-generate draws, and a warm cache
    generate = [sys.executable, "-m", "tinv.commands.generate", str(trained / "mychar.safetensors"), "a photo of mychar",
                "--n", str(images), "--sampler", "ddim", "--steps", "25"]
    commands = {  # n: a fixed thread count, None for tinv's default
        "train": lambda n, where: [*train, f"hydra.run.dir={where}"] + ([f"train.num_threads={n}"] if n else []),
        "generate": lambda n, where: [*generate, "--out", str(where)] + (["--threads", str(n)] if n else [])}
    result = {"cores": cores, "steps": steps, "images": images, "target": TARGET, "rows": []}
    print(f"{cores} cores; toy training {steps} steps, tinv-generate --n {images}; seconds of wall time "
          f"(default / fixed thread counts {', '.join(map(str, settings[1:]))}):", flush=True)
    for busy in (False, True):
        load = subprocess.Popen([sys.executable, "-c", FOREIGN_LOAD, str(cores)]) if busy else None
        try:
            if load:
                time.sleep(5)  # its torch import done: the cores are busy
            for name, command in commands.items():
                times = {n: _run(command(n, work / f"{name}-{'busy' if busy else 'idle'}-{n or 'default'}"), work)
                         for n in settings}
                best = min(times[n] for n in settings[1:])
                row = {"machine": "busy" if busy else "idle", "command": name, "default_s": round(times[None], 1),
                       **{f"threads_{n}_s": round(times[n], 1) for n in settings[1:]},
                       "best_fixed": min(settings[1:], key=lambda n: times[n]),
                       "default_vs_best": round(times[None] / best, 3)}
                result["rows"].append(row)
                print(f"  {row['machine']:<5} {name:<9} default {times[None]:7.1f}   " +
                      "   ".join(f"{n}: {times[n]:7.1f}" for n in settings[1:]) +
                      f"   default / best {row['default_vs_best']:.2f}", flush=True)
        finally:
            if load:
                load.send_signal(signal.SIGKILL)
                load.wait()
    result["ok"] = all(row["default_vs_best"] <= TARGET for row in result["rows"])
    print(f"default within {TARGET}x of the best fixed count everywhere: {'yes' if result['ok'] else 'NO'}")
    return result


def main(argv: list[str]) -> int:
    """`tinv-bench threads|sharing WORK_DIR ...`"""
    parser = argparse.ArgumentParser(prog=f"tinv-bench {argv[0]}", description=__doc__.split("\n\n")[0])
    parser.add_argument("work_dir", help="a folder for the runs (made if missing)")
    if argv[0] == "threads":
        parser.description = ("the default thread count against every fixed one, timed on an idle machine and beside a "
                              "program that keeps every core busy (a plain torch matmul loop)")
        parser.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
        parser.add_argument("--images", type=int, default=2, help="tinv-generate --n (default 2)")
    else:
        parser.description = sharing.__doc__.split("(")[0]
        parser.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    parser.add_argument("--out", help="also write the numbers as JSON here")
    args = parser.parse_args(argv[1:])
    work = Path(args.work_dir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.pop("TINV_THREADS", None)  # the default rule is what is measured
    result = threads(work, args.steps, args.images) if argv[0] == "threads" else sharing(work, args.steps)
    if args.out:
        write_text_atomic(Path(args.out).expanduser(), json.dumps(result, indent=1) + "\n")
    return 0 if result["ok"] else 1
