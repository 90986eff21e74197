"""What `tinv-train` (and `tinv-bench`) do with the command line before Hydra sees it.

- `key=~/path` becomes the home-expanded path (Hydra's lexer refuses a bare `~`; shells do not expand it there);
- `resume=<run>` brings back that run's own overrides and folder (see `resumed_args`);
- `--help` prints tinv's own help, fast;
- every override is composed once up front, so a misspelled key, an unknown choice or a bad value is one line that
  says how to fix it (with the closest real keys), before Hydra makes a run folder.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from importlib.resources import files
from pathlib import Path

from .errors import ConfigError, refuse
from .ownership import hold, holder, holds_a_run, in_use

# conf/ and sweeps/ sit at the top of the repository; tinv/conf and tinv/sweeps link to them, so they install as
# tinv.conf and tinv.sweeps
CONF = Path(str(files("tinv.conf")))
SWEEPS = Path(str(files("tinv.sweeps"))) / "sweep"
_HOME = re.compile(r"^([+~]*[\w./-]+)=~(/.*)?$")


def expand_home(args: list[str]) -> list[str]:
    return [f"{m.group(1)}={os.path.expanduser('~' + (m.group(2) or ''))}" if (m := _HOME.match(a)) else a
            for a in args]


def override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def override_value(override: str) -> str:
    """The value of a `key=value` argument as Hydra reads it when it is a string (quotes and escapes removed);
    any other value (a number, a list, null) as written."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    written = override.split("=", 1)[1]
    try:
        value = OverridesParser.create().parse_override(override).value()
    except Exception:  # noqa: BLE001 - not parseable as written (a path with `=` or `,`): take it as it is
        return written
    return value if isinstance(value, str) else written


def path_override(key: str, path) -> str:
    """`key=path` as Hydra reads it back, whatever the path holds (a sweep job's folder has `=` and `,`)."""
    text = str(path)
    return f"{key}={text}" if re.fullmatch(r"[\w./~-]+", text) else f"{key}='{text.replace(chr(39), chr(92) + chr(39))}'"


def shell_quoted(argument: str) -> str:
    """One argument as a shell takes it when pasted."""
    import shlex

    return shlex.quote(argument)


def resume_argument(run_dir: Path) -> str:
    """`resume=<run dir>` as it pastes into a shell (a sweep job's folder holds `=` and `,`)."""
    return shell_quoted(path_override("resume", run_dir))


def resumed_args(args: list[str]) -> list[str]:
    """With `resume=<run dir>` (or latest): that run's own overrides first (this command's win over them) and Hydra's
    folder set to the run's, so a resumed run keeps its settings and goes on in its own folder and log."""
    import yaml

    from .state import check_resumable, find_state

    resume = [override_value(a) for a in args if a.startswith("resume=")]
    if not resume or resume[-1] in ("", "null", "None") or any(a in ("-m", "--multirun") for a in args):
        return args
    run_dir, state_dir = find_state(resume[-1], Path("/nonexistent"))
    check_resumable(state_dir)  # a broken state is said before Hydra opens the run's log
    recorded = run_dir / ".hydra" / "overrides.yaml"
    original = (yaml.safe_load(recorded.read_text()) or []) if recorded.is_file() else []
    given = {override_key(a) for a in args if not a.startswith("-")} | {"resume", "hydra.run.dir"}
    return [o for o in original if override_key(o) not in given] + \
        [a for a in args if override_key(a) not in ("resume", "hydra.run.dir")] + \
        [path_override("resume", run_dir), path_override("hydra.run.dir", run_dir),
         "hydra.mode=RUN",  # one run, even for a sweep's job: its sweep= choice would start the whole sweep again
         "hydra.output_subdir=null"]  # the run's .hydra/ record changes once the resume is accepted, not before


def _choices(group: Path) -> list[str]:
    return sorted(p.stem for p in group.glob("*.yaml"))


def model_choices() -> list[str]:
    return _choices(CONF / "model")


def model_choice(name: str) -> dict | None:
    """The `model=<name>` config group's keys, resolved (a generated model's folder is written on first use), as the
    commands other than tinv-train take `--model <name>`; None when `name` is no model= choice, or is a folder or
    file on this machine (a path wins over a choice of the same name)."""
    from omegaconf import OmegaConf

    from .config import ModelConfig

    file = CONF / "model" / f"{name}.yaml"
    if not re.fullmatch(r"\w+", name) or not file.is_file() or Path(name).expanduser().exists():
        return None
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(file))
    return OmegaConf.to_container(merged, resolve=True, enum_to_str=True)


