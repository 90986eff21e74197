"""method=pivotal: the vectors and a LoRA trained together on every family; files that diffusers loads to the same
outputs, bundles that round-trip, phases, resume, several processes, and a base model that never changes."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import train
from test_train_tiny import FAMILIES, _fresh_modules, _pipeline
from tinv.errors import ConfigError
from tinv.rescue import RunFailed

PIVOTAL = ["method=pivotal", "token.num_vectors=2", "token.init_word=photo", "optimizer.lr=0.05", "lora.lr=0.02"]


def _encoders(pipe):
    return [(pipe.text_encoder, pipe.tokenizer)] + ([(pipe.text_encoder_2, pipe.tokenizer_2)]
                                                    if hasattr(pipe, "text_encoder_2") else [])


def _pipeline_with_files(backbone, embedding, lora):
    """A fresh diffusers pipeline of the base model, the LoRA file and the embedding loaded as users load them."""
    pipe = _pipeline(backbone)
    pipe.load_lora_weights(str(lora))
    vectors = load_file(str(embedding))
    for (te, tok), key in zip(_encoders(pipe), [enc.key for enc in backbone.encoders]):
        pipe.load_textual_inversion(vectors[key], token="mychar", text_encoder=te, tokenizer=tok)
    return pipe


@torch.no_grad()
def _assert_same_outputs(run, pipe, prompt="a photo of mychar on a table"):
    """The pipeline's text encoders and UNet give tinv's outputs on a fixed input (<= 1e-5)."""
    bb = run.backbone
    ours = bb.hidden_states(run.input_ids([prompt]))
    for (te, tok), state in zip(_encoders(pipe), ours):
        ids = tok(pipe.maybe_convert_prompt(prompt, tok), padding="max_length", max_length=tok.model_max_length,
                  return_tensors="pt").input_ids
        out = te(ids, output_hidden_states=True)
        theirs = out.last_hidden_state if bb.family != "sdxl" else out.hidden_states[-2]
        torch.testing.assert_close(theirs, state, rtol=0, atol=1e-5)
    size = bb.unet.config.sample_size
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, bb.unet.config.in_channels, size, size, generator=gen)
    res = torch.tensor([[size * 8, size * 8]])
    batch = {"original_size": res, "crop_top_left": torch.zeros(1, 2, dtype=torch.long), "target_size": res}
    cond = bb.conditioning(run.input_ids([prompt]), batch)
    t = torch.tensor([500])
    torch.testing.assert_close(pipe.unet(noisy, t, **cond).sample, bb.unet(noisy, t, **cond).sample, rtol=0, atol=1e-5)


def _assert_base_unchanged(backbone):
    """Every frozen weight equals the model on disk (peft keeps the originals under base_layer)."""
    fresh = _fresh_modules(backbone)
    live = {"unet": backbone.unet, **{enc.key: enc.model for enc in backbone.encoders}}
    for name, module in live.items():
        stored = fresh[name].state_dict()
        seen = 0
        for key, value in module.state_dict().items():
            if "lora_" in key or ".vectors" in key:
                continue
            key = key.replace(".base_layer.", ".").replace("token_embedding.base.", "token_embedding.")
            assert torch.equal(value, stored[key]), f"{name}: {key} changed"
            seen += 1
        assert seen == len(stored)


@pytest.mark.parametrize("model", list(FAMILIES))
def test_pivotal_files_load_in_diffusers_to_the_same_outputs_and_the_base_is_unchanged(model, run_dir):
    result = train(run_dir, [f"model={model}", "train.max_steps=3", "lora.text_encoder=true", "token.stop_frac=1.0",
                             *PIVOTAL])
    run = result.run
    assert result.step == 3 and math.isfinite(result.final_loss)
    s = result.summary
    files = {k: run_dir / f"mychar{suffix}.safetensors" for k, suffix in
             (("embedding", ""), ("lora", "-lora"), ("lora_bundle", "-bundle"))}
    assert {k: s[k] for k in files} == {k: str(v) for k, v in files.items()}
    lora = load_file(str(files["lora"]))
    owners = {k.split("_", 2)[1] if k.startswith("lora_te") else "unet" for k in lora}
    assert owners == ({"te1", "te2", "unet"} if model == "tiny_sdxl" else {"te", "unet"})
    assert all(k.startswith(("lora_unet_", "lora_te")) and k.endswith((".lora_down.weight", ".lora_up.weight",
                                                                       ".alpha")) for k in lora)
    assert max(v.abs().max() for k, v in lora.items() if "lora_up" in k) > 0  # the LoRA trained
    # the optimizer holds the vectors and the LoRA, and nothing else
    held = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in run.parameters()}
    assert {g["lr"] for g in run.optimizer.param_groups} == {0.05, 0.02}
    pipe = _pipeline_with_files(run.backbone, files["embedding"], files["lora"])
    _assert_same_outputs(run, pipe)
    bundle = load_file(str(files["lora_bundle"]))
    for key, value in load_file(str(files["embedding"])).items():
        assert torch.equal(bundle[f"bundle_emb.mychar.{key}"], value)
    assert {k: v for k, v in bundle.items() if not k.startswith("bundle_emb.")}.keys() == lora.keys()
    _assert_base_unchanged(run.backbone)


def test_diffusers_lora_format_loads_to_the_same_outputs(run_dir):
    result = train(run_dir, ["train.max_steps=2", "save.lora_format=diffusers", "lora.alpha=2", *PIVOTAL])
    lora = load_file(str(run_dir / "mychar-lora.safetensors"))
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in lora)
    pipe = _pipeline_with_files(result.run.backbone, result.embedding, run_dir / "mychar-lora.safetensors")
    _assert_same_outputs(result.run, pipe)  # alpha/rank = 0.5, folded into the up weights


def test_bundles_split_and_join_through_tinv_convert(run_dir, tmp_path):
    from tinv.commands.convert import main as convert
    from tinv.formats.embedding import read_embedding

    train(run_dir, ["model=tiny_sdxl", "train.max_steps=2", *PIVOTAL])
    bundle = run_dir / "mychar-bundle.safetensors"
    assert read_embedding(bundle).name == "mychar"  # a bundle reads as its embedding wherever one is taken
    assert convert(["split", str(bundle), str(tmp_path / "e.safetensors"), str(tmp_path / "l.safetensors")]) == 0
    for ours, theirs in (("mychar.safetensors", "e.safetensors"), ("mychar-lora.safetensors", "l.safetensors")):
        a, b = load_file(str(run_dir / ours)), load_file(str(tmp_path / theirs))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert convert(["join", str(tmp_path / "e.safetensors"), str(tmp_path / "l.safetensors"),
                    str(tmp_path / "b.safetensors")]) == 0
    a, b = load_file(str(bundle)), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # an A1111 .pt embedding out of a split, and a diffusers-layout LoRA into a join
    assert convert(["split", str(bundle), str(tmp_path / "e.pt"), str(tmp_path / "l2.safetensors")]) == 0
    assert torch.equal(read_embedding(tmp_path / "e.pt").vectors["clip_g"], a["bundle_emb.mychar.clip_g"])
    assert convert(["join", str(bundle), str(bundle), str(tmp_path / "x.safetensors")]) == 2  # already a bundle


def test_diffusers_layout_joins_into_the_kohya_bundle(run_dir, tmp_path):
    from tinv.formats.convert import join_bundle

    train(run_dir, ["train.max_steps=2", "save.lora_format=diffusers", "lora.alpha=2", *PIVOTAL])
    joined = load_file(str(join_bundle(run_dir / "mychar.safetensors", run_dir / "mychar-lora.safetensors",
                                       tmp_path / "b.safetensors")))
    ours = load_file(str(run_dir / "mychar-bundle.safetensors"))
    assert joined.keys() == ours.keys()
    for key, value in ours.items():  # the same LoRA: there alpha 2 of rank 4, here alpha/rank folded into the up
        if key.endswith(".lora_up.weight"):
            alpha = key.replace(".lora_up.weight", ".alpha")
            assert ours[alpha] == 2 and joined[alpha] == 4
            torch.testing.assert_close(joined[key], value * 0.5, rtol=1e-6, atol=1e-7)
        elif not key.endswith(".alpha"):
            assert torch.equal(joined[key], value)


def test_phases_switch_each_part_on_and_off(run_dir):
    result = train(run_dir, ["train.max_steps=8", "token.stop_frac=0.5", "lora.start_frac=0.25", *PIVOTAL,
                             "save.every_n_steps=1"])
    emb = [load_file(str(run_dir / f"mychar-step{s:08d}.safetensors"))["emb_params"] for s in range(1, 9)]
    lora = [load_file(str(run_dir / f"mychar-step{s:08d}-lora.safetensors")) for s in range(1, 9)]
    ups = [torch.cat([v.flatten() for k, v in sorted(x.items()) if "lora_up" in k]) for x in lora]
    assert all(not torch.equal(emb[i], emb[i + 1]) for i in range(3))  # steps 2-4 move the vectors
    assert all(torch.equal(emb[3], e) for e in emb[4:])  # and from step 5 on they stay
    assert not ups[0].any() and not ups[1].any()  # the LoRA starts at step 3 (zero up weights until then)
    assert all(not torch.equal(ups[i], ups[i + 1]) for i in range(1, 7))
    assert "lora/delta_norm" in result.run.tracker.history


@pytest.mark.parametrize("overrides, message", [
    (["lora.start_frac=0.8"], "nothing would train"),
    (["token.stop_frac=0.3", "lora.stop_frac=0.6"], "nothing would train for the last steps"),
    (["lora.unet_targets=[nope]"], "lora.unet_targets"),
    (["lora.dropout=1.5"], "lora.dropout"),
    (["lora.unet_levels=[7]"], r"lora.unet_levels=\[7\]: .* at levels \[0, 1, 2, 3\]"),
    (["lora.unet_levels=[-1]"], "must name levels >= 0"),
    (["lora.unet_levels=[1]", "lora.unet_targets=[nope]"], "lora.unet_targets"),
    (["lora.rank=0"], "lora.rank=0 must be at least 1"),
    (["lora.preserve_with=context", "lora.preserve_weight=1", "lora.unet_targets=[attn1.to_q]"],
     r"has none: add attn2.to_k and attn2.to_v"),
    (["model=tiny_sdxl", "token.train_encoders=clip_l", "train.cache_text_encoder_outputs=true",
      "lora.text_encoder=true"], "turn one of them off"),
])
def test_bad_lora_settings_are_one_line_errors(overrides, message, run_dir):
    with pytest.raises(ConfigError, match=message):
        train(run_dir, ["train.max_steps=2", *PIVOTAL, *overrides])


@pytest.mark.parametrize("model, levels, blocks", [
    ("tiny_sd15", [3], ["mid_block"]),  # four levels; the middle block works at the deepest
    ("tiny_sd15", [0], ["down_blocks_0", "up_blocks_3"]),  # the up blocks mirror the down blocks
    ("tiny_sdxl", [1], ["down_blocks_1", "up_blocks_1"]),  # three levels, no attention at the first
])
def test_unet_levels_pick_the_blocks_at_those_resolutions(model, levels, blocks, run_dir):
    """lora.unet_levels: the LoRA file names modules of exactly the blocks that work at those latent sizes."""
    train(run_dir, ["train.max_steps=2", *PIVOTAL, f"model={model}", f"lora.unet_levels={levels}"])
    keys = [k for k in load_file(str(run_dir / "mychar-lora.safetensors")) if k.startswith("lora_unet_")]
    found = {next((b for b in blocks if k.startswith(f"lora_unet_{b}_")), None) for k in keys}
    assert found == set(blocks)  # every expected block has a LoRA, and nothing else has one


def test_resume_needs_the_same_method(tmp_path):
    train(tmp_path / "a", ["train.max_steps=2", "save.state_every_n_steps=1", *PIVOTAL])
    with pytest.raises(ConfigError, match="trains lora, vectors, this run vectors"):
        train(tmp_path / "b", ["train.max_steps=3", f"resume={tmp_path / 'a'}", "token.num_vectors=2"])
    with pytest.raises(ConfigError, match="saved LoRA"):
        train(tmp_path / "c", ["train.max_steps=3", f"resume={tmp_path / 'a'}", *PIVOTAL, "lora.rank=2"])


def test_dropout_acts_only_while_gradients_are_computed():
    from tinv.trained.lora import GradOnlyDropout

    drop, x = GradOnlyDropout(0.5), torch.ones(1000)
    with torch.no_grad():
        assert torch.equal(drop(x), x)
    assert (drop(x) == 0).any()


def _cli(args, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "tinv", "model=tiny_sd15", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, **kw)


class CrashAt:
    """A callback that fails the run after a given step (as a crash would), once the state of that step is saved."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, run, out) -> None:
        if out.step == self.step:
            raise RuntimeError("crash")


