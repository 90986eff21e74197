"""Masked training: masks from kohya's and OneTrainer's layouts, following their images into the loss."""

import logging
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import train
from tinv.data import build_training_set, collate
from tinv.data.masks import to_latent_size
from tinv.errors import ConfigError
from tinv.losses import DiffusionLoss, per_sample

RED, GREY = (230, 20, 20), (120, 120, 120)


def subject_images(folder: Path, sizes, masks: Path | None = None, alpha: bool = False, masklabel: bool = False,
                   caption: str = "mychar") -> Path:
    """Grey images with a red block (the subject) at a different place in each; its mask in the form asked for."""
    folder.mkdir(parents=True, exist_ok=True)
    if masks is not None:
        masks.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        img, mask = Image.new("RGB", (w, h), GREY), Image.new("L", (w, h), 0)
        box = (w // 5 + 3 * i, h // 4, w // 5 + 3 * i + w // 3, h // 4 + h // 3)  # off-centre: a flip moves it
        img.paste(RED, box)
        mask.paste(255, box)
        if alpha:
            img.putalpha(mask)
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
        if masks is not None:
            mask.save(masks / f"img{i}.png")
        if masklabel:
            mask.save(folder / f"img{i}-masklabel.png")
    return folder


def build(**kw):
    kw.setdefault("family", "sdxl")  # buckets in steps of 32
    kw.setdefault("batch_size", 1)
    kw.setdefault("resolution", 64)
    return build_training_set(**kw)


def red(pixels: torch.Tensor) -> torch.Tensor:
    """Where an item's pixels ([-1, 1], CHW) are the red block."""
    rgb = (pixels + 1) * 127.5
    return (rgb[0] > 175) & (rgb[1] < 80)


# ---- masks follow their images --------------------------------------------------------------------------------------

@pytest.mark.parametrize("buckets", [{}, {"enable_bucket": True}, {"enable_bucket": True, "bucket_no_upscale": True},
                                     {"random_crop": True}])
def test_a_mask_follows_its_image_through_resize_crop_flip_and_buckets(tmp_path, buckets):
    sizes = [(96, 64), (64, 112), (150, 90), (64, 64)]
    d = subject_images(tmp_path / "imgs", sizes, masks=tmp_path / "masks")
    data = build(image_dir=str(d), mask_dir=str(tmp_path / "masks"), flip_aug=True, **buckets)
    assert data.has_masks and len(data.samples) == 4
    flips = set()
    for epoch in range(4):
        for position in range(len(data)):
            item = data[(epoch, position)]
            flips.add(item["flip"])
            mask, pixels = item["mask"][0], item["pixel_values"]
            assert mask.shape == pixels.shape[1:]
            subject, background = mask > 0.9, mask < 0.1
            assert subject.any() and background.any()
            assert red(pixels)[subject].float().mean() > 0.99  # every subject pixel is the block
            assert red(pixels)[background].float().mean() < 0.01
            # at the latents' size: the cells that are all subject are the cells whose pixels are all red
            h, w = mask.shape[0] // 8, mask.shape[1] // 8
            cells = to_latent_size(mask[None, None], (h, w))[0, 0]
            red_cells = to_latent_size(red(pixels).float()[None, None], (h, w))[0, 0]
            torch.testing.assert_close(cells, red_cells, atol=0.1, rtol=0)  # edges: resampling differs
    assert flips == {False, True}


def test_the_three_mask_layouts_give_the_same_masks(tmp_path):
    sizes = [(64, 64), (96, 64)]
    layouts = {
        "folder": {"image_dir": str(subject_images(tmp_path / "a", sizes, masks=tmp_path / "a-masks")),
                   "mask_dir": str(tmp_path / "a-masks")},
        "alpha": {"image_dir": str(subject_images(tmp_path / "b", sizes, alpha=True)), "alpha_mask": True},
        "masklabel": {"image_dir": str(subject_images(tmp_path / "c", sizes, masklabel=True))},
    }
    items = {}
    for name, keys in layouts.items():
        data = build(**keys)
        assert len(data.samples) == 2, name  # -masklabel.png files are never training images
        items[name] = [data.fixed_item(i, random.Random(0)) for i in range(2)]
    for name in ("alpha", "masklabel"):
        for a, b in zip(items["folder"], items[name]):
            assert torch.equal(a["mask"], b["mask"]), name
            assert torch.equal(a["pixel_values"], b["pixel_values"]), name  # alpha_mask keeps the colours under it


def test_a_mask_folder_inside_the_image_folder_is_not_trained_on(tmp_path):
    d = subject_images(tmp_path / "imgs", [(64, 64)] * 3, masks=tmp_path / "imgs" / "masks")
    assert len(build(image_dir=str(d), mask_dir=str(d / "masks")).samples) == 3
    assert len(build(image_dir=str(d)).samples) == 6  # without the key the folder is just images


def test_kohya_toml_alpha_mask_and_conditioning_data_dir(tmp_path):
    a = subject_images(tmp_path / "a", [(64, 64)] * 2, alpha=True)
    b = subject_images(tmp_path / "b", [(64, 64)] * 2, masks=tmp_path / "b-cond")
    c = subject_images(tmp_path / "c", [(64, 64)] * 2)
    toml = tmp_path / "dataset.toml"
    toml.write_text(textwrap.dedent(f"""
        [[datasets]]
        resolution = 64
          [[datasets.subsets]]
          image_dir = "{a}"
          alpha_mask = true
          [[datasets.subsets]]
          image_dir = "{b}"
          conditioning_data_dir = "{tmp_path / 'b-cond'}"
          [[datasets.subsets]]
          image_dir = "{c}"
    """))
    data = build(dataset_config=str(toml))
    masked = [s.mask is not None for s in data.samples]
    assert masked == [True, True, True, True, False, False]  # the third subset has no masks: it trains unmasked
    assert [s.mask.alpha for s in data.samples[:4]] == [True, True, False, False]
    mask = data.fixed_item(4, random.Random(0))["mask"]
    assert torch.equal(mask, torch.ones_like(mask))  # an unmasked image in a masked set weighs every pixel
    toml.write_text(toml.read_text().replace('conditioning_data_dir = ', 'mask_dir = "x"\n  conditioning_data_dir = '))
    with pytest.raises(ConfigError, match="both conditioning_data_dir and mask_dir"):
        build(dataset_config=str(toml))


BAD_MASKS = {
    "missing": (lambda m: (m / "img1.png").unlink(), "has no mask in"),
    "unreadable": (lambda m: (m / "img1.png").write_bytes(b"not a png"), "cannot be read"),
    "size": (lambda m: Image.new("L", (32, 32), 255).save(m / "img1.png"), "is 32x32, its image 64x64"),
    "black": (lambda m: Image.new("L", (64, 64), 0).save(m / "img1.png"), "is all black"),
}


@pytest.mark.parametrize("case", sorted(BAD_MASKS))
@pytest.mark.parametrize("policy", ["unmasked", "skip"])
def test_each_bad_mask_gets_its_line_and_the_chosen_outcome(tmp_path, caplog, case, policy):
    d = subject_images(tmp_path / "imgs", [(64, 64)] * 3, masks=tmp_path / "masks")
    spoil, words = BAD_MASKS[case]
    spoil(tmp_path / "masks")
    with caplog.at_level(logging.WARNING):
        data = build(image_dir=str(d), mask_dir=str(tmp_path / "masks"), bad_mask=policy)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and str(d / "img1.png") in lines[0] and words in lines[0], lines
    if policy == "skip":
        assert "left out" in lines[0] and [s.path.name for s in data.samples] == ["img0.png", "img2.png"]
    else:
        assert "trains unmasked" in lines[0] and [s.mask is None for s in data.samples] == [False, True, False]


def test_alpha_mask_on_an_image_without_alpha_and_a_missing_mask_folder(tmp_path, caplog):
    d = subject_images(tmp_path / "imgs", [(64, 64)] * 2)
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigError, match="no usable image"):
        build(image_dir=str(d), alpha_mask=True, bad_mask="skip")  # both skipped: nothing is left to train on
    assert caplog.text.count("no alpha channel") == 2
    with pytest.raises(ConfigError, match=r"data.mask_dir='.*nowhere' does not exist"):
        build(image_dir=str(d), mask_dir=str(tmp_path / "nowhere"))


