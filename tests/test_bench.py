"""tinv-bench through its entry point on a tiny model, and the full-size shape models' architecture."""

import json
import subprocess
import sys

import pytest

from conftest import TEST_MODEL


@pytest.mark.slow  # the benchmark's own runs (about 25 s)
def test_bench_reports_the_promised_numbers(tmp_path):
    run = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "tinv.commands.bench", TEST_MODEL, "bench.steps=3", "bench.warmup=1",
                           "train.batch_size=2", "token.num_vectors=4", "bench.cache_images=6",
                           f"hydra.run.dir={run}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run / "bench.json").read_text())
    for key in ("step_s", "floor_s", "overhead", "steps_per_s", "peak_mem_bytes", "optimizer_state_bytes",
                "vae_calls_per_step", "data_wait_frac", "device", "settings"):
        assert key in result
    assert result["overhead"] == pytest.approx(result["step_s"] / result["floor_s"])
    assert len(result["step_times_s"]) == 3 and result["floor_s"] > 0
    assert result["vae_calls_per_step"] == 0  # latents cached
    assert 0 < result["optimizer_state_bytes"] <= result["optimizer_state_limit_bytes"]  # AdamW: 2 x N x width + step
    assert result["settings"]["num_vectors"] == 4 and result["settings"]["batch_size"] == 2
    assert "overhead" in proc.stdout and "floor (median)" in proc.stdout
    assert result["images"] == 6 and len(list((run / "images").glob("*.png"))) == 6  # generated at 64 px
    assert result["cache_build_s"] > 0 and "latent cache" in proc.stdout
    live = subprocess.run([sys.executable, "-m", "tinv.commands.bench", TEST_MODEL, "bench.steps=2", "bench.warmup=0",
                           "train.cache_latents=false", f"hydra.run.dir={tmp_path / 'live'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert live.returncode == 0, live.stderr[-3000:]
    assert json.loads((tmp_path / "live" / "bench.json").read_text())["vae_calls_per_step"] == 1


@pytest.mark.parametrize("kind,params", [("sd15", (859e6, 860e6)), ("sd2", (865e6, 866e6)),
                                         ("sdxl", (2.56e9, 2.57e9))])
def test_shape_unets_have_the_real_parameter_counts(kind, params):
    """Counted on the meta device: no memory, no weights."""
    import torch

    from tinv.backbone.shapes import shape_unet

    with torch.device("meta"):
        unet = shape_unet(kind)
    count = sum(p.numel() for p in unet.parameters())
    assert params[0] <= count <= params[1]


def test_bench_help_is_tinvs_own_and_names_real_keys():
    import re
    from dataclasses import fields

    from tinv.config import BenchConfig

    proc = subprocess.run([sys.executable, "-m", "tinv.commands.bench", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("tinv-bench:"), proc.stdout[:300]
    assert "Hydra" not in proc.stdout and "threads WORK_DIR" in proc.stdout and "sharing WORK_DIR" in proc.stdout
    named = set(re.findall(r"\bbench\.(\w+)", proc.stdout)) - {"json"}  # bench.json is its output file
    assert named and named <= {f.name for f in fields(BenchConfig)}  # every key it names exists
    sub = subprocess.run([sys.executable, "-m", "tinv.commands.bench", "threads", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert sub.returncode == 0 and "--steps" in sub.stdout and "busy" in sub.stdout