def _launchers() -> list[str]:
    from importlib.util import find_spec

    found = ["basic"] + _choices(CONF / "hydra" / "launcher")
    plugins = {"joblib": "hydra_plugins.hydra_joblib_launcher",
               "submitit_local": "hydra_plugins.hydra_submitit_launcher",
               "submitit_slurm": "hydra_plugins.hydra_submitit_launcher"}
    return sorted(set(found) | {name for name, module in plugins.items() if find_spec(module)})


MAIN_KEYS = [
    ("token.string", "the trigger word (new to the model)"),
    ("token.init_word", "start the vectors from this word (the class word the scorer compares with)"),
    ("token.init_from", "output (encoder output of the word) | input"),
    ("token.num_vectors", "vectors per token"), ("data.image_dir", "your folder of images (and captions)"),
    ("lora.rank", "method=pivotal: the LoRA's rank"), ("lora.lr", "method=pivotal: the LoRA's learning rate"),
    ("optimizer.lr", "learning rate"), ("train.max_steps", "optimizer steps"), ("train.batch_size", "images per step"),
    ("train.mixed_precision", "no | fp16 | bf16"), ("save.every_n_steps", "also save every N steps"),
    ("val.every_n_steps", "validation loss and scores every N steps (the scores also at the end)"),
    ("score.clip", "real models: the CLIP scorer (hub id or folder; score.dino the DINO one)"),
    ("sample.every_n_steps", "preview images every N steps"), ("resume", "a run folder (or latest) to continue"),
    ("objective.metric", "what sweeps optimise"), ("logger.mode", "online | offline | disabled"),
]