# ---- the masked loss ------------------------------------------------------------------------------------------------

class Fixed:
    """A scheduler stand-in: noising leaves the latents, so the prediction's error is what the test sets."""

    alphas_cumprod = torch.linspace(0.99, 0.01, 1000)

    @staticmethod
    def add_noise(latents, noise, timesteps):
        return latents


def _loss_parts(seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    masks = (torch.rand(3, 1, 8, 8, generator=gen) > 0.5).float()
    return latents, noise, torch.tensor([10, 500, 900]), masks


@pytest.mark.parametrize("weight,normalize,snr", [(0.1, True, 5.0), (0.0, False, None), (0.3, False, 5.0)])
def test_an_all_ones_mask_gives_exactly_the_plain_loss(weight, normalize, snr):
    latents, noise, t, _ = _loss_parts()
    prediction = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    loss = DiffusionLoss(min_snr_gamma=snr, mask_weight=weight, normalize_area=normalize)
    plain = loss(lambda x, t: prediction, Fixed, "epsilon", latents, noise, t)
    ones = loss(lambda x, t: prediction, Fixed, "epsilon", latents, noise, t, torch.ones(3, 1, 8, 8))
    assert torch.equal(plain, ones)


def test_with_background_weight_0_the_background_moves_no_gradient():
    latents, noise, t, masks = _loss_parts()
    prediction = torch.zeros(latents.shape, requires_grad=True)
    for normalize in (False, True):
        prediction.grad = None
        DiffusionLoss(mask_weight=0.0, normalize_area=normalize)(lambda x, t: prediction, Fixed, "epsilon", latents,
                                                                 noise, t, masks).backward()
        grad = prediction.grad.abs().sum(dim=1, keepdim=True)
        assert torch.all(grad[masks == 0] == 0) and torch.all(grad[masks == 1] > 0)
    gradients = {}
    for weight, given in ((1.0, None), (0.25, masks)):
        prediction.grad = None
        DiffusionLoss(mask_weight=weight)(lambda x, t: prediction, Fixed, "epsilon", latents, noise, t,
                                          given).backward()
        gradients[weight] = prediction.grad.clone()
    expected = gradients[1.0] * (0.25 + 0.75 * masks)  # each element's gradient scaled by its weight
    torch.testing.assert_close(gradients[0.25], expected)


def test_area_normalisation_makes_a_small_subject_weigh_as_a_large_one():
    error = torch.ones(2, 4, 8, 8)
    small, large = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    small[:, :, :2, :2], large[:, :, :6, :6] = 1, 1
    torch.testing.assert_close(per_sample(error, small, 0.0, True), per_sample(error, large, 0.0, True))
    assert per_sample(error, small, 0.0, False)[0] < per_sample(error, large, 0.0, False)[0]


def test_unmasked_prob_drops_masks_by_the_seed_and_only_draws_with_masks():
    loss = DiffusionLoss(unmasked_prob=0.5)
    masks = torch.zeros(8, 1, 4, 4)
    first = loss.mask_for_step(torch.Generator().manual_seed(3), masks)
    again = loss.mask_for_step(torch.Generator().manual_seed(3), masks)
    assert torch.equal(first, again)
    dropped = first.flatten(1).all(dim=1)
    assert 0 < dropped.sum() < 8 and torch.all(first[~dropped] == 0)
    gen = torch.Generator().manual_seed(3)
    assert loss.mask_for_step(gen, None) is None and torch.equal(gen.get_state(),
                                                                torch.Generator().manual_seed(3).get_state())
    # two processes slicing the global batch drop the same samples as one process
    halves = [loss.mask_for_step(torch.Generator().manual_seed(3), masks[:4], 2, rank) for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), first)


