"""Tiny SD1 / SD2 / SDXL jobs through the real run: files, frozen weights, and diffusers compatibility."""

import math

import pytest
import torch
from safetensors import safe_open

from conftest import train

FAMILIES = {"tiny_sd15": ("sd1", ["emb_params"]), "tiny_sd2": ("sd2", ["emb_params"]),
            "tiny_sdxl": ("sdxl", ["clip_l", "clip_g"])}


def _fresh_modules(backbone):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = backbone.path
    fresh = {"unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
             "vae": AutoencoderKL.from_pretrained(path, subfolder="vae")}
    for enc in backbone.encoders:
        fresh[enc.key] = backbone._encoder_class(enc).from_pretrained(path, subfolder=enc.subfolder)
    return fresh


def _pipeline(backbone):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if backbone.family == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(backbone.path)


def _load_into(pipe, path, token):
    tensors = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    if "emb_params" in tensors:
        pipe.load_textual_inversion(str(path), token=token)
    else:  # SDXL: one call per encoder / tokenizer pair
        pipe.load_textual_inversion(tensors["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(tensors["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    return tensors


@pytest.mark.parametrize("model", list(FAMILIES))
def test_tiny_family_trains_and_loads_in_diffusers(model, run_dir):
    family, keys = FAMILIES[model]
    result = train(run_dir, [f"model={model}", "train.max_steps=3", "train.batch_size=3", "token.num_vectors=2",
                             "token.init_word=photo"])
    run, backbone = result.run, result.run.backbone
    assert backbone.family == family
    assert result.step == 3 and math.isfinite(result.final_loss)
    assert result.embedding == run_dir / "mychar.safetensors"

    # the file: keys, shapes, metadata
    with safe_open(str(result.embedding), "pt") as f:
        assert sorted(f.keys()) == sorted(keys)
        meta = f.metadata()
        for enc in backbone.encoders:
            assert f.get_tensor(enc.key).shape == (2, enc.width)
    assert meta["tinv.token"] == "mychar" and meta["tinv.family"] == family and meta["tinv.step"] == "3"

    # frozen weights bit-identical (vocabulary included), vectors moved away from the init word
    fresh = _fresh_modules(backbone)
    for name, module in [("unet", backbone.unet), ("vae", backbone.vae)]:
        for k, v in fresh[name].state_dict().items():
            assert torch.equal(module.state_dict()[k], v), f"{name}.{k} changed"
    for enc in backbone.encoders:
        ref = fresh[enc.key]
        splice = enc.model.get_input_embeddings()
        assert torch.equal(splice.base.weight, ref.get_input_embeddings().weight)
        assert not splice.base.weight.requires_grad
        ours = {k.replace("token_embedding.base.", "token_embedding."): v for k, v in enc.model.state_dict().items()
                if not k.endswith(".vectors")}
        assert ours.keys() == ref.state_dict().keys()
        assert all(torch.equal(ours[k], v) for k, v in ref.state_dict().items())
        photo = ref.get_input_embeddings().weight[enc.tokenizer.get_vocab()["photo</w>"]]
        trained = run.token.vectors()[enc.key]
        assert not torch.equal(trained[0], photo)
    assert [p for group in run.optimizer.param_groups for p in group["params"]] == run.token.parameters()

    # diffusers loads the file; rows equal the file and the pipeline conditions exactly as training did
    pipe = _pipeline(backbone)
    prompt = "a photo of mychar"
    before = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    tensors = _load_into(pipe, result.embedding, "mychar")
    after = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    encoders = [(pipe.tokenizer, pipe.text_encoder)]
    if family == "sdxl":
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
    for (tok, te), key in zip(encoders, keys):
        ids = tok.convert_tokens_to_ids(["mychar", "mychar_1"])
        assert torch.equal(te.get_input_embeddings().weight[ids], tensors[key])
    assert not torch.allclose(before[0], after[0])
    sizes = {"original_size": torch.tensor([[64.0, 64.0]]), "crop_top_left": torch.zeros(1, 2),
             "target_size": torch.tensor([[64.0, 64.0]])}
    with torch.no_grad():
        cond = backbone.conditioning(backbone.tokenize([run.token.expand(prompt)]), sizes)
        plain = backbone.conditioning(backbone.tokenize(["a photo of a"]), sizes)
    assert not torch.allclose(cond["encoder_hidden_states"], plain["encoder_hidden_states"])
    torch.testing.assert_close(cond["encoder_hidden_states"], after[0], rtol=1e-5, atol=1e-5)
    if family == "sdxl":
        # Real SDXL encoders (and the tiny ones) ship eos_token_id=2, so transformers pools at argmax(ids): the new
        # token, not EOS. Training pools at EOS like A1111/ComfyUI; diffusers needs the README's one-line fix.
        pooled = cond["added_cond_kwargs"]["text_embeds"]
        assert not torch.allclose(pooled, after[2], atol=1e-4)
        pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id
        fixed = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        torch.testing.assert_close(pooled, fixed[2], rtol=1e-5, atol=1e-5)


def test_pt_format_is_the_a1111_layout_and_loads_in_diffusers(run_dir):
    result = train(run_dir, ["train.max_steps=2", "save.format=pt", "token.num_vectors=3", "output_name=thing"])
    assert result.embedding == run_dir / "thing.pt"
    data = torch.load(result.embedding, weights_only=True)
    assert data["string_to_token"] == {"*": 265} and data["name"] == "thing" and data["step"] == 2  # the files' name
    assert data["string_to_param"]["*"].shape == (3, 32)
    pipe = _pipeline(result.run.backbone)
    pipe.load_textual_inversion(str(result.embedding), token="thing")
    ids = pipe.tokenizer.convert_tokens_to_ids(["thing", "thing_1", "thing_2"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], data["string_to_param"]["*"])


def test_intermediate_saves_and_accumulation(run_dir, monkeypatch):
    from tinv.trainer import Trainer

    micro_batches = []
    original = Trainer.micro_batch_loss
    monkeypatch.setattr(Trainer, "micro_batch_loss", lambda self, run, batch: micro_batches.append(
        len(batch["captions"])) or original(self, run, batch))
    result = train(run_dir, ["train.max_steps=4", "save.every_n_steps=2", "train.gradient_accumulation=2",
                             "train.batch_size=2", "scheduler=linear", "scheduler.num_warmup_steps=2"])
    assert result.step == 4
    names = sorted(p.name for p in run_dir.glob("*.safetensors"))
    assert names == ["mychar-step00000002.safetensors", "mychar-step00000004.safetensors", "mychar.safetensors"]
    # 4 optimizer steps from 8 micro-batches of 2
    assert micro_batches == [2] * 8
    state = next(iter(result.run.optimizer.state.values()))
    assert int(state["step"]) == 4
    # the logged lr is the one each step used: warm-up from 0
    import json

    lrs = [json.loads(line)["train/lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lrs[:3] == pytest.approx([0.0, 2.5e-3, 5e-3])


def test_bf16_autocast_keeps_vectors_fp32(run_dir):
    result = train(run_dir, ["train.max_steps=2", "train.mixed_precision=bf16", "train.cache_latents=false"])
    params = result.run.token.parameters()
    assert all(p.dtype == torch.float32 for p in params)
    assert result.run.backbone.unet.dtype == torch.bfloat16
    assert math.isfinite(result.final_loss)


def test_cached_and_live_latents_give_the_same_loss(tmp_path):
    a = train(tmp_path / "a", ["train.max_steps=3", "train.cache_latents=true"])
    b = train(tmp_path / "b", ["train.max_steps=3", "train.cache_latents=false"])
    assert a.final_loss == pytest.approx(b.final_loss, rel=1e-5)
    assert a.run.backbone.vae_calls == 2  # 8 demo images cached in VAE batches of 4, then none per step
    assert b.run.backbone.vae_calls == 3  # one per step


@pytest.mark.parametrize("model,target", [("tiny_sd15", "epsilon"), ("tiny_sd2", "v_prediction")])
def test_loss_target_follows_the_prediction_type(model, target, run_dir):
    from tinv.losses import DiffusionLoss

    result = train(run_dir, [f"model={model}", "train.max_steps=1"])
    run = result.run
    backbone = run.backbone
    assert backbone.prediction_type == target
    batch = next(iter(run.loader))
    latents = run.latents.of(batch)
    ids = backbone.tokenize([run.token.expand(p) for p in batch["prompts"]])
    sched = backbone.noise_scheduler
    noise, t = DiffusionLoss().draw(torch.Generator().manual_seed(5), tuple(latents.shape), 1000)
    with torch.no_grad():
        loss = DiffusionLoss()(backbone.predictor(ids, batch), sched, backbone.prediction_type, latents, noise, t)
        pred = backbone.predict(sched.add_noise(latents, noise, t), t, ids, batch)  # by hand, with the same draws
    alpha = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    expected = noise if target == "epsilon" else alpha * noise - sigma * latents
    other = alpha * noise - sigma * latents if target == "epsilon" else noise
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(pred, expected).item(), rel=1e-4)
    assert loss.item() != pytest.approx(torch.nn.functional.mse_loss(pred, other).item(), rel=1e-3)


@pytest.mark.parametrize("optimizer", ["lion", "prodigy", "sgd", "adafactor"])
def test_other_optimizers_train(optimizer, run_dir):
    pytest.importorskip({"lion": "lion_pytorch", "prodigy": "prodigyopt"}.get(optimizer, "torch"))
    result = train(run_dir, [f"optimizer={optimizer}", "train.max_steps=2", "token.init_word=photo"])
    assert math.isfinite(result.final_loss)
    assert result.embedding.is_file()


def test_caption_template_uses_captions_and_puts_the_token_first(run_dir, caplog):
    result = train(run_dir, ["template=caption", "train.max_steps=1"])
    prompts = result.run.dataset.prompts
    assert prompts("a red circle on a blue background") == "mychar, a red circle on a blue background"
    assert prompts("mychar on grass") == "mychar on grass"
    assert "8 of 8 captions do not contain the token 'mychar'" in caplog.text


def test_continue_from_weights_sets_num_vectors(tmp_path):
    first = train(tmp_path / "a", ["train.max_steps=2", "token.num_vectors=3"])
    second = train(tmp_path / "b", ["train.max_steps=1", f"token.weights={first.embedding}",
                                    "optimizer.lr=0.0"])
    assert second.run.token.num_vectors == 3
    with safe_open(str(first.embedding), "pt") as f:
        assert torch.equal(second.run.token.vectors()["emb_params"], f.get_tensor("emb_params"))


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain = train(tmp_path / "a", ["model=tiny_sdxl", "train.max_steps=2"])
    ckpt = train(tmp_path / "b", ["model=tiny_sdxl", "train.max_steps=2", "train.gradient_checkpointing=true"])
    assert ckpt.run.backbone.unet.is_gradient_checkpointing
    assert ckpt.final_loss == pytest.approx(plain.final_loss, rel=1e-5)
    for key, value in plain.run.token.vectors().items():
        torch.testing.assert_close(ckpt.run.token.vectors()[key], value, rtol=1e-5, atol=1e-6)
