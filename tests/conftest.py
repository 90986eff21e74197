"""Shared fixtures: an isolated tinv cache, offline hub, and helpers to compose configs and run jobs."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Before tinv is imported: tiny models and demo images go to a per-session cache; nothing touches the network.
os.environ.setdefault("TINV_CACHE", tempfile.mkdtemp(prefix="tinv-test-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("WANDB_MODE", None)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


TEST_MODEL = "model=tiny_sd15"  # the suite's default: random tiny weights; tests of the toy model name model=toy


def with_test_model(args):
    """The tiny model unless the arguments choose a model (or an experiment, which may)."""
    args = list(args)
    if any(a.startswith(("model=", "experiment=")) for a in args):
        return args
    # beside the other overrides: argparse wants them in one run, around flags such as -m or --cfg job
    at = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), len(args))
    return [*args[:at], TEST_MODEL, *args[at:]]


def compose(overrides=()):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import tinv.config  # noqa: F401 - schemas and resolvers

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=with_test_model(overrides))


def train(run_dir, overrides=()):
    """Compose and run one job in this process, through the same `run` the CLI calls, and print its end as the CLI
    does."""
    from tinv.commands.train import announce
    from tinv.train import run

    cfg = compose(["logger=none", *overrides])
    result = run(cfg, run_dir=run_dir)
    announce(result, cfg)
    return result


def cli(args, cwd, timeout=300):
    """`tinv-train ARGS` as a user types it, in a subprocess."""
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "tinv", *with_test_model(args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


# Folder names with every character that has broken paths, overrides or shells: a separator, `=`, `,`, spaces and
# both quotes. A sweep over them must still give each job one flat folder.
ODD_NAMES = ("my data/it's \"blue\", v=2", "my data/set=b, 'red'")


def odd_image_folders(root: Path) -> list[Path]:
    """Copies of the demo images in folders named ODD_NAMES under `root`."""
    import shutil

    from tinv.toy.demo import demo_images_dir

    folders = [root / name for name in ODD_NAMES]
    for folder in folders:
        shutil.copytree(demo_images_dir(), folder)
    return folders


def hydra_quoted(value) -> str:
    """A string as one quoted value of a Hydra override (a sweep's list takes several, comma-separated)."""
    assert "\\" not in str(value), "Hydra reads a backslash before a quote as an escape: not needed here"
    return "'" + str(value).replace("'", "\\'") + "'"
