"""The data pipeline: kohya TOML and folders, captions, buckets, the latent cache, and bad input."""

import logging
import random
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli, train
from tinv.data import BucketBatchSampler, PromptBuilder, build_training_set
from tinv.data.captions import CaptionProcessor
from tinv.data.spec import SubsetSpec
from tinv.trained.token import ConceptToken
from tinv.errors import ConfigError
from tinv.losses import DiffusionLoss
from tinv.trainer import Trainer


def make_images(folder: Path, sizes, caption=None, ext=".png", colour=(200, 40, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, colour).save(folder / f"img{i}{ext}")
        if caption is not None:
            (folder / f"img{i}.txt").write_text(caption.format(i=i))
    return folder


def build(**kw):
    kw.setdefault("family", "sd1")
    kw.setdefault("batch_size", 2)
    kw.setdefault("resolution", 64)
    return build_training_set(**kw)


# ---- kohya TOML --------------------------------------------------------------------------------------------------

def test_toml_precedence_and_epoch_length(tmp_path):
    a = make_images(tmp_path / "a", [(64, 64)] * 3)
    for i in range(3):
        (a / f"img{i}.caption").write_text(f"mychar a{i}")
    b = make_images(tmp_path / "b", [(64, 64)] * 2, caption="mychar b{i}")
    toml = tmp_path / "dataset.toml"
    toml.write_text(textwrap.dedent(f"""
        [general]
        shuffle_caption = true
        caption_extension = ".txt"
        keep_tokens = 1
        flip_aug = true

        [[datasets]]
        resolution = [128, 64]
        batch_size = 3
        keep_tokens = 2

          [[datasets.subsets]]
          image_dir = "{a}"
          num_repeats = 4
          caption_extension = ".caption"
          flip_aug = false

          [[datasets.subsets]]
          image_dir = "{b}"
          num_repeats = 2
    """))
    data = build(dataset_config=str(toml), caption_prefix="pre ", num_repeats=9)
    assert len(data.specs) == 1
    ds = data.specs[0]
    assert ds.resolution == (128, 64) and ds.batch_size == 3  # dataset level beats ours
    sub_a, sub_b = ds.subsets
    assert (sub_a.caption_extension, sub_b.caption_extension) == (".caption", ".txt")  # subset > general
    assert (sub_a.keep_tokens, sub_b.keep_tokens) == (2, 2)  # dataset > general
    assert (sub_a.flip_aug, sub_b.flip_aug) == (False, True)  # subset > general
    assert sub_a.shuffle_caption and sub_a.caption_prefix == "pre "  # general, and ours at the bottom
    assert (sub_a.num_repeats, sub_b.num_repeats) == (4, 2)
    assert len(data) == 3 * 4 + 2 * 2
    assert sorted(s.caption for s in data.samples) == ["pre mychar a0", "pre mychar a1", "pre mychar a2",
                                                       "pre mychar b0", "pre mychar b1"]


def test_toml_several_datasets_keep_their_resolution_and_batch_size(tmp_path):
    a = make_images(tmp_path / "a", [(64, 64)] * 5)
    b = make_images(tmp_path / "b", [(128, 128)] * 4)
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "{a}"\n'
                    f'[[datasets]]\nresolution = 128\nbatch_size = 4\n[[datasets.subsets]]\nimage_dir = "{b}"\n')
    data = build(dataset_config=str(toml))
    batches = BucketBatchSampler(data, seed=0).batches(0)
    sizes = sorted((data.samples[data.order[b[0]]].dataset, len(b)) for b in batches)
    assert sizes == [(0, 1), (0, 2), (0, 2), (1, 4)]
    assert {data.samples[data.order[b[0]]].bucket for b in batches} == {(64, 64), (128, 128)}