def test_resume_with_a_lora_equals_an_uninterrupted_run(tmp_path):
    common = ["train.max_steps=6", "train.batch_size=2", "save.state_every_n_steps=3", *PIVOTAL]
    train(tmp_path / "whole", common)
    with pytest.raises(RunFailed, match="crash"):  # after step 3: the vectors' phase and the LoRA's both go on
        train(tmp_path / "part", [*common, "+callbacks.crash._target_=test_pivotal.CrashAt", "+callbacks.crash.step=3"])
    kept = load_file(str(tmp_path / "part" / "mychar-lora.safetensors"))  # the crash keeps the LoRA of step 2 too
    assert any("lora_up" in k for k in kept) and (tmp_path / "part" / "mychar-bundle.safetensors").exists()
    assert train(tmp_path / "resumed", [*common, f"resume={tmp_path / 'part'}"]).step == 6
    for name in ("mychar.safetensors", "mychar-lora.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "part" / name))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


@pytest.mark.slow  # two runs, one on two processes (about 20 s); by default test_run_features does it without a LoRA
def test_two_cpu_processes_match_one_with_a_lora(tmp_path):
    # SGD: Adam's first steps divide tiny gradients by their own size, which blows float rounding up to the lr
    common = ["train.max_steps=4", "logger=none", "data.flip_aug=true", *PIVOTAL, "optimizer=sgd", "optimizer.lr=1",
              "lora.lr=1"]
    single = _cli([*common, "train.batch_size=4", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(29700 + os.getpid() % 1000), "-m", "tinv", "model=tiny_sd15",
                             *common, "train.batch_size=2", f"hydra.run.dir={tmp_path / 'two'}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "on cpu: 2 processes" in (tmp_path / "two" / "train.log").read_text()
    for name in ("mychar.safetensors", "mychar-lora.safetensors"):
        one, two = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in one.items() if "lora_up" in k) or \
            name == "mychar.safetensors"
        for key in one:  # two halves summed in another order: float rounding only
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["lora"].endswith("mychar-lora.safetensors")


def test_preservation_measures_the_loras_change_against_the_frozen_model(run_dir):
    from tinv.parts import MicroBatch

    result = train(run_dir, ["train.max_steps=2", *PIVOTAL, "lora.start_frac=0", "token.stop_frac=1",
                             "lora.preserve_weight=1", "lora.preserve_prompts=['a {} on the moon']"])
    part, unet = result.run.parts["lora"], result.run.backbone.unet
    assert part.preserved == ["a photo on the moon"]
    size = unet.config.sample_size
    micro = MicroBatch(torch.randn(2, unet.config.in_channels, size, size), torch.tensor([100, 900]), {})
    ups = [layer.lora_B["tinv"].weight for layer in part.layers["unet"].values()]
    with torch.no_grad():
        for w in ups:
            w.zero_()
    assert part.loss_term(micro).item() == 0.0  # a LoRA that changes nothing
    with torch.no_grad():
        for w in ups:
            w.normal_(std=0.1)
    term = part.loss_term(micro)
    assert term.item() > 0 and term.requires_grad
    term.backward()
    assert all(w.grad is not None and w.requires_grad for w in ups)


def test_edit_preservation_keeps_what_the_other_words_change_not_the_output(run_dir):
    from tinv.parts import MicroBatch

    result = train(run_dir, ["train.max_steps=2", *PIVOTAL, "lora.start_frac=0", "token.stop_frac=1",
                             "lora.preserve_weight=2", "lora.preserve_with=edit",
                             "lora.preserve_prompts=['a {} on the moon']"])
    part, bb, run = result.run.parts["lora"], result.run.backbone, result.run
    assert (part.preserved, part.reference) == (["a mychar on the moon"], "a mychar")
    size = bb.unet.config.sample_size
    micro = MicroBatch(torch.randn(2, bb.unet.config.in_channels, size, size), torch.tensor([100, 900]), {})
    with torch.no_grad():
        for layer in part.layers["unet"].values():
            layer.lora_B["tinv"].weight.normal_(std=0.1)

    def outputs(prompt):
        ids = run.input_ids([prompt] * 2)
        with torch.no_grad():
            part._adapters(False)
            without = bb.predict(micro.noisy, micro.timesteps, ids, micro.batch)
            part._adapters(True)
            return bb.predict(micro.noisy, micro.timesteps, ids, micro.batch), without

    (moon, moon_0), (alone, alone_0) = outputs("a mychar on the moon"), outputs("a mychar")
    expected = 2 * torch.nn.functional.mse_loss(moon - alone, moon_0 - alone_0)
    assert expected > 0 and 2 * torch.nn.functional.mse_loss(moon, moon_0) > expected  # less than "token" asks
    torch.testing.assert_close(part.loss_term(micro).detach(), expected, rtol=1e-5, atol=1e-8)


def test_context_preservation_keeps_the_other_positions_keys_and_values(tmp_path):
    """lora.preserve_with=context: the LoRA's change to the cross-attention keys and values of every position but
    the token's shrinks against the same run without it, while the token's own keys and values still change."""
    prompts = "lora.preserve_prompts=['a {} on the moon','a photo of {} in a box']"
    common = ["train.max_steps=30", *PIVOTAL, "lora.start_frac=0", "token.stop_frac=1", prompts,
              "lora.unet_targets=[attn2.to_k,attn2.to_v]", "lora.preserve_with=context"]

    def changes(weight):
        result = train(tmp_path / str(weight), [*common, f"lora.preserve_weight={weight}"])
        part, run = result.run.parts["lora"], result.run
        ids = run.input_ids(["a mychar on the moon", "a photo of mychar in a box"])
        token = ids[0] >= run.token.first_ids[run.backbone.encoders[0].key]
        with torch.no_grad():
            states = run.backbone.cross_attention_states(ids)
            rel = []
            for layer in part.layers["unet"].values():
                change = layer.lora_B["tinv"](layer.lora_A["tinv"](states)) * layer.scaling["tinv"]
                size = layer.base_layer(states).pow(2).mean()
                rel.append([float(change[mask].pow(2).mean() / size) for mask in (~token, token)])
        return torch.tensor(rel).mean(dim=0)

    free, kept = changes(0), changes(300)
    assert free[0] > 0 and kept[0] < 0.2 * free[0]  # the other positions: kept
    assert kept[1] > 5 * kept[0]  # the token's own keys and values: still changed


def test_pivotal_with_bf16_checkpointing_validation_and_previews(run_dir):
    result = train(run_dir, ["train.max_steps=4", *PIVOTAL, "train.mixed_precision=bf16",
                             "train.gradient_checkpointing=true", "val.every_n_steps=2", "sample.every_n_steps=4",
                             "sample.steps=2", "lora.text_encoder=true"])
    assert result.step == 4 and math.isfinite(result.final_loss)
    lora = load_file(str(run_dir / "mychar-lora.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
    assert max(v.abs().max() for k, v in lora.items() if "lora_up" in k) > 0
    assert all(p.dtype == torch.float32 for p in result.run.parts["lora"].parameters())
    val = [v for _, v in result.run.tracker.history["val/loss"]]
    assert len(val) == 2 and all(math.isfinite(v) for v in val)
    assert (run_dir / "samples" / "step-00000004" / "grid.png").is_file()