# ---- runs -----------------------------------------------------------------------------------------------------------

def _masked_args(tmp_path, extra=()):
    d = subject_images(tmp_path / "imgs", [(64, 64)] * 4, masks=tmp_path / "masks")
    return ["data=folder", f"data.image_dir={d}", f"data.mask_dir={tmp_path / 'masks'}", "train.batch_size=2",
            *extra]


def test_a_changed_mask_reencodes_only_its_cache_entry(tmp_path):
    args = _masked_args(tmp_path, ["train.cache_latents_to_disk=true", f"data.cache_dir={tmp_path / 'c'}",
                                   "train.max_steps=1"])
    first = train(tmp_path / "r1", args)
    assert first.run.backbone.vae_calls == 1 and len(first.run.latents.cache.masks) == 4
    assert all("mask" in load_file(str(p)) for p in (tmp_path / "c").rglob("*.safetensors"))
    assert train(tmp_path / "r2", args).run.backbone.vae_calls == 0
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 20, 20))
    mask.save(tmp_path / "masks" / "img2.png")
    third = train(tmp_path / "r3", args)
    assert third.run.backbone.vae_calls == 1
    index = next(i for i, s in enumerate(third.run.dataset.samples) if s.path.name == "img2.png")
    cached = third.run.latents.cache.masks[(index, False)]
    assert cached[0, :2, :2].min() > 0.99 and cached[0, 4:, 4:].max() == 0


