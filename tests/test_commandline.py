"""What tinv-train makes of its command line: `~` paths, --help, and one-line errors that say how to fix them."""

import subprocess
import sys

import pytest
from PIL import Image

from conftest import TEST_MODEL, compose
from tinv.commandline import expand_home, help_text, precheck
from tinv.config import check_values
from tinv.errors import ConfigError
from tinv.optim import check_optimization


def test_a_home_path_pastes_as_the_readme_writes_it(tmp_path):
    images = tmp_path / "data" / "cross"
    images.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(images / f"{i}.png")
    assert expand_home(["data.image_dir=~/x", "+a.b=~", "token.string=mychar"])[2] == "token.string=mychar"
    proc = subprocess.run([sys.executable, "-m", "tinv", TEST_MODEL, "data=folder", "data.image_dir=~/data/cross",
                           "train.max_steps=1", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                             "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "mychar.safetensors").is_file()


@pytest.mark.parametrize("args,message", [
    (["train.maxsteps=10"], "train.maxsteps is not a key; did you mean train.max_steps"),
    (["modle=sd15"], "modle is not a key; did you mean model?"),
    (["model=sd3"], "model=sd3 is not a choice; model is one of: sd15, sd15_shape, sd2"),
    (["train.mixed_precision=fp8"], "train.mixed_precision=fp8: Invalid value 'fp8', expected one of [no, fp16, bf16]"),
    (["-m", "optimizer.lr=1e-3,5e-3", "train.max_stepz=3"], "train.max_stepz is not a key; did you mean train.max_steps"),
])
def test_what_hydra_would_refuse_is_one_line_that_says_how_to_fix_it(args, message):
    with pytest.raises(ConfigError) as err:
        precheck(args)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text and "+" not in text
    precheck(["-m", "optimizer.lr=1e-3,5e-3", "model=tiny_sd15", "hydra.run.dir=/tmp/x", "sweep=optuna"])  # fine


def test_a_key_added_with_plus_that_nothing_reads_is_refused():
    with pytest.raises(ConfigError, match="train.maxsteps is not a key tinv reads, so it would do nothing; did you mean "
                                          "train.max_steps"):
        check_values(compose(["+train.maxsteps=10"]))


def test_optimizer_errors_name_the_key():
    cfg = compose(["optimizer.lr=-0.001"])
    with pytest.raises(ConfigError, match=r"^optimizer.lr=-0.001: Invalid learning rate: -0.001$"):
        check_optimization(cfg.optimizer, cfg.scheduler, 10, {})


def test_a_misspelled_key_on_the_command_line_exits_2_with_one_line_and_no_run_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tinv", TEST_MODEL, "train.maxsteps=10"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "tinv-train: error: train.maxsteps is not a key; did you mean train.max_steps or " \
                                  "train.max_bad_steps or train.max_timestep?"
    assert not (tmp_path / "outputs").exists()


def test_help_is_tinvs_own_with_every_group_sweeps_and_launchers():
    text = help_text()
    for line in ("model ", "[toy]", "sweep ", "lr_vectors", "hydra/launcher", "joblib", "train.max_steps", "tinv-train "):
        assert line in text
    assert "bench." not in text and "powered by Hydra" not in text
    proc = subprocess.run([sys.executable, "-m", "tinv", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == text
