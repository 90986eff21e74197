"""tinv-generate: images of an embedding's token on its base model, for every family and file format."""

import re

import numpy as np
import pytest
from PIL import Image

from conftest import train
from tinv.commands.generate import main


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
    grid = np.asarray(Image.open(out / "grid.png").convert("L"))
    label, top = 240, 24  # a column of row labels (the prompts), a line of column labels (the seeds)
    assert grid.shape == (top + 4 * 256, label + 2 * 256)  # 2 seeds x (2 prompts x 2), enlarged to 256
    for row in range(4):  # each row's prompt, with and without the token, written beside it
        assert (grid[top + row * 256:top + row * 256 + 20, :label] < 128).sum() > 20, row
    for col in range(2):  # "seed 0", "seed 1" above the columns
        assert (grid[:top, label + col * 256:label + col * 256 + 80] < 128).sum() > 20, col
    with_token = np.asarray(Image.open(out / "00-a_photo_of_mychar-seed1.png"), dtype=float)
    without = np.asarray(Image.open(out / "00-a_photo_of_mychar-seed1-without.png"), dtype=float)
    assert np.abs(with_token - without).mean() > 0.5  # the token changes the image at the same seed
    printed = capsys.readouterr().out
    assert str(out / "grid.png") in printed and result.run.backbone.path in printed


def test_files_travel_with_their_name_and_base_model(tmp_path, capsys):
    """A .pt made by tinv-convert, alone on another machine, still names its base model and its word; a recorded
    folder that is not there gives way to the recorded model= choice; --model takes a choice; a format with no room
    for more says so; an image is named for what it is."""
    import torch

    from tinv.commands.convert import main as convert
    from tinv.formats.embedding import EmbeddingMeta, read_embedding, save_embedding

    result = train(tmp_path / "run", ["train.max_steps=1", "output_name=zorbit"])
    assert result.embedding.name == "zorbit.safetensors" and read_embedding(result.embedding).name == "zorbit"
    bare = tmp_path / "elsewhere" / "zorbit.pt"
    bare.parent.mkdir()
    assert convert([str(result.embedding), str(bare)]) == 0  # no summary.json beside it: the file says it all
    pt = read_embedding(bare)
    assert (pt.name, pt.header["tinv.step"], pt.header["tinv.model"]) == ("zorbit", "1", "tiny_sd15")
    assert torch.load(bare, weights_only=True)["name"] == "zorbit"  # what A1111 reads

    def generate(embedding, *args):
        return main([str(embedding), "a photo of zorbit", "--n", "1", "--steps", "1", "--out", str(tmp_path / "o"),
                     *args])

    assert generate(bare) == 0
    assert f"1 image of 'zorbit' on {result.run.backbone.path} (model=tiny_sd15, sd1)" in capsys.readouterr().out
    moved = tmp_path / "moved.safetensors"  # trained on a folder this machine does not have
    vectors = read_embedding(bare).vectors
    save_embedding(moved, vectors, EmbeddingMeta("zorbit", "sd1", "/gone/tiny", 1, "tiny_sd15"), "kohya")
    assert generate(moved) == 0
    captured = capsys.readouterr()
    assert "/gone/tiny, which is not on this machine; using model=tiny_sd15" in captured.err
    assert "(model=tiny_sd15, sd1)" in captured.out and "/gone/tiny" not in captured.out
    plain = tmp_path / "plain.pt"  # an A1111 .pt from elsewhere: the vectors and a name, no base model
    torch.save({"string_to_param": {"*": vectors["emb_params"]}, "name": "zorbit"}, plain)
    assert generate(plain) == 2 and "give one with --model" in capsys.readouterr().err
    assert generate(plain, "--model", "tiny_sd15") == 0  # any model= choice of tinv-train
    assert generate(plain, "--model", "tiny_sd16") == 2
    assert "--model tiny_sd16: not a model= choice (sd15, " in capsys.readouterr().err

    sdxl = tmp_path / "sdxl.safetensors"  # an SDXL .pt has room for the vectors alone (A1111 reads each as a tensor)
    save_embedding(sdxl, {"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 32)},
                   EmbeddingMeta("zorbit", "sdxl", "/models/sdxl", 5, "sdxl"), "kohya")
    assert convert([str(sdxl), str(tmp_path / "sdxl.pt")]) == 0
    assert "holds the vectors alone" in capsys.readouterr().err and read_embedding(tmp_path / "sdxl.pt").header == {}
    assert generate(tmp_path / "sdxl.pt") == 2
    err = capsys.readouterr().err
    assert "holds the vectors alone" in err and len(err.strip().splitlines()) == 1

    assert generate(tmp_path / "o" / "grid.png") == 2  # an image is not an embedding (or PyTorch's paragraph)
    err = capsys.readouterr().err
    assert "not an embedding file (it is an image, PNG)" in err and len(err.strip().splitlines()) == 1


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


def test_a_runs_name_is_the_one_word_everywhere(tmp_path, capsys, caplog):
    """output_name names the files, is the word A1111 users write, is in the file's header, and is what the printed
    tinv-generate line prompts with: pasted, that line draws the token."""
    import shlex

    from tinv.formats.embedding import read_embedding

    result = train(tmp_path / "run", ["train.max_steps=1", "output_name=bluetri", "token.string=mychar"])
    printed = capsys.readouterr().out
    assert result.embedding.name == "bluetri.safetensors" and read_embedding(result.embedding).name == "bluetri"
    assert "write bluetri in a prompt" in printed and "embedding:bluetri" in printed
    pasted = shlex.split(printed.split("  next       ")[1].splitlines()[0])
    assert pasted[0] == "tinv-generate" and pasted[2] == "a photo of bluetri"
    assert main(pasted[1:] + ["--n", "1", "--steps", "1", "--out", str(tmp_path / "o")]) == 0
    assert "does nothing there" not in caplog.text and "image of 'bluetri'" in capsys.readouterr().out


@pytest.mark.parametrize("override,key", [("output_name=../x", "output_name"), ("output_name=a b", "output_name"),
                                          ("output_name=x.safetensors", "output_name"),
                                          ("token.string='`id>x`'", "token.string")])
def test_a_name_that_is_no_word_is_refused_before_anything_loads(override, key, tmp_path):
    from tinv.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.*one word"):
        train(tmp_path / "run", [override])
    assert not (tmp_path / "run").exists()