@pytest.mark.parametrize("body,message", [
    ("[[datasets]]\nresolutoin = 64\n[[datasets.subsets]]\nimage_dir = '{d}'", "unknown key 'resolutoin'"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}'\nnum_repeat = 2", "unknown key 'num_repeat'"),
    ("[general]\nis_reg = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}'", "is_reg=true"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}'\nis_reg = true", "regularization images"),
    ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2", "has no image_dir"),
    ("[[datasets]]\nresolution = 64", "has no [[datasets.subsets]]"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{d}/missing'", "does not exist"),
    ("[[datasets]\n", "not valid TOML"),
])
def test_toml_errors_name_the_key_and_file(tmp_path, body, message):
    make_images(tmp_path / "imgs", [(64, 64)])
    toml = tmp_path / "bad.toml"
    toml.write_text(body.format(d=tmp_path / "imgs"))
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        build(dataset_config=str(toml))
    assert str(toml) in str(err.value)


def test_toml_keys_that_do_not_apply_warn(tmp_path, caplog):
    d = make_images(tmp_path / "imgs", [(64, 64)])
    toml = tmp_path / "lora.toml"
    toml.write_text(f"[[datasets]]\nnetwork_multiplier = 0.5\n[[datasets.subsets]]\nimage_dir = '{d}'\n"
                    "caption_dropout_rate = 0.1\nis_reg = false\n")
    with caplog.at_level(logging.WARNING):
        build(dataset_config=str(toml))
    assert "caption_dropout_rate=0.1 is ignored" in caplog.text and "network_multiplier=0.5 is ignored" in caplog.text


def test_kohya_folder_convention(tmp_path):
    root = tmp_path / "train"
    make_images(root / "10_mychar girl", [(64, 64)] * 2)
    make_images(root / "3_mychar", [(64, 64)], caption="mychar smiling")
    Image.new("RGB", (64, 64)).save(root / "loose.png")
    data = build(image_dir=str(root))
    subs = {Path(s.image_dir).name: s for s in data.subsets}
    assert subs["10_mychar girl"].num_repeats == 10 and subs["10_mychar girl"].class_tokens == "mychar girl"
    assert len(data) == 2 * 10 + 1 * 3
    captions = sorted(s.caption for s in data.samples)
    assert captions == ["mychar girl", "mychar girl", "mychar smiling"]  # class tokens only where no caption file


# ---- captions ----------------------------------------------------------------------------------------------------

def test_shuffle_keeps_the_first_tokens_and_the_token_vectors_together():
    proc = CaptionProcessor(SubsetSpec(shuffle_caption=True, keep_tokens=1))
    token = ConceptToken("mychar", num_vectors=3)
    rng = random.Random(0)
    seen = set()
    for _ in range(30):
        out = proc("photo, mychar smiling, red hat, blue sky, tree", rng)
        tags = out.split(", ")
        assert tags[0] == "photo" and sorted(tags) == sorted(["photo", "mychar smiling", "red hat", "blue sky",
                                                               "tree"])
        assert "mychar mychar1 mychar2 smiling" in token.expand(out)
        seen.add(out)
    assert len(seen) > 5


def test_keep_tokens_separator_fixes_front_and_back():
    proc = CaptionProcessor(SubsetSpec(shuffle_caption=True, keep_tokens=3, keep_tokens_separator="|||"))
    rng = random.Random(1)
    for _ in range(20):
        tags = proc("mychar, 1girl ||| a, b, c, d ||| masterpiece, best", rng).split(", ")
        assert tags[:2] == ["mychar", "1girl"] and tags[-2:] == ["masterpiece", "best"]
        assert sorted(tags[2:-2]) == ["a", "b", "c", "d"]


def test_secondary_separator_wildcards_dropout():
    rng = random.Random(2)
    proc = CaptionProcessor(SubsetSpec(shuffle_caption=True, secondary_separator=";;;"))
    for _ in range(20):
        out = proc("x, red;;;hat, y", rng)
        assert "red, hat" in out  # joined tags moved as one unit
    wild = CaptionProcessor(SubsetSpec(enable_wildcard=True))
    outs = {wild("a {red|blue|green} mychar\nsecond line mychar", rng) for _ in range(60)}
    assert {"a red mychar", "a blue mychar", "a green mychar", "second line mychar"} <= outs
    drop = CaptionProcessor(SubsetSpec(caption_tag_dropout_rate=0.5, keep_tokens=1))
    lengths = [len(drop("mychar, a, b, c, d, e, f, g", rng).split(", ")) for _ in range(200)]
    assert all(n >= 1 for n in lengths) and 3.0 < np.mean(lengths) < 6.0


@pytest.mark.parametrize("mode", ["prepend", "warn", "error"])
def test_missing_token_modes(tmp_path, caplog, mode):
    d = make_images(tmp_path / "imgs", [(64, 64)] * 3, caption="a red thing {i}")
    (d / "img0.txt").write_text("mychar in red")
    token = ConceptToken("mychar")
    prompts = PromptBuilder("caption", token, missing_token=mode)
    if mode == "error":
        with pytest.raises(ConfigError, match=r"img1.png: its caption 'a red thing 1' lacks the token 'mychar' "
                                              r"\(2 of 3 captions do\)"):
            build(image_dir=str(d), prompts=prompts)
        return
    with caplog.at_level(logging.WARNING):
        build(image_dir=str(d), prompts=prompts)
        build(image_dir=str(d), prompts=PromptBuilder("object", token, missing_token=mode))  # templates: no captions
    assert caplog.text.count("2 of 3 captions do not contain the token 'mychar'") == 1
    assert ("put first" in caplog.text) == (mode == "prepend")
    assert prompts("a red thing") == ("mychar, a red thing" if mode == "prepend" else "a red thing")


def test_resolution_as_width_height_from_the_command_line(tmp_path, run_dir):
    d = make_images(tmp_path / "imgs", [(128, 96)] * 2)
    result = train(run_dir, ["data=folder", f"data.image_dir={d}", "data.resolution=[96,64]", "train.max_steps=1"])
    assert result.run.dataset.samples[0].bucket == (96, 64)


def test_a_bad_resolution_names_the_key_as_the_user_set_it(tmp_path):
    d = make_images(tmp_path / "imgs", [(64, 64)])
    with pytest.raises(ConfigError, match=r"^data.resolution=30 must be a positive multiple of 8"):
        build(image_dir=str(d), resolution=30)


def test_bucket_limits_are_rounded_to_the_step(tmp_path):
    d = make_images(tmp_path / "imgs", [(300, 100)])
    data = build(image_dir=str(d), resolution=128, enable_bucket=True, min_bucket_reso=100, max_bucket_reso=300)
    assert all(side % 64 == 0 for side in data.samples[0].bucket)


# ---- buckets -----------------------------------------------------------------------------------------------------

def test_aspect_ratios_get_distinct_buckets_and_batches_never_mix(tmp_path):
    d = make_images(tmp_path / "imgs", [(256, 128)] * 3 + [(128, 256)] * 3 + [(200, 200)] * 3)
    data = build(image_dir=str(d), resolution=128, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256,
                 batch_size=2)
    buckets = {s.path.name: s.bucket for s in data.samples}
    wide, tall, square = buckets["img0.png"], buckets["img3.png"], buckets["img6.png"]
    assert wide[0] > wide[1] and tall[0] < tall[1] and square[0] == square[1]
    assert len({wide, tall, square}) == 3
    for w, h in (wide, tall, square):
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 128 * 128
    for epoch in range(3):
        for batch in BucketBatchSampler(data, seed=0).batches(epoch):
            assert len({data.samples[data.order[p]].bucket for p in batch}) == 1
    item = data[data.order.index(0)]
    assert item["pixel_values"].shape == (3, wide[1], wide[0])


def test_no_upscale_keeps_small_images_in_a_smaller_bucket(tmp_path):
    d = make_images(tmp_path / "imgs", [(96, 70), (400, 300)])
    data = build(image_dir=str(d), resolution=128, enable_bucket=True, bucket_no_upscale=True)
    small, large = (s.bucket for s in data.samples)
    assert small == (64, 64)  # its own size rounded down to the step
    assert large[0] * large[1] <= 128 * 128 and large[0] > large[1]
    plain = build(image_dir=str(d), resolution=128)  # no buckets: upscaled to the square
    assert all(s.bucket == (128, 128) for s in plain.samples)
    assert plain[0]["pixel_values"].shape == (3, 128, 128)


def test_bucket_steps_per_family(tmp_path):
    d = make_images(tmp_path / "imgs", [(64, 64)])
    with pytest.raises(ConfigError, match="bucket_reso_steps=32 must be a multiple of 64 for sd1"):
        build(image_dir=str(d), enable_bucket=True, bucket_reso_steps=32)
    build(image_dir=str(d), enable_bucket=True, bucket_reso_steps=32, family="sdxl")


def test_sdxl_time_ids_carry_real_sizes(tmp_path, run_dir):
    d = make_images(tmp_path / "imgs", [(128, 64)] * 2 + [(64, 128)] * 2)
    result = train(run_dir, ["model=tiny_sdxl", "data=folder", f"data.image_dir={d}", "data.enable_bucket=true",
                             "data.bucket_reso_steps=32", "data.min_bucket_reso=32", "data.resolution=64",
                             "train.max_steps=2", "train.batch_size=2"])
    data = result.run.dataset
    seen = set()
    for position in range(len(data)):
        item = data[position]
        sample = data.samples[item["sample"]]
        assert item["original_size"] == (sample.size[1], sample.size[0])
        assert item["target_size"] == (sample.bucket[1], sample.bucket[0])
        seen.add(item["original_size"])
    assert seen == {(64, 128), (128, 64)}
    captured = []
    backbone = result.run.backbone
    original = backbone.conditioning
    backbone.conditioning = lambda ids, batch: captured.append(batch) or original(ids, batch)
    Trainer(DiffusionLoss()).micro_batch_loss(result.run, next(iter(result.run.loader)))
    time_ids = torch.cat([captured[0]["original_size"], captured[0]["crop_top_left"], captured[0]["target_size"]], 1)
    assert time_ids.shape == (2, 6)
    assert {tuple(r[:2].tolist()) for r in time_ids} <= {(64.0, 128.0), (128.0, 64.0)}


# ---- the latent cache --------------------------------------------------------------------------------------------

def test_disk_cache_is_reused_and_only_a_changed_image_is_reencoded(tmp_path):
    d = make_images(tmp_path / "imgs", [(64, 64)] * 4, caption="mychar {i}")
    for i in range(4):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(d / f"img{i}.png")
    args = ["data=folder", f"data.image_dir={d}", "train.cache_latents_to_disk=true", f"data.cache_dir={tmp_path / 'c'}",
            "data.vae_batch_size=3", "train.max_steps=2", "train.batch_size=2"]
    first = train(tmp_path / "r1", args)
    assert first.run.backbone.vae_calls == 2  # 4 images in VAE batches of 3
    assert len(list((tmp_path / "c").rglob("*.safetensors"))) == 4
    second = train(tmp_path / "r2", args)
    assert second.run.backbone.vae_calls == 0
    for key, latent in first.run.latents.cache.latents.items():
        assert torch.equal(second.run.latents.cache.latents[key], latent)
    Image.new("RGB", (64, 64), (255, 255, 0)).save(d / "img2.png")
    third = train(tmp_path / "r3", args)
    assert third.run.backbone.vae_calls == 1
    assert third.run.latents.cache.build(torch.device("cpu")) == 0  # everything on disk now


def test_flip_aug_caches_both_flips_and_steps_do_no_vae_work(tmp_path, run_dir):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):  # left half red, right half blue: the mirror is a different image
        array = np.zeros((64, 64, 3), dtype=np.uint8)
        array[:, :32, 0] = 255
        array[:, 32:, 2] = 255 - 40 * i
        Image.fromarray(array).save(d / f"img{i}.png")
    result = train(run_dir, ["data=folder", f"data.image_dir={d}", "data.flip_aug=true", "train.max_steps=3"])
    cache = result.run.latents.cache
    assert set(cache.latents) == {(i, f) for i in range(3) for f in (False, True)}
    torch.testing.assert_close(cache.latents[(0, True)], cache.latents[(0, False)].flip(-1), atol=0.5, rtol=0)
    assert not torch.allclose(cache.latents[(0, True)], cache.latents[(0, False)], atol=1e-3)
    calls = result.run.backbone.vae_calls
    result.run.latents.of(next(iter(result.run.loader)))
    assert result.run.backbone.vae_calls == calls
    assert result.run.backbone.vae.device.type == "cpu"


