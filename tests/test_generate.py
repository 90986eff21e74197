"""tinv-generate: images of an embedding's token on its base model, for every family and file format."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import train
from tinv.generate import main


@pytest.mark.parametrize("model", ["tiny_sd15", "tiny_sd2", "tiny_sdxl"])
def test_generate_from_a_runs_embedding_on_its_own_base_model(model, tmp_path, capsys):
    result = train(tmp_path / "run", [f"model={model}", "train.max_steps=1", "token.num_vectors=2",
                                      "optimizer.lr=0.5"])
    out = tmp_path / "images"
    assert main([str(result.embedding), "a photo of mychar", "mychar on a beach", "--n", "2", "--steps", "2",
                 "--compare", "--out", str(out)]) == 0
    images = sorted(out.glob("*.png"))
    assert len(images) == 2 * 2 * 2 + 1  # prompts x seeds x with/without, and the grid
    assert Image.open(out / "00-a_photo_of_mychar-seed0.png").size == (64, 64)  # the model's native size
    assert Image.open(out / "grid.png").size == (2 * 256, 4 * 256)  # 2 seeds x (2 prompts x 2), enlarged to 256
    with_token = np.asarray(Image.open(out / "00-a_photo_of_mychar-seed1.png"), dtype=float)
    without = np.asarray(Image.open(out / "00-a_photo_of_mychar-seed1-without.png"), dtype=float)
    assert np.abs(with_token - without).mean() > 0.5  # the token changes the image at the same seed
    printed = capsys.readouterr().out
    assert str(out / "grid.png") in printed and result.run.backbone.path in printed


def test_generate_reads_other_formats_with_the_model_given(tmp_path):
    result = train(tmp_path / "run", ["train.max_steps=1"])
    pt = tmp_path / "zorbit.pt"
    assert subprocess.run([sys.executable, "-m", "tinv.convert", str(result.embedding), str(pt), "--token",
                           "zorbit"], capture_output=True).returncode == 0
    bare = tmp_path / "elsewhere" / "zorbit.pt"
    bare.parent.mkdir()
    bare.write_bytes(pt.read_bytes())  # no summary.json beside it, no header: the model must be given
    proc = subprocess.run([sys.executable, "-m", "tinv.generate", str(bare), "a photo of zorbit", "--n", "1",
                           "--steps", "1", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "give one with --model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, "-m", "tinv.generate", str(bare), "a photo of zorbit", "--n", "1",
                           "--steps", "1", "--model", result.run.backbone.path, "--family", "sd1", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "o" / "00-a_photo_of_zorbit-seed0.png").is_file()


def test_generate_with_the_lora_of_a_pivotal_run(tmp_path, capsys):
    """--lora draws with the LoRA (the same seed differs from the embedding alone), a bundle given as the embedding
    brings its LoRA along, and --lora-scale 0 is the embedding alone again."""
    train(tmp_path / "run", ["method=pivotal", "train.max_steps=2", "lora.lr=0.05", "lora.start_frac=0",
                             "token.stop_frac=1"])
    run = tmp_path / "run"

    def draw(name, *args):
        out = tmp_path / name
        assert main([str(run / args[0]), "a photo of mychar", "--n", "1", "--steps", "2", "--out", str(out),
                     *args[1:]]) == 0
        return np.asarray(Image.open(out / "00-a_photo_of_mychar-seed0.png"), dtype=float)

    alone = draw("alone", "mychar.safetensors")
    assert "with its LoRA" not in capsys.readouterr().out
    paired = draw("paired", "mychar.safetensors", "--lora", str(run / "mychar-lora.safetensors"))
    assert "with its LoRA" in capsys.readouterr().out
    bundled = draw("bundled", "mychar-bundle.safetensors")
    assert np.abs(paired - alone).mean() > 0.5 and np.array_equal(bundled, paired)
    assert np.array_equal(draw("off", "mychar.safetensors", "--lora", str(run / "mychar-lora.safetensors"),
                               "--lora-scale", "0"), alone)
    assert main([str(run / "mychar.safetensors"), "a photo of mychar", "--lora-scale", "0.5"]) == 2
