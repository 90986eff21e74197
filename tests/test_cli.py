"""The commands as a user runs them: `tinv-train` with defaults, bad input, and `tinv-tiny`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TEST_MODEL, cli


def _script(name):
    found = Path(sys.executable).parent / name
    return [str(found)] if found.exists() else [sys.executable, "-m",
                                                {"tinv-train": "tinv.train", "tinv-tiny": "tinv.backbone.tiny"}[name]]


def test_default_run_logs_to_wandb_offline_and_metrics(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(_script("tinv-train") + ["train.max_steps=4", "train.log_every_n_steps=1",
                                                   f"hydra.run.dir={run}", "logger.name=cli-test"],
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
    assert 0 <= summary["concept_accuracy"] <= 1 and summary["objective_name"] == "concept_error"
    assert (run / ".hydra" / "config.yaml").is_file()


@pytest.mark.parametrize("model,keys", [("tiny_sd2", {"emb_params": 48}), ("tiny_sdxl", {"clip_l": 32, "clip_g": 64})])
def test_other_tiny_families_through_the_cli(tmp_path, model, keys):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    run = tmp_path / "run"
    proc = subprocess.run(_script("tinv-train") + [f"model={model}", "train.max_steps=3", "token.num_vectors=2",
                                                   "logger=none", f"hydra.run.dir={run}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_file(run / "mychar.safetensors")
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: (2, w) for k, w in keys.items()}
    losses = [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(isinstance(x, float) for x in losses)
    pipe = DiffusionPipeline.from_pretrained(json.loads((run / "summary.json").read_text())["base_model"])
    pairs = [(pipe.tokenizer, pipe.text_encoder, "emb_params" if "emb_params" in keys else "clip_l")]
    if "clip_g" in keys:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2, "clip_g"))
    for tok, te, key in pairs:
        pipe.load_textual_inversion(state[key], token="mychar", text_encoder=te, tokenizer=tok)
        ids = tok.convert_tokens_to_ids(["mychar", "mychar_1"])
        assert torch.equal(te.get_input_embeddings().weight[ids], state[key])


def test_known_token_exits_nonzero_with_one_line_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    proc = cli(["token.string=cat", "logger=none", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tinv-train: error:")]
    assert len(errors) == 1 and "token.string='cat'" in errors[0] and "token.string=" in errors[0].split(";")[1]
    assert not run.exists()  # nothing written, not even Hydra's files
    assert proc.stdout.count("already token") == 0  # said once, on stderr


def test_missing_image_dir_fails_before_loading(tmp_path):
    proc = cli(["data=folder", f"data.image_dir={tmp_path / 'nope'}", "logger=none",
                f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "data.image_dir=" in proc.stderr and "does not exist" in proc.stderr


def test_folder_data_with_captions(tmp_path):
    from PIL import Image

    images = tmp_path / "imgs"
    images.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (80 + 16 * i, 64), colour).save(images / f"{i}.jpg")
        (images / f"{i}.txt").write_text(f"mychar in {colour}")
    proc = cli(["data=folder", f"data.image_dir={images}", "template=caption", "train.max_steps=2",
                "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "mychar.safetensors").is_file()


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
    ok = subprocess.run(_script("tinv-train") + ["model=sd15", "model.path=tinv/tiny-sd15", "model.resolution=64",
                                                 "train.max_steps=1", "logger=none", f"hydra.run.dir={tmp_path / 'a'}"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "a" / "mychar.safetensors").is_file()
    missing = subprocess.run(_script("tinv-train") + ["model=sd15", "model.path=tinv/not-there", "logger=none",
                                                      f"hydra.run.dir={tmp_path / 'b'}"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert missing.returncode == 2
    assert "HF_HUB_OFFLINE is set" in missing.stderr and "model.path='tinv/not-there'" in missing.stderr


def test_family_mismatch_is_named(tmp_path):
    proc = cli(["model=tiny_sd15", "model.family=sdxl", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
               cwd=tmp_path)
    assert proc.returncode == 2 and "not SDXL" in proc.stderr


def test_named_sweep_runs_from_any_directory(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # optimizer.lr given on the command line wins over the sweep's lr values: 2 jobs (token.num_vectors 1, 4)
    proc = subprocess.run(_script("tinv-train") + [TEST_MODEL, "sweep=lr_vectors", "optimizer.lr=1e-3", "train.max_steps=1",
                                                   "logger=none", f"hydra.sweep.dir={sweep_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(sweep_dir.glob("*/mychar.safetensors"))
    assert len(files) == 2
    from safetensors.torch import load_file

    shapes = sorted(load_file(f)["emb_params"].shape[0] for f in files)
    assert shapes == [1, 4]
    configs = [(p.parent / ".hydra" / "config.yaml").read_text() for p in files]
    assert all("lr: 0.001" in c for c in configs)