@pytest.mark.parametrize("model", ["tiny_sd15", "tiny_sd2", "tiny_sdxl"])
@pytest.mark.parametrize("method", ["ti", "pivotal"])
def test_masked_runs_on_every_family_and_method(tmp_path, model, method):
    extra = [f"model={model}", "train.max_steps=2", "val.every_n_steps=2", "loss.unmasked_prob=0.5"]
    if method == "pivotal":
        extra += ["method=pivotal", "lora.background_prior=1.0"]
    result = train(tmp_path / "run", _masked_args(tmp_path, extra))
    assert result.step == 2 and result.run.dataset.has_masks
    assert np.isfinite([value for _, value in result.run.tracker.history["val/loss"]]).all()
    assert (tmp_path / "run" / "mychar.safetensors").is_file()


def test_masks_change_what_trains_and_validation_weighs_them(tmp_path):
    common = ["train.max_steps=2", "val.every_n_steps=2", "loss.mask_weight=0"]
    masked = train(tmp_path / "m", _masked_args(tmp_path, common))
    plain = train(tmp_path / "p", ["data=folder", f"data.image_dir={tmp_path / 'imgs'}", "train.batch_size=2",
                                   *common])
    a = load_file(str(tmp_path / "m" / "mychar.safetensors"))
    b = load_file(str(tmp_path / "p" / "mychar.safetensors"))
    assert not all(torch.equal(a[k], b[k]) for k in a)
    val = [r.run.tracker.history["val/loss"][-1][1] for r in (masked, plain)]
    assert val[0] != val[1]


