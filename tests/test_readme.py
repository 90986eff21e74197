"""The documentation's commands and links: every tinv-train / tinv-bench line of README.md and docs/*.md composes as
written (keys, choices, values), every line of the other commands parses as written, every relative link resolves,
and the toy world's walk-through runs end to end as pasted (slow)."""

import inspect
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT
from tinv.commandline import expand_home, precheck

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXTS = {page: page.read_text() for page in PAGES}
README = TEXTS[ROOT / "README.md"]

# each console script's `module:function`, as pyproject.toml installs it
SCRIPTS = {name: tuple(target.split(":")) for name, target in
           tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"].items()}


def bash_blocks() -> list[tuple[Path, str]]:
    """Every ```bash block of the README and the docs pages, with its page."""
    return [(page, block) for page, text in TEXTS.items() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def doc_commands(prog: str) -> list[list[str]]:
    """Each `prog ...` line of the bash blocks (continuations joined, comments dropped), as arguments."""
    found = []
    for _, block in bash_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == prog:
                found.append(words[1:])
    return found


class Parsed(Exception):
    """Raised in place of running a command, once its arguments parsed."""


# the commands with argparse entry points: each line of theirs in the docs must parse as written
ARGPARSE_COMMANDS = ("tinv-generate", "tinv-eval", "tinv-convert", "tinv-report", "tinv-toy", "tinv-score")
BENCH_SUBCOMMANDS = (["threads"], ["sharing"])  # tinv-bench's own subcommands (argparse), not Hydra overrides


def argparse_lines() -> list[tuple[str, list[str]]]:
    lines = [(prog, args) for prog in ARGPARSE_COMMANDS for args in doc_commands(prog)]
    return lines + [("tinv-bench", args) for args in doc_commands("tinv-bench") if args[:1] in BENCH_SUBCOMMANDS]


@pytest.mark.parametrize("args", doc_commands("tinv-train") + [args for args in doc_commands("tinv-bench")
                                                                if args[:1] not in BENCH_SUBCOMMANDS], ids=" ".join)
def test_every_readme_training_command_composes_as_written(args):
    precheck(expand_home(args))  # raises a one-line ConfigError for a key, choice or value that no longer exists


def test_the_readme_has_the_commands_this_test_reads():
    # the old single README held 13 tinv-train and 7 tinv-bench lines (5 timing steps, threads and sharing)
    assert len(doc_commands("tinv-train")) >= 13 and len(doc_commands("tinv-bench")) >= 7
    assert {prog for prog, _ in argparse_lines()} == {*ARGPARSE_COMMANDS, "tinv-bench"}
    assert {*ARGPARSE_COMMANDS, "tinv-bench", "tinv-train"} <= set(SCRIPTS)


@pytest.mark.parametrize("prog,args", argparse_lines(), ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_every_readme_command_of_the_other_tools_parses_as_written(prog, args, monkeypatch):
    import argparse
    import importlib

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **kw):
        raise Parsed(original(self, *a, **kw))  # an unknown option or a missing argument exits 2 here instead

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    module, function = SCRIPTS[prog]
    main = getattr(importlib.import_module(module), function)
    monkeypatch.setattr(sys, "argv", [prog, *args])  # as the console script starts it
    with pytest.raises(Parsed):
        if inspect.signature(main).parameters:
            main(args)
        else:  # an entry point that reads sys.argv itself (tinv-bench: Hydra overrides, or threads / sharing)
            main()


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation but `-` and spaces dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def without_code(text: str) -> str:
    """The page with its fenced code blocks and inline code spans left out."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M))


def anchors(page: Path) -> set[str]:
    slugs, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", without_code(TEXTS.get(page) or page.read_text()), re.M):
        slug = github_slug(heading.replace("`", ""))
        slugs.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return slugs


def relative_links(page: Path) -> list[str]:
    text = without_code(TEXTS[page])
    return [target for target in re.findall(r"\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)", text)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: are not checked here


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme_or_the_index():
    linked = set()
    for page in (ROOT / "README.md", ROOT / "docs" / "README.md"):
        linked |= {(page.parent / target.partition("#")[0]).resolve() for target in relative_links(page)
                   if target.partition("#")[0]}
    unlinked = [str(p.relative_to(ROOT)) for p in PAGES[1:] if p.name != "README.md" and p.resolve() not in linked]
    assert not unlinked
    assert (ROOT / "docs" / "README.md").resolve() in linked


def test_the_readme_stays_short():
    assert len(README.splitlines()) < 200, "move the detail into a docs/ page"


def walk_through() -> str:
    """The toy world's walk-through: the one bash block that renders a concept with `tinv-toy render --concept`."""
    blocks = [block for _, block in bash_blocks() if "tinv-toy render --concept" in block]
    assert len(blocks) == 1, f"{len(blocks)} bash blocks hold the walk-through; one should"
    block = blocks[0]
    return block[block.index("tinv-toy render --concept"):].replace("\\\n", " ")


def test_the_walk_through_is_one_block():
    assert "tinv-train method=pivotal" in walk_through() and "tinv-eval" in walk_through()


def module_of(prog: str) -> str:
    """The module `python -m` runs for a command: tinv-train is `python -m tinv`; the others their console script's."""
    return "tinv" if prog == "tinv-train" else SCRIPTS[prog][0]


@pytest.mark.slow  # a default run, a pivotal run and three scorings of the toy model: about 6 minutes on 2 cores
def test_the_toy_world_walk_through_runs_as_pasted(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    runs = []
    for line in walk_through().splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[:2] in (["tinv-toy", "targets"], ["tinv-toy", "methods"], ["tinv-toy", "pivotal"]):
            continue  # long benchmarks
        if words[0] == "tinv-train":
            runs.append(tmp_path / f"run{len(runs)}")
            words.append(f"hydra.run.dir={runs[-1]}")
        words = [str(tmp_path) + w[1:] if w.startswith("~/") else w for w in words]  # as the shell expands them
        words = [w.replace("outputs/<date>/<time>", str(runs[0])) if runs else w for w in words]
        proc = subprocess.run([sys.executable, "-m", module_of(words[0]), *words[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
    assert (tmp_path / "data" / "cross" / "000.png").is_file() and (tmp_path / "samples.png").is_file()
    for run_dir in runs:  # the white cross with the defaults, the star with method=pivotal: each learned
        summary = __import__("json").loads((run_dir / "summary.json").read_text())
        assert summary["concept_accuracy"] >= 0.5, run_dir
        assert Path(summary["embedding"]).is_file()
    assert len(runs) == 2 and Path(summary["lora"]).is_file()


def test_the_architecture_page_names_every_module():
    """docs/architecture.md places each module of tinv/ (outside the packages it describes as a whole): a module
    added or moved without the page following fails here."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    whole = ("backbone", "data", "toy")
    unnamed = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tinv").rglob("*.py"))
               if p.name != "__init__.py" and p.relative_to(ROOT / "tinv").parts[0] not in whole
               and str(p.relative_to(ROOT)) not in page and f"`{p.name}`" not in page]
    assert unnamed == []