def help_text() -> str:
    """tinv-train --help: the groups and their choices (the default first), the main keys, examples."""
    import yaml

    defaults = {}
    for entry in yaml.safe_load((CONF / "train.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            (group, choice), = entry.items()
            defaults[group.split(" ")[-1]] = choice
    groups = {g.name: _choices(g) for g in sorted(CONF.iterdir()) if g.is_dir() and g.name != "hydra"}
    groups["sweep"] = _choices(SWEEPS)
    groups["hydra/launcher"] = _launchers()
    lines = ["tinv-train: train a textual-inversion embedding. Choose group=choice, set key=value (Hydra overrides).",
             "", "  tinv-train                                    # the toy model learns the demo concept (~1 min, 2 CPU cores)",
             "  tinv-train model=sd15 data=folder data.image_dir=~/data/mychar token.string=mychar token.init_word=girl",
             "  tinv-train sweep=lr_vectors hydra/launcher=joblib   # a named sweep, jobs in parallel",
             "  tinv-train method=pivotal data.image_dir=~/data/mything   # the vectors and a LoRA (pivotal tuning)",
             "", "Config groups (default in [brackets]):"]
    for group, choices in groups.items():
        default = defaults.get(group, "basic" if group == "hydra/launcher" else None)
        shown = ", ".join(f"[{c}]" if c == default else c for c in choices)
        lines.append(f"  {group:<15} {shown}")
    lines += ["", "Main keys:"] + [f"  {key:<22} {text}" for key, text in MAIN_KEYS]
    lines += ["", "More: `tinv-train --cfg job` prints every key of the composed config; `tinv-train --hydra-help` "
                  "Hydra's own options; docs/README.md everything else. Other commands: tinv-generate, tinv-eval, "
                  "tinv-report, tinv-convert, tinv-bench, tinv-toy, tinv-tiny."]
    return "\n".join(lines)


def _flat_keys(node, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    for key in node.keys():
        full = f"{prefix}{key}"
        keys.append(full)
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            keys += _flat_keys(child, f"{full}.")
    return keys


def _composable(args: list[str]) -> list[str]:
    """The job overrides among the arguments, a sweep's first value standing for all of them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    candidates = [a for a in args if not a.startswith("-") and "=" in a or a.startswith("~")]
    try:
        parsed = OverridesParser.create().parse_overrides(candidates)
    except OverrideParseException as err:
        raise ConfigError(f"{first(err)}; quote a value with spaces or special characters: 'key=\"a value\"'") \
            from None
    kept = []
    for override, text in zip(parsed, candidates):
        if override.key_or_group.startswith("hydra") and not override.key_or_group.startswith("hydra.callbacks."):
            continue  # Hydra's own settings; its callbacks are composed to check their targets
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
            text = f"{text.split('=', 1)[0]}={values[0]}" if values else None
        if text:
            kept.append(text)
    return kept


def first(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def precheck(args: list[str]) -> None:
    """Compose the config once with these overrides; anything Hydra would refuse becomes a one-line ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException

    from omegaconf import OmegaConf

    from .config import check_moved_targets  # importing tinv.config registers the schemas and resolvers

    overrides = _composable(args)
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    except MissingConfigException as err:
        group = re.search(r"Could not find '([^']+)/([^']+)'", str(err))
        if group and err.options:
            raise ConfigError(f"{group.group(1)}={group.group(2)} is not a choice; {group.group(1)} is one of: "
                              f"{', '.join(err.options)}") from None
        raise ConfigError(first(err)) from None
    except ConfigCompositionException as err:
        missing = re.match(r"Could not override '([^']+)'", str(err))
        if missing:
            raise ConfigError(unknown_key_message(missing.group(1), overrides)) from None
        cause = err.__cause__
        override = re.search(r"override (\S+)", str(err))
        where = override.group(1) if override else getattr(cause, "full_key", "")
        raise ConfigError(f"{where}: {first(cause or err)}" if where else first(cause or err)) from None
    check_moved_targets(OmegaConf.to_container(cfg, resolve=False))


def unknown_key_message(key: str, overrides: list[str]) -> str:
    """"train.maxsteps is not a key; did you mean train.max_steps?" - never a suggestion to add it with `+`."""
    from hydra import compose, initialize_config_dir

    others = [o for o in overrides if override_key(o) != key]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=others)
    known = sorted(set(_flat_keys(cfg)) | {g.name for g in CONF.iterdir() if g.is_dir()} | {"sweep"})
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else "`tinv-train --cfg job` lists every key"
    return f"{key} is not a key; {hint}"


def command_line(prog: str, args: list[str]) -> list[str]:
    """The arguments as Hydra should get them (tinv.commandline); exits with one line for what cannot run."""
    if prog == "tinv-train" and ("--help" in args or "-h" in args):
        print(help_text())
        sys.exit(0)
    try:
        args = resumed_args(expand_home(args))
        precheck(args)
    except ConfigError as err:
        sys.exit(refuse(prog, err))
    return args


HYDRA_INFO_FLAGS = {"-c", "--cfg", "-p", "--package", "-i", "--info", "--resolve", "--hydra-help", "--version",
                    "-sc", "--shell-completion"}  # Hydra prints, runs nothing


def claim_run_folder(args: list[str]) -> None:
    """Before Hydra writes anything: a run folder named on the command line (hydra.run.dir=, a resume's own) is this
    run's alone. One that holds another run's files is refused unless resumed, one in use is refused, and a fresh
    folder (the default, a new name each time) is taken once Hydra made it."""
    if any(a in ("-m", "--multirun") or a in HYDRA_INFO_FLAGS for a in args):
        return
    given = [override_value(a) for a in args if a.startswith("hydra.run.dir=")]
    if not given:
        return
    folder = Path(given[-1]).expanduser()
    resuming = any(a.startswith("resume=") and override_value(a) not in ("", "null", "None") for a in args)
    what = "resume" if resuming else "hydra.run.dir"
    owner = holder(folder)  # asked before anything is written there, the lock file included
    if owner:
        raise in_use(folder, what, owner)
    if not resuming and holds_a_run(folder):
        raise ConfigError(f"hydra.run.dir={folder} already holds a run, whose files a new run would overwrite; "
                          f"continue it with {resume_argument(folder)}, or give another folder")
    hold(folder, what)


def quiet_launcher_schema_note() -> None:
    """conf/hydra/launcher/joblib.yaml shares the joblib plugin schema's name on purpose (the same command line gets
    tinv's launcher); Hydra's deprecation note about that is not the user's concern."""
    import warnings

    warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema with the same name")


def import_from_cwd() -> None:
    """A `_target_` of your own (a callback, a part) imports from the folder you run the command in, as it would
    with `python -m`; console scripts do not put that folder on the path themselves."""
    import os

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