def test_a_crashed_masked_pivotal_run_resumes_to_the_uninterrupted_one(tmp_path):
    common = _masked_args(tmp_path, ["train.max_steps=6", "save.state_every_n_steps=3", "method=pivotal",
                                     "token.num_vectors=2", "lora.background_prior=1.0", "loss.unmasked_prob=0.3",
                                     "data.flip_aug=true"])
    train(tmp_path / "whole", common)
    with pytest.raises(Exception, match="crash"):
        train(tmp_path / "part", [*common, "+callbacks.crash._target_=test_pivotal.CrashAt", "+callbacks.crash.step=3"])
    assert train(tmp_path / "resumed", [*common, f"resume={tmp_path / 'part'}"]).step == 6
    for name in ("mychar.safetensors", "mychar-lora.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "part" / name))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


def test_items_without_pixels_carry_no_mask_and_collate_keeps_none(tmp_path):
    d = subject_images(tmp_path / "imgs", [(64, 64)] * 2, masks=tmp_path / "masks")
    data = build(image_dir=str(d), mask_dir=str(tmp_path / "masks")).without_pixels()
    batch = collate([data[0], data[1]])
    assert batch["mask"] is None and batch["pixel_values"] is None


def test_the_background_prior_acts_only_where_the_mask_is_off(tmp_path):
    from tinv.parts import MicroBatch

    def run(name, *keys):
        result = train(tmp_path / name, _masked_args(tmp_path, ["train.max_steps=4", "method=pivotal",
                                                                "lora.start_frac=0", *keys]))
        return result, load_file(str(tmp_path / name / "mychar-lora.safetensors"))

    _, without = run("a", "lora.background_prior=0")
    _, by_default = run("c")  # with masks the prior is on without a key
    assert not all(torch.equal(without[k], v) for k, v in by_default.items())
    result, with_prior = run("b", "lora.background_prior=5.0", "lora.background_margin=0")
    assert not all(torch.equal(without[k], v) for k, v in with_prior.items())  # it changed what the LoRA learned
    part, bb = result.run.parts["lora"], result.run.backbone
    with torch.no_grad():
        for layer in part.layers["unet"].values():
            layer.lora_B["tinv"].weight.normal_(std=0.1)
    size, n = bb.unet.config.sample_size, 2
    noisy, t = torch.randn(n, bb.unet.config.in_channels, size, size), torch.tensor([100, 900])
    batch = {"prompts": ["a photo of mychar"] * n}
    prediction = bb.predict(noisy, t, result.run.input_ids(batch["prompts"]), batch)
    ones, zeros = torch.ones(n, 1, size, size), torch.zeros(n, 1, size, size)
    assert part.loss_term(MicroBatch(noisy, t, batch, prediction, ones)).item() == 0.0  # all subject: nothing
    part._adapters(False)
    with torch.no_grad():
        base = bb.predict(noisy, t, result.run.input_ids(batch["prompts"]), batch)
    part._adapters(True)
    term = part.loss_term(MicroBatch(noisy, t, batch, prediction, zeros))  # all background: the whole change
    torch.testing.assert_close(term, 5.0 * ((prediction - base) ** 2).mean())
    term.backward()
    assert all(layer.lora_B["tinv"].weight.grad is not None for layer in part.layers["unet"].values())
    # lora.background_with=context: the same change, on the token's prompts that ask for other backgrounds
    part.background_with = "context"
    asked = ["a mychar on a gray background", "a mychar on a brown background"]
    part.background_prompts, result.run.state.micro_step = asked, 0
    half = torch.cat([zeros[:1], ones[1:]])  # the first sample all background, the second all subject
    with torch.no_grad():
        with_lora = bb.predict(noisy, t, result.run.input_ids(asked), batch)
        part._adapters(False)
        without_lora = bb.predict(noisy, t, result.run.input_ids(asked), batch)
        part._adapters(True)
    expected = 5.0 * ((with_lora[:1] - without_lora[:1]) ** 2).sum() / with_lora.numel()
    torch.testing.assert_close(part.loss_term(MicroBatch(noisy, t, batch, prediction, half)), expected)


@pytest.mark.slow  # two subprocess runs and a resume (about a minute); the crash-and-resume test above is its sibling
def test_sigkill_then_resume_equals_an_uninterrupted_masked_run(tmp_path):
    from test_run_features import kill_then_resume

    kill_then_resume(_masked_args(tmp_path, ["train.max_steps=16", "save.state_every_n_steps=3", "logger=none",
                                             "loss.unmasked_prob=0.3", "data.flip_aug=true",
                                             "train.gradient_accumulation=2"]), tmp_path)


def test_data_debug_shows_each_samples_mask(tmp_path, capsys):
    d = subject_images(tmp_path / "imgs", [(64, 64)] * 2, masklabel=True)
    (d / "img1-masklabel.png").unlink()
    assert train(tmp_path / "run", ["data=folder", f"data.image_dir={d}", "data.debug=true"]) is None
    out = capsys.readouterr().out
    assert f"mask:    {d / 'img0-masklabel.png'}, subject 11% of the crop" in out  # a 21x21 block of 64x64
    assert "mask:    none (every pixel counts), subject 100% of the crop" in out


def test_the_background_margin_frees_a_band_around_the_subject():
    from tinv.trained.lora import LoraWeights

    mask = torch.zeros(1, 1, 10, 20)
    mask[0, 0, 4, 5] = 0.5  # a latent cell half the subject
    part = LoraWeights(background_prior=1.0, background_margin=0.2)  # 0.2 x 10 rows = 2 cells each way
    far = part._far_background(mask)[0, 0]
    assert (far[2:7, 3:8] == 0.5).all() and far.sum() == 200 - 25 * 0.5  # the band weighs as the subject's cell
    part.background_margin = 0.0
    torch.testing.assert_close(part._far_background(mask), 1.0 - mask)
