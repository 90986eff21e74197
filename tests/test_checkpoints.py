"""Real checkpoint paths on tiny models: single files, family checks, safe loading, embedding formats, convert."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import train
from tinv.backbone.single_file import write_single_file
from tinv.backbone.tiny import TINY_FAMILIES, tiny_model_path, write_tiny_model
from tinv.formats.convert import convert
from tinv.formats.embedding import read_embedding
from tinv.errors import ConfigError

KINDS = {"sd15": "tiny_sd15", "sd2": "tiny_sd2", "sdxl": "tiny_sdxl"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per tiny kind: its single-file export, and a config folder of the same family with *other* weights (so a
    loader that silently read weights from the config folder would be caught)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for kind in KINDS:
        config_dir = write_tiny_model(kind, root / f"{kind}-config", seed=1)
        if kind == "sdxl":  # through the command, as a user makes one
            proc = subprocess.run([sys.executable, "-m", "tinv.backbone.tiny", kind, str(root / "sdxl-cli"),
                                   "--single-file", str(root / "sdxl.safetensors")], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr[-2000:]
            single = root / "sdxl.safetensors"
        else:
            from diffusers import DiffusionPipeline

            single = write_single_file(DiffusionPipeline.from_pretrained(tiny_model_path(kind)), TINY_FAMILIES[kind],
                                       root / f"{kind}.{'ckpt' if kind == 'sd2' else 'safetensors'}")
        out[kind] = (single, config_dir)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_single_file_trains_like_the_folder(kind, exports, tmp_path):
    single, config_dir = exports[kind]
    common = [f"model={KINDS[kind]}", "train.max_steps=2", "token.num_vectors=2"]
    folder = train(tmp_path / "folder", common)  # the exports hold the seed-0 weights of the cached tiny models
    one = train(tmp_path / "single", common + [f"model.path={single}", f"model.config_dir={config_dir}"])
    assert one.run.backbone.src.single_file
    for key, value in folder.run.token.vectors().items():
        torch.testing.assert_close(one.run.token.vectors()[key], value, rtol=0, atol=1e-6)
    assert one.final_loss == pytest.approx(folder.final_loss, abs=1e-6)


def test_wrong_family_is_named(exports, tmp_path):
    single, config_dir = exports["sdxl"]
    with pytest.raises(ConfigError, match=r"is an SDXL \(model=sdxl\) checkpoint but model.family is 'sd1'"):
        train(tmp_path, ["model=tiny_sd15", f"model.path={single}", f"model.config_dir={config_dir}"])
    with pytest.raises(ConfigError, match="model.config_dir=.* has one text encoder, so it is not SDXL"):
        train(tmp_path, ["model=tiny_sdxl", f"model.path={single}", f"model.config_dir={exports['sd15'][1]}"])


def test_offline_single_file_without_config_says_to_set_config_dir(exports, tmp_path):
    single, _ = exports["sd2"]
    with pytest.raises(ConfigError, match=r"single file.*offline it is not cached; set model.config_dir="):
        train(tmp_path, ["model=tiny_sd2", f"model.path={single}"])


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _malicious(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload(marker)}, f)
    return path


def test_malicious_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    model = _malicious(tmp_path / "evil.ckpt", marker)
    weights = _malicious(tmp_path / "evil.pt", marker)
    with pytest.raises(ConfigError, match="refused to load - it is not a plain tensor file.*safetensors"):
        train(tmp_path / "a", ["model=tiny_sd15", f"model.path={model}"])
    with pytest.raises(ConfigError, match="token.weights: .*refused - not a plain tensor file"):
        train(tmp_path / "b", [f"token.weights={weights}"])
    with pytest.raises(ConfigError, match="refused"):
        convert(weights, tmp_path / "out.safetensors")
    assert not marker.exists()


def _formats(tmp_path: Path, family: str) -> dict[str, Path]:
    """The same vectors written in every format users bring."""
    gen = torch.Generator().manual_seed(0)
    if family == "sdxl":
        l, g = torch.randn(3, 32, generator=gen), torch.randn(3, 64, generator=gen)
        kohya = tmp_path / "kohya.safetensors"
        save_file({"clip_l": l, "clip_g": g}, str(kohya))
        a1111 = tmp_path / "a1111.pt"
        torch.save({"clip_l": l, "clip_g": g}, a1111)
        pair = tmp_path / "pair"
        pair.mkdir()
        save_file({"mytok": l}, str(pair / "learned_embeds.safetensors"))
        save_file({"mytok": g}, str(pair / "learned_embeds_2.safetensors"))
        return {"kohya": kohya, "a1111_pt": a1111, "diffusers_pair": pair}
    v = torch.randn(3, 32, generator=gen)
    files = {"kohya": tmp_path / "kohya.safetensors", "onetrainer": tmp_path / "ot.safetensors",
             "a1111_pt": tmp_path / "a1111.pt", "diffusers_st": tmp_path / "learned_embeds.safetensors",
             "diffusers_bin": tmp_path / "learned_embeds.bin"}
    save_file({"emb_params": v}, str(files["kohya"]))
    save_file({"emp_params": v}, str(files["onetrainer"]))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "mytok", "step": 5}, files["a1111_pt"])
    save_file({"mytok": v}, str(files["diffusers_st"]))
    torch.save({"mytok": v}, files["diffusers_bin"])
    return files


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_weights_format_starts_training_from_its_rows(family, tmp_path):
    model = "tiny_sdxl" if family == "sdxl" else "tiny_sd15"
    for name, path in _formats(tmp_path, family).items():
        expected = read_embedding(path).vectors
        result = train(tmp_path / f"run-{name}", [f"model={model}", f"token.weights={path}", "optimizer.lr=0.0",
                                                  "train.max_steps=1"])
        assert result.run.token.num_vectors == 3, name  # from the file
        for key, value in expected.items():
            assert torch.equal(result.run.token.vectors()[key], value.float()), (name, key)


def test_weights_mismatches_fail_before_models_load(tmp_path, monkeypatch):
    from tinv.backbone import Backbone

    monkeypatch.setattr(Backbone, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    files = _formats(tmp_path, "sd1")
    with pytest.raises(ConfigError, match=r"holds vectors for \['emb_params'\] but this model needs \['clip_l', "
                                          r"'clip_g'\] \(one set per text encoder\)"):
        train(tmp_path / "a", ["model=tiny_sdxl", f"token.weights={files['kohya']}"])
    with pytest.raises(ConfigError, match="its emb_params vectors are 32 wide but the text encoder is 48 wide"):
        train(tmp_path / "b", ["model=tiny_sd2", f"token.weights={files['kohya']}"])
    (tmp_path / "xl").mkdir()
    pair = _formats(tmp_path / "xl", "sdxl")["diffusers_pair"]
    with pytest.raises(ConfigError, match="is one file of a diffusers SDXL pair; give the folder"):
        train(tmp_path / "d", ["model=tiny_sdxl", f"token.weights={pair / 'learned_embeds.safetensors'}"])
    with pytest.raises(ConfigError, match="token.num_vectors=2 but token.weights=.* has 3 vectors"):
        train(tmp_path / "c", [f"token.weights={files['kohya']}", "token.num_vectors=2"])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_convert_round_trips_bit_exactly_and_loads_in_diffusers(family, tmp_path):
    from diffusers import DiffusionPipeline

    src = _formats(tmp_path, family)["kohya"]
    original = read_embedding(src).vectors
    targets = {"a1111": tmp_path / "x.pt", "diffusers": tmp_path / ("xl_pair" if family == "sdxl" else "x.bin"),
               "kohya": tmp_path / "x2.safetensors"}
    pipe = DiffusionPipeline.from_pretrained(tiny_model_path("sdxl" if family == "sdxl" else "sd15"))
    for fmt, out in targets.items():
        written = convert(src, out, fmt, token=f"tok{fmt}")
        back = read_embedding(convert(written, tmp_path / f"back-{fmt}.safetensors", "kohya")).vectors
        assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in original), fmt
        if family == "sdxl":
            if fmt == "diffusers":  # the two files, as diffusers' own loader reads them
                pipe.load_textual_inversion(str(written / "learned_embeds.safetensors"), token=f"tok{fmt}",
                                            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
                pipe.load_textual_inversion(str(written / "learned_embeds_2.safetensors"), token=f"tok{fmt}",
                                            text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
            else:
                loaded = read_embedding(written).vectors
                pipe.load_textual_inversion(loaded["clip_l"], token=f"tok{fmt}", text_encoder=pipe.text_encoder,
                                            tokenizer=pipe.tokenizer)
                pipe.load_textual_inversion(loaded["clip_g"], token=f"tok{fmt}", text_encoder=pipe.text_encoder_2,
                                            tokenizer=pipe.tokenizer_2)
            ids = pipe.tokenizer_2.convert_tokens_to_ids([f"tok{fmt}", f"tok{fmt}_1", f"tok{fmt}_2"])
            assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[ids], original["clip_g"])
        else:
            pipe.load_textual_inversion(str(written), token=f"tok{fmt}")
            ids = pipe.tokenizer.convert_tokens_to_ids([f"tok{fmt}", f"tok{fmt}_1", f"tok{fmt}_2"])
            assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], original["emb_params"])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_convert_pair_round_trips(family, tmp_path):
    src = _formats(tmp_path, family)["kohya"]
    original = read_embedding(src).vectors
    names = {"kohya": "k.safetensors", "a1111": "a.pt", "diffusers": "d_dir"}
    files = {fmt: convert(src, tmp_path / "start" / name, fmt, token="t") for fmt, name in names.items()}
    for a, first in files.items():
        for b in names:
            there = convert(first, tmp_path / f"{a}-{b}" / names[b], b, token="t")
            back = convert(there, tmp_path / f"{a}-{b}-back" / names[a], a, token="t")
            vectors = read_embedding(back).vectors
            assert vectors.keys() == original.keys()
            assert all(torch.equal(vectors[k], original[k]) and vectors[k].dtype == original[k].dtype
                       for k in original), (a, b)


def test_sd1_and_sd2_folders_are_told_apart(tmp_path):
    with pytest.raises(ConfigError, match="looks like an sd2 model"):
        train(tmp_path, ["model=tiny_sd15", f"model.path={tiny_model_path('sd2')}"])


def test_convert_cli(tmp_path):
    src = _formats(tmp_path, "sd1")["a1111_pt"]
    proc = subprocess.run([sys.executable, "-m", "tinv.commands.convert", str(src), str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(read_embedding(tmp_path / "o.safetensors").vectors["emb_params"],
                       read_embedding(src).vectors["emb_params"])
    bad = subprocess.run([sys.executable, "-m", "tinv.commands.convert", str(tmp_path / "nope.pt"), str(tmp_path / "x.pt")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_replacement_vae_folder_and_single_file(tmp_path, exports):
    from diffusers import AutoencoderKL

    other = exports["sd15"][1]  # seed-1 weights: a different VAE of the same shape
    ref = AutoencoderKL.from_pretrained(other, subfolder="vae").state_dict()
    vae_file = tmp_path / "vae.safetensors"
    from tinv.backbone.single_file import VAE, vae_to_original

    save_file({k.removeprefix(VAE): v.contiguous() for k, v in
               vae_to_original(AutoencoderKL.from_pretrained(other, subfolder="vae")).items()}, str(vae_file))
    for i, source in enumerate((str(Path(other) / "vae"), str(vae_file))):
        result = train(tmp_path / f"run{i}", ["train.max_steps=1", f"model.vae={source}"])
        state = result.run.backbone.vae.state_dict()
        assert all(torch.equal(state[k], v) for k, v in ref.items()), source


def test_v_parameterization_and_clip_skip(tmp_path):
    result = train(tmp_path / "v", ["train.max_steps=1", "model.v_parameterization=true", "model.clip_skip=2"])
    backbone = result.run.backbone
    assert backbone.prediction_type == "v_prediction"
    ids = backbone.tokenize(["a photo of a cat"])
    model = backbone.encoders[0].model
    with torch.no_grad():
        expected = model.final_layer_norm(model(ids[0], output_hidden_states=True).hidden_states[-2])
        got = backbone.conditioning(ids, {})["encoder_hidden_states"]
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, model(ids[0]).last_hidden_state)