def test_random_crop_turns_caching_off_with_a_notice(tmp_path, run_dir, caplog):
    d = make_images(tmp_path / "imgs", [(96, 64)] * 2)
    with caplog.at_level(logging.WARNING):
        result = train(run_dir, ["data=folder", f"data.image_dir={d}", "data.random_crop=true", "train.max_steps=2"])
    assert not result.run.latents.cached
    assert "latent caching is off: random_crop" in caplog.text


# ---- bad input ---------------------------------------------------------------------------------------------------

def _bad_input_folder(root: Path) -> Path:
    root.mkdir()
    Image.new("RGB", (64, 64), "red").save(root / "good.png")
    (root / "notes.png").write_text("this is not an image")
    data = (root / "good.png").read_bytes()
    Image.new("RGB", (256, 256), "blue").save(root / "big.jpg", quality=95)
    (root / "truncated.jpg").write_bytes((root / "big.jpg").read_bytes()[:400])
    (root / "big.jpg").unlink()
    (root / "empty.webp").write_bytes(b"")
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(root / "transparent.png")
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(root / "palette.png", transparency=0)
    Image.new("L", (64, 64), 128).save(root / "gray.png")
    Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)).save(root / "deep.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    rotated = Image.new("RGB", (96, 64), "white")
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(root / "rotated.jpg", exif=exif.tobytes())
    (root / "good.txt").write_bytes("caf\xe9 mychar".encode("latin-1"))
    assert data
    return root


def test_bad_files_are_skipped_and_odd_formats_converted(tmp_path, caplog):
    root = _bad_input_folder(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING):
        data = build(image_dir=str(root), resolution=64, enable_bucket=True, min_bucket_reso=64,
                     max_bucket_reso=128)
    names = {s.path.name for s in data.samples}
    assert names == {"good.png", "transparent.png", "palette.png", "gray.png", "deep.png", "cmyk.jpg",
                     "rotated.jpg"}
    for bad in ("notes.png", "truncated.jpg", "empty.webp"):
        assert f"skipping {root / bad}" in caplog.text
    assert "skipped 3 of 10 image files" in caplog.text
    assert f"{root / 'good.txt'} is not UTF-8" in caplog.text
    by_name = {s.path.name: i for i, s in enumerate(data.samples)}
    assert data.samples[by_name["good.png"]].caption == "caf\ufffd mychar"

    def pixels(name):
        return (data.pixels(by_name[name], False).permute(1, 2, 0).numpy() + 1) * 127.5

    assert np.allclose(pixels("transparent.png")[32, 32], 255, atol=1)  # transparent -> white
    assert np.allclose(pixels("palette.png")[32, 32], 255, atol=1)
    assert np.allclose(pixels("gray.png")[10, 10], 128, atol=1)
    assert pixels("deep.png").min() > 250  # 16-bit white stays white, not clipped garbage
    cmyk = pixels("cmyk.jpg")[32, 32]
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # CMYK red is red
    rotated = data.samples[by_name["rotated.jpg"]]
    assert rotated.size == (64, 96)  # EXIF orientation applied: the stored 96x64 image displays as portrait


def test_run_completes_with_bad_files_skipped(tmp_path, run_dir):
    root = _bad_input_folder(tmp_path / "imgs")
    result = train(run_dir, ["data=folder", f"data.image_dir={root}", "train.max_steps=2"])
    assert result.embedding.is_file() and len(result.run.dataset.samples) == 7


def test_no_usable_image_is_an_error(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_text("nope")
    with pytest.raises(ConfigError, match="no usable image"):
        build(image_dir=str(root))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=f"^data.image_dir={empty} holds no images") as err:
        build(image_dir=str(empty))
    assert str(err.value).count(str(empty)) == 1


def test_missing_dir_fails_before_any_model_loads(tmp_path):
    proc = cli(["data=folder", f"data.image_dir={tmp_path}/nothing", "model=sdxl", "logger=none",
                f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert "model_index" not in proc.stderr  # the (uncached) SDXL hub model was never looked up


def test_data_debug_prints_and_trains_nothing(tmp_path):
    proc = cli(["data.debug=true", "token.num_vectors=2", "template=caption", "logger=none",
                f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prompt:  'mychar mychar1, a yellow triangle on a navy background'" in proc.stdout
    assert "emb_params ids: " in proc.stdout and "* " in proc.stdout
    assert "bucket 64x64" in proc.stdout
    assert not list((tmp_path / "run").glob("*.safetensors"))
