"""The commands as a user runs them: `tinv-train` with defaults, bad input, and `tinv-tiny`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli


def _script(name):
    found = Path(sys.executable).parent / name
    return [str(found)] if found.exists() else [sys.executable, "-m",
                                                {"tinv-train": "tinv", "tinv-tiny": "tinv.backbone.tiny"}[name]]


def test_default_run_logs_to_wandb_offline_and_metrics(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(_script("tinv-train") + ["train.max_steps=4", "train.log_every_n_steps=1",
                                                   f"hydra.run.dir={run}", "logger.name=cli-test",
                                                   "callbacks.concept.num_samples=4", "callbacks.concept.edit_samples=2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "mychar.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    # the default (toy) model judges samples of the token at the end: logged and in the summary
    assert [r["step"] for r in records if "val/concept_accuracy" in r] == [4]
    for r in train_records:
        assert all(k in r for k in ("train/loss", "train/lr", "train/grad_norm", "train/it_per_s",
                                    "embedding/emb_params/norm_0"))
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ok"] is True and summary["step"] == 4
    assert 0 <= summary["concept_accuracy"] <= 1 and summary["objective"] == summary["concept_and_edit"]
    assert summary["wandb_name"] == "cli-test"
    assert (run / ".hydra" / "config.yaml").is_file()
    # the console: tinv's own lines and what to do next; the libraries' notices only in train.log, no bars
    console = proc.stdout + proc.stderr
    for noise in ("torchvision", "Loading weights", "Writing model shards", "wandb:", "Warning"):
        assert noise not in console, noise
    assert "torchvision" in (run / "train.log").read_text()
    assert "tinv-train: done, 4 steps" in proc.stdout and f"tinv-generate {run / 'mychar.safetensors'}" in proc.stdout
    assert (run / "samples" / "concept-step-00000004.png").is_file()  # the judged samples, as a grid
    assert "--references " in proc.stdout and f"--grid {run / 'samples' / 'eval.png'}" in proc.stdout
    assert proc.stderr.count("tinv:") <= 3  # into a log, the progress bar is drawn sparsely, not every step


def test_known_token_exits_nonzero_with_one_line_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    proc = cli(["token.string=cat", "logger=none", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tinv-train: error:")]
    assert len(errors) == 1 and "token.string='cat'" in errors[0] and "token.string=" in errors[0].split(";")[1]
    assert not run.exists()  # nothing written, not even Hydra's files
    assert proc.stdout.count("already a word") == 0  # said once, on stderr


@pytest.mark.slow  # about 11 s; the writer behind the command builds every tiny model of the default suite, which
# test_tiny_family_trains_and_loads_in_diffusers loads in diffusers
def test_tinv_tiny_writes_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "tiny-xl"
    proc = subprocess.run(_script("tinv-tiny") + ["sdxl", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert pipe.text_encoder.config.hidden_size != pipe.text_encoder_2.config.hidden_size
    again = subprocess.run(_script("tinv-tiny") + ["sdxl", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_hub_id_loads_from_the_hugging_face_cache_offline(tmp_path):
    """The hub-id path, offline: a tiny model laid out as a cached hub snapshot is found by its id."""
    from tinv.backbone.tiny import tiny_model_path

    repo = tmp_path / "hub" / "models--tinv--tiny-sd15"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_path("sd15"), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    ok = subprocess.run(_script("tinv-train") + ["model=sd15", "scorer=none", "model.path=tinv/tiny-sd15",
                                                 "model.resolution=64", "train.max_steps=1", "logger=none",
                                                 f"hydra.run.dir={tmp_path / 'a'}"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "a" / "mychar.safetensors").is_file()
    missing = subprocess.run(_script("tinv-train") + ["model=sd15", "model.path=tinv/not-there", "logger=none",
                                                      f"hydra.run.dir={tmp_path / 'b'}"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert missing.returncode == 2
    assert "HF_HUB_OFFLINE is set" in missing.stderr and "model.path='tinv/not-there'" in missing.stderr


def test_cfg_job_shows_the_composed_callbacks(tmp_path):
    proc = subprocess.run(_script("tinv-train") + ["--cfg", "job", "-p", "callbacks"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("embedding:", "validation:", "best:", "previews:", "state:", "concept:"):
        assert name in proc.stdout
    assert "every_n_steps: ${sample.every_n_steps}" in proc.stdout
