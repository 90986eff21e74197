"""The README's commands: every tinv-train / tinv-bench line composes as written (keys, choices, values), every line of
the other commands parses as written, and the toy world's walk-through runs end to end as pasted (slow)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from tinv.commandline import expand_home, precheck

README = (ROOT / "README.md").read_text()


def readme_commands(prog: str) -> list[list[str]]:
    """Each `prog ...` line of the README's bash blocks (continuations joined, comments dropped), as arguments."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == prog:
                found.append(words[1:])
    return found


class Parsed(Exception):
    """Raised in place of running a command, once its arguments parsed."""


# the commands with argparse entry points: each README line of theirs must parse as written
ARGPARSE_COMMANDS = {"tinv-generate": "tinv.generate", "tinv-eval": "tinv.toy.evaluation", "tinv-convert": "tinv.convert",
                     "tinv-report": "tinv.report", "tinv-toy": "tinv.toy.cli"}
BENCH_SUBCOMMANDS = (["threads"], ["sharing"])  # tinv-bench's own subcommands (argparse), not Hydra overrides


def argparse_lines() -> list[tuple[str, list[str]]]:
    lines = [(prog, args) for prog in ARGPARSE_COMMANDS for args in readme_commands(prog)]
    return lines + [("tinv-bench", args) for args in readme_commands("tinv-bench") if args[:1] in BENCH_SUBCOMMANDS]


@pytest.mark.parametrize("args", readme_commands("tinv-train") + [args for args in readme_commands("tinv-bench")
                                                                   if args[:1] not in BENCH_SUBCOMMANDS], ids=" ".join)
def test_every_readme_training_command_composes_as_written(args):
    precheck(expand_home(args))  # raises a one-line ConfigError for a key, choice or value that no longer exists


def test_the_readme_has_the_commands_this_test_reads():
    assert len(readme_commands("tinv-train")) >= 8 and len(readme_commands("tinv-bench")) >= 4
    assert {prog for prog, _ in argparse_lines()} == {*ARGPARSE_COMMANDS, "tinv-bench"}


@pytest.mark.parametrize("prog,args", argparse_lines(), ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_every_readme_command_of_the_other_tools_parses_as_written(prog, args, monkeypatch):
    import argparse
    import importlib

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **kw):
        raise Parsed(original(self, *a, **kw))  # an unknown option or a missing argument exits 2 here instead

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    module = "tinv.machine_bench" if prog == "tinv-bench" else ARGPARSE_COMMANDS[prog]
    with pytest.raises(Parsed):
        importlib.import_module(module).main(args)


@pytest.mark.slow  # a default run, a pivotal run and three scorings of the toy model: about 6 minutes on 2 cores
def test_the_toy_world_walk_through_runs_as_pasted(tmp_path):
    block = README[README.index("tinv-toy render --concept"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    env = {**os.environ, "HOME": str(tmp_path)}
    runs = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[:2] in (["tinv-toy", "targets"], ["tinv-toy", "methods"], ["tinv-toy", "pivotal"]):
            continue  # long benchmarks
        if words[0] == "tinv-train":
            runs.append(tmp_path / f"run{len(runs)}")
            words.append(f"hydra.run.dir={runs[-1]}")
        words = [str(tmp_path) + w[1:] if w.startswith("~/") else w for w in words]  # as the shell expands them
        words = [w.replace("outputs/<date>/<time>", str(runs[0])) if runs else w for w in words]
        module = {"tinv-toy": "tinv.toy.cli", "tinv-train": "tinv.train", "tinv-eval": "tinv.toy.evaluation"}[words[0]]
        proc = subprocess.run([sys.executable, "-m", module, *words[1:]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
    assert (tmp_path / "data" / "cross" / "000.png").is_file() and (tmp_path / "samples.png").is_file()
    for run_dir in runs:  # the white cross with the defaults, the star with method=pivotal: each learned
        summary = __import__("json").loads((run_dir / "summary.json").read_text())
        assert summary["concept_accuracy"] >= 0.5, run_dir
        assert Path(summary["embedding"]).is_file()
    assert len(runs) == 2 and Path(summary["lora"]).is_file()
