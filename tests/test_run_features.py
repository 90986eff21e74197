"""What users expect of a run: previews, validation, resume after a crash, the numerical guard, loss options,
and several processes."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import train, with_test_model
from tinv.errors import ConfigError, TrainingDiverged
from tinv.sampling import PreviewPrompt, read_prompts


def _vectors(path):
    return load_file(str(path))


# ---- previews ----------------------------------------------------------------------------------------------------

def test_previews_at_the_right_steps_and_training_unchanged(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# previews\na photo of mychar --d 1 --s 2\nmychar on a beach --n blurry --w 64 --h 128 --ss ddim\n")
    common = ["train.max_steps=6", "token.init_word=photo"]
    plain = train(tmp_path / "plain", common)
    sampled = train(tmp_path / "sampled", common + ["sample.every_n_steps=2", "sample.at_start=true",
                                                    f"sample.prompts={prompts}", "sample.steps=2"])
    steps = sorted(p.name for p in (tmp_path / "sampled" / "samples").iterdir())
    assert steps == ["step-00000000", "step-00000002", "step-00000004", "step-00000006"]
    for step in steps:
        files = sorted(p.name for p in (tmp_path / "sampled" / "samples" / step).iterdir())
        assert len(files) == 3 and "grid.png" in files
    from PIL import Image

    tall = next((tmp_path / "sampled" / "samples" / "step-00000002").glob("01-*.png"))
    assert Image.open(tall).size == (64, 128)
    assert torch.equal(_vectors(plain.embedding)["emb_params"], _vectors(sampled.embedding)["emb_params"])


@pytest.mark.parametrize("sampler", ["euler", "dpmsolver++"])
def test_previews_on_sdxl_with_other_samplers(tmp_path, sampler):
    train(tmp_path, ["model=tiny_sdxl", "train.max_steps=1", "sample.every_n_steps=1", "sample.steps=2",
                     f"sample.sampler={sampler}", "sample.prompts=[a photo of mychar]"])
    assert len(list((tmp_path / "samples" / "step-00000001").glob("00-*.png"))) == 1


def test_prompt_file_parsing_and_errors(tmp_path):
    defaults = PreviewPrompt("x")
    specs = read_prompts(["a mychar --n ugly hands --w 768 --h 512 --s 30 --l 5.5 --d 7 --ss euler", "# comment", ""],
                         defaults)
    assert len(specs) == 1
    s = specs[0]
    assert (s.prompt, s.negative_prompt, s.width, s.height, s.steps, s.guidance_scale, s.seed, s.sampler) == \
        ("a mychar", "ugly hands", 768, 512, 30, 5.5, 7, "euler")
    with pytest.raises(ConfigError, match=r"sample.prompts\[0\]: unknown flag --q"):
        read_prompts(["a --q 3"], defaults)
    with pytest.raises(ConfigError, match="--w 'wide' is not a int"):
        read_prompts(["a --w wide"], defaults)
    with pytest.raises(ConfigError, match="no such prompts file"):
        read_prompts(str(tmp_path / "none.txt"), defaults)


# ---- validation --------------------------------------------------------------------------------------------------

def test_validation_is_deterministic_and_best_tracks_the_minimum(tmp_path):
    result = train(tmp_path / "a", ["train.max_steps=6", "val.every_n_steps=1", "val.split=0.25",
                                    "optimizer.lr=0.05"])
    run, validation = result.run, result.run.callbacks["validation"]
    assert validation.loss(run) == validation.loss(run)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    vals = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
    assert len(vals) >= 6
    best_step, best = min(vals[:6], key=lambda x: x[1])
    assert result.summary["best_step"] == best_step and result.summary["best_val_loss"] == pytest.approx(best)
    assert (result.summary["objective"], result.summary["objective_name"]) == (pytest.approx(best), "best val/loss")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["best_step"] == best_step
    # the best file holds the vectors of the best step: validating it again gives the best loss
    run.token.load_vectors({k: v for k, v in _vectors(tmp_path / "a" / "mychar-best.safetensors").items()})
    assert validation.loss(run) == pytest.approx(best, rel=1e-6)
    # held-out images never train
    held = set(validation.samples)
    assert held and not held & set(run.dataset.order)
    # a second run with the same embedding scores the same
    again = train(tmp_path / "b", ["train.max_steps=1", "val.every_n_steps=1", "val.split=0.25",
                                   f"token.weights={tmp_path / 'a' / 'mychar-best.safetensors'}", "optimizer.lr=0"])
    assert again.run.callbacks["validation"].loss(again.run) == pytest.approx(best, rel=1e-6)


# ---- resume ------------------------------------------------------------------------------------------------------

def _cli(args, cwd, **kw):
    return subprocess.Popen([sys.executable, "-m", "tinv", *with_test_model(args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_step(run_dir, step, proc, timeout=240):
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.is_file():
            lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if lines and lines[-1]["step"] >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("run did not reach the step in time")


RESUME_ARGS = ["train.max_steps=16", "save.state_every_n_steps=3", "logger=none", "token.num_vectors=2",
               "train.batch_size=3", "data.flip_aug=true", "template=object", "train.gradient_accumulation=2",
               "scheduler=cosine", "scheduler.num_warmup_steps=4"]


def kill_then_resume(args, tmp_path, max_steps=16):
    """Runs `args` whole and, beside it, once more SIGKILLed after step 6 and resumed: the resumed run's vectors
    equal the whole run's."""
    whole = _cli(args + [f"hydra.run.dir={tmp_path / 'whole'}"], tmp_path)
    killed = _cli(args + [f"hydra.run.dir={tmp_path / 'killed'}"], tmp_path)
    _wait_for_step(tmp_path / "killed", 6, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert whole.wait() == 0, whole.stderr.read()[-2000:]
    assert not (tmp_path / "killed" / "mychar.safetensors").exists()
    state = json.loads((tmp_path / "killed" / "state" / "state.json").read_text())
    assert 3 <= state["step"] < max_steps
    resumed = _cli(args + [f"hydra.run.dir={tmp_path / 'resumed'}", f"resume={tmp_path / 'killed'}"], tmp_path)
    assert resumed.wait() == 0, resumed.stderr.read()[-2000:]
    a = _vectors(tmp_path / "whole" / "mychar.safetensors")["emb_params"]
    b = _vectors(tmp_path / "killed" / "mychar.safetensors")["emb_params"]  # the resumed run finishes in place
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.slow  # about 90 s of subprocesses; the SIGINT test below covers resume in the default suite
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    kill_then_resume(RESUME_ARGS, tmp_path)
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))


def test_sigint_saves_embedding_and_state_then_resumes(tmp_path):
    run = tmp_path / "outputs" / "day" / "run"  # resume=latest looks under ./outputs
    proc = _cli(RESUME_ARGS + [f"hydra.run.dir={run}"], tmp_path)
    _wait_for_step(run, 5, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    err = proc.stderr.read()
    assert f"resume={run}" in err and "Traceback" not in err
    stopped = json.loads((run / "state" / "state.json").read_text())["step"]
    meta_step = int(__import__("safetensors").safe_open(str(run / "mychar.safetensors"), "pt").metadata()["tinv.step"])
    assert meta_step == stopped and stopped < 16
    summary = json.loads((run / "summary.json").read_text())  # why and where it stopped, and how to go on
    assert (summary["ok"], summary["stopped_by"], summary["step"]) == (False, "SIGINT", stopped)
    assert summary["resume"] == f"resume={run}" and summary["embedding"] == str(run / "mychar.safetensors")
    # resumed by name only: the run's own settings carry over, and it goes on in its own folder and log
    again = _cli(["logger=none", "resume=latest"], tmp_path)
    assert again.wait() == 0, again.stderr.read()[-2000:]
    assert json.loads((run / "summary.json").read_text())["step"] == 16
    assert sorted(p.name for p in (tmp_path / "outputs" / "day").iterdir()) == ["run"]  # no second folder
    assert f"resumed {run} at step {stopped}" in (run / "train.log").read_text()


@pytest.mark.slow  # four runs as subprocesses (about 35 s); the SIGINT test above covers resume by default
def test_a_finished_run_resumes_as_finished_and_extends_without_redoing_work(tmp_path):
    args = ["train.max_steps=4", "logger=none", "token.num_vectors=2", "save.every_n_steps=2"]
    first = _cli(args + [f"hydra.run.dir={tmp_path / 'a'}"], tmp_path)
    assert first.wait() == 0, first.stderr.read()[-2000:]
    embedding = tmp_path / "a" / "mychar.safetensors"
    before = (embedding.read_bytes(), embedding.stat().st_mtime_ns, (tmp_path / "a" / "summary.json").read_text())
    same = _cli([f"resume={tmp_path / 'a'}"], tmp_path)
    assert same.wait() == 0 and "is complete at step 4" in same.stdout.read()
    assert (embedding.read_bytes(), embedding.stat().st_mtime_ns,
            (tmp_path / "a" / "summary.json").read_text()) == before  # nothing trained, nothing rewritten
    first_wall = json.loads(before[2])["wall_s"]
    longer = _cli([f"resume={tmp_path / 'a'}", "train.max_steps=6"], tmp_path)
    assert longer.wait() == 0, longer.stderr.read()[-2000:]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["wall_s"] > first_wall and summary["resumed_at_step"] == 4  # the whole run's time, not the last part
    assert "6 steps (2 of them after resuming)" in longer.stdout.read()
    steps = [json.loads(x)["step"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 1-4 were not run again
    assert (tmp_path / "a" / "mychar-step00000006.safetensors").is_file()  # save.every_n_steps carried over
    whole = _cli(args[1:] + ["train.max_steps=6", f"hydra.run.dir={tmp_path / 'b'}"], tmp_path)
    assert whole.wait() == 0, whole.stderr.read()[-2000:]
    torch.testing.assert_close(_vectors(embedding)["emb_params"],
                               _vectors(tmp_path / "b" / "mychar.safetensors")["emb_params"], rtol=0, atol=1e-6)


@pytest.mark.slow  # four runs as subprocesses (about 35 s); the default suite resumes AdamW's state
@pytest.mark.parametrize("optimizer", ["lion", "prodigy"])
def test_a_state_resumes_with_every_optimizer(tmp_path, optimizer):
    """Their list-valued settings (betas) reach the optimizer as plain lists: a state that holds an OmegaConf
    ListConfig would not load under torch.load(weights_only=True)."""
    pytest.importorskip({"lion": "lion_pytorch", "prodigy": "prodigyopt"}[optimizer])
    args = [f"optimizer={optimizer}", "logger=none", f"hydra.run.dir={tmp_path / 'a'}"]
    assert _cli(args + ["train.max_steps=2"], tmp_path).wait() == 0
    longer = _cli(args + [f"resume={tmp_path / 'a'}", "train.max_steps=3"], tmp_path)
    assert longer.wait() == 0, longer.stderr.read()[-2000:]
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["resumed_at_step"] == 2


def test_resume_errors(tmp_path):
    with pytest.raises(ConfigError, match="no saved state there"):
        train(tmp_path / "r", [f"resume={tmp_path}"])


# ---- the numerical guard -------------------------------------------------------------------------------------------

def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    from tinv.trainer import Trainer

    original = Trainer.micro_batch_loss
    bad = {3, 5, 6}
    calls = []

    def poisoned(self, run, batch):
        calls.append(1)
        loss = original(self, run, batch)
        return loss * float("nan") if len(calls) in bad else loss

    monkeypatch.setattr(Trainer, "micro_batch_loss", poisoned)
    result = train(tmp_path / "a", ["train.max_steps=8"])
    assert result.summary["bad_steps"] == 3 and math.isfinite(result.final_loss)
    assert torch.isfinite(_vectors(result.embedding)["emb_params"]).all()
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("train/bad_steps", 0) for r in records) == 3

    calls.clear()
    bad.update(range(4, 100))
    with pytest.raises(TrainingDiverged, match="3 steps in a row were skipped"):
        train(tmp_path / "b", ["train.max_steps=20", "train.max_bad_steps=3", "save.every_n_steps=1"])
    last_good = _vectors(tmp_path / "b" / "mychar-step00000002.safetensors")["emb_params"]  # steps 3-5 were bad
    assert torch.isfinite(last_good).all()
    assert not list((tmp_path / "b").glob("mychar-step0000000[3-9].safetensors"))


def test_an_update_that_makes_the_vectors_non_finite_is_undone_and_named(tmp_path, monkeypatch):
    """The gradient is finite but the step it takes is not (a learning rate far too high): the vectors and the
    optimizer's moments go back to before the step, and a run that cannot go on names the learning rate."""
    steps, bad, before = [], {3}, {}
    original = torch.optim.AdamW.step

    def overflowing(self, *args, **kwargs):
        before[len(steps) + 1] = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        out = original(self, *args, **kwargs)
        steps.append(1)
        if len(steps) in bad:
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.mul_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    result = train(tmp_path / "a", ["train.max_steps=5", "save.every_n_steps=1"])
    assert result.summary["bad_steps"] == 1
    files = {k: _vectors(tmp_path / "a" / f"mychar-step{k:08d}.safetensors")["emb_params"] for k in (2, 4)}
    assert not (tmp_path / "a" / "mychar-step00000003.safetensors").exists()  # a skipped step writes nothing
    assert torch.equal(before[4][0].cpu(), before[3][0].cpu())  # step 4 starts from where step 3 did: undone
    assert torch.equal(before[3][0].cpu().to(files[2].dtype), files[2]) and torch.isfinite(files[4]).all()

    steps.clear()
    bad.update(range(3, 100))
    with pytest.raises(TrainingDiverged, match="update made the trained values NaN or inf .*lower optimizer.lr"
                       ".*kept the values of step 2.*Start a new run") as failed:
        train(tmp_path / "b", ["train.max_steps=20", "train.max_bad_steps=3"])
    assert "resume=" not in str(failed.value)  # the settings diverged: a resume meets them again
    assert torch.equal(_vectors(tmp_path / "b" / "mychar.safetensors")["emb_params"], files[2])  # same seed


def test_a_run_that_ends_on_skipped_steps_fails_naming_the_cause(tmp_path, monkeypatch):
    """Too few steps to reach train.max_bad_steps, every one of them skipped: not `done` with untrained vectors."""
    from tinv.losses import DiffusionLoss

    original = DiffusionLoss.with_prediction

    def nan_loss(self, *args, **kwargs):
        loss, pred = original(self, *args, **kwargs)
        return loss * float("nan"), pred

    monkeypatch.setattr(DiffusionLoss, "with_prediction", nan_loss)
    with pytest.raises(TrainingDiverged, match="all 4 steps were skipped: the loss itself was NaN or inf"):
        train(tmp_path / "a", ["train.max_steps=4"])
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert "all 4 steps were skipped" in summary["error"]


# ---- loss and optimisation options ---------------------------------------------------------------------------------

def test_loss_options_run_and_change_the_loss(tmp_path):
    base = train(tmp_path / "a", ["train.max_steps=2", "train.min_snr_gamma=null"])  # plain squared error
    for i, extra in enumerate([["train.noise_offset=0.1"], ["train.min_snr_gamma=5"],
                               ["train.min_timestep=500", "train.max_timestep=600"]]):
        other = train(tmp_path / f"o{i}", ["train.max_steps=2", "train.min_snr_gamma=null", *extra])
        assert math.isfinite(other.final_loss) and other.final_loss != base.final_loss, extra


def test_lr_scale_batch(tmp_path):
    result = train(tmp_path, ["train.max_steps=1", "train.lr_scale=batch", "train.batch_size=2",
                              "train.gradient_accumulation=3", "optimizer.lr=1e-3"])
    assert result.run.optimizer.param_groups[0]["lr"] == pytest.approx(6e-3)


def test_token_norm_options(tmp_path):
    clamp = train(tmp_path / "c", ["train.max_steps=5", "optimizer.lr=1.0", "token.norm=clamp_to_vocab_max"])
    token = clamp.run.token
    assert token.vectors()["emb_params"].norm(dim=1).max() <= token.max_norms["emb_params"] * (1 + 1e-5)
    free = train(tmp_path / "f", ["train.max_steps=5", "optimizer.lr=1.0"])
    assert free.run.token.vectors()["emb_params"].norm(dim=1).max() > token.max_norms["emb_params"]
    pulled = train(tmp_path / "p", ["train.max_steps=5", "optimizer.lr=0.05", "token.norm=l2_to_init",
                                    "token.norm_weight=100"])
    loose = train(tmp_path / "l", ["train.max_steps=5", "optimizer.lr=0.05"])
    drift = {r: (x.run.token.vectors()["emb_params"] - x.run.token.initial["emb_params"]).norm()
             for r, x in (("pulled", pulled), ("loose", loose))}
    assert drift["pulled"] < drift["loose"]


def test_sdxl_train_one_encoder_and_cache_the_other(tmp_path):
    result = train(tmp_path / "a", ["model=tiny_sdxl", "train.max_steps=3", "token.train_encoders=clip_l",
                                    "train.cache_text_encoder_outputs=true", "token.init_word=photo"])
    token = result.run.token
    saved = _vectors(result.embedding)
    assert torch.equal(saved["clip_g"], token.initial["clip_g"])  # kept (and saved) at its start
    assert not torch.equal(saved["clip_l"], token.initial["clip_l"])
    assert len(result.run.backbone.output_cache[1]) > 0
    plain = train(tmp_path / "b", ["model=tiny_sdxl", "train.max_steps=3", "token.train_encoders=clip_l",
                                   "token.init_word=photo"])
    torch.testing.assert_close(_vectors(plain.embedding)["clip_l"], saved["clip_l"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="an encoder whose vectors train cannot be cached"):
        train(tmp_path / "c", ["train.max_steps=1", "train.cache_text_encoder_outputs=true"])
    with pytest.raises(ConfigError, match="applies to SDXL only"):
        train(tmp_path / "d", ["train.max_steps=1", "token.train_encoders=clip_l"])


# ---- several processes -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny_sd15", pytest.param("tiny_sdxl", marks=pytest.mark.slow)])
def test_two_cpu_processes_match_one(tmp_path, model):
    common = [f"model={model}", "train.max_steps=4", "logger=none", "token.num_vectors=2", "data.flip_aug=true"]
    single = subprocess.run([sys.executable, "-m", "tinv", *common, "train.batch_size=4",
                             f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(29500 + os.getpid() % 1000), "-m", "tinv", *common,
                             "train.batch_size=2", f"hydra.run.dir={tmp_path / 'two'}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env=env)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "on cpu: 2 processes" in (tmp_path / "two" / "train.log").read_text()  # really two processes
    one, two = _vectors(tmp_path / "one" / "mychar.safetensors"), _vectors(tmp_path / "two" / "mychar.safetensors")
    for key in one:
        # the sum over two processes' halves adds in another order than one process's sum: float rounding only
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=5e-5)
    assert len(list(tmp_path.glob("two*"))) == 1  # only rank 0 wrote a run dir here


def test_resume_continues_the_same_wandb_run(tmp_path):
    first = train(tmp_path / "a", ["logger=wandb", "train.max_steps=2", "save.state_every_n_steps=2"])
    run_id = first.run.tracker.run_id
    assert first.summary["wandb_name"] == f"mychar-{tmp_path.name}-a"  # a single run: <token>-<its folder>
    assert run_id and json.loads((tmp_path / "a" / "state" / "state.json").read_text())["tracker_id"] == run_id
    second = train(tmp_path / "b", ["logger=wandb", "train.max_steps=4", f"resume={tmp_path / 'a'}"])
    assert second.run.tracker.run_id == run_id and second.step == 4
    assert [json.loads(x)["step"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.slow
def test_compiled_unet_trains_like_eager(tmp_path):
    """Minutes on a CPU (inductor compiles C++): run with `python -m pytest -m slow`."""
    eager = train(tmp_path / "e", ["train.max_steps=3"])
    compiled = train(tmp_path / "c", ["train.max_steps=3", "train.compile=true"])
    assert compiled.final_loss == pytest.approx(eager.final_loss, rel=1e-3)


@pytest.mark.parametrize("overrides,message", [
    (["sample.every_n_steps=2", "sample.prompts=[a photo of mychar --w 100]"], "width 100 must be a positive multiple"),
    (["train.max_timestep=2000"], "train.max_timestep=2000 must be in"),
    (["model.clip_skip=50"], "model.clip_skip=50 is more than the 3 layers"),
])
def test_bad_run_settings_fail_at_start(tmp_path, overrides, message, monkeypatch):
    from tinv.trainer import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail("training started"))
    with pytest.raises(ConfigError, match=message):
        train(tmp_path, overrides)


def test_resume_finds_the_previous_state_if_killed_mid_save(tmp_path):
    from tinv.state import find_state

    run = tmp_path / "run"
    old = run / ".state-old-x1" / "state"
    old.mkdir(parents=True)
    (old / "state.json").write_text("{}")
    assert find_state(str(run), tmp_path) == (old.parent, old)


def test_previews_reach_wandb_keyed_by_prompt(tmp_path):
    train(tmp_path, ["logger=wandb", "train.max_steps=1", "sample.every_n_steps=1", "sample.steps=2",
                     "logger.log_embedding=true"])
    images = list(tmp_path.glob("wandb/offline-run-*/files/media/images/samples/*.png"))
    assert len(images) == 1 and images[0].name.startswith("00 a photo of mychar")


@pytest.mark.slow  # a sweep and two resumes as subprocesses (about 25 s)
def test_a_sweep_jobs_folder_resumes_as_typed_or_as_pasted_from_the_stop_message(tmp_path):
    import shlex

    from tinv.commandline import override_value
    from tinv.commandline import resume_argument

    sweep = tmp_path / "sweep"
    first = _cli(["-m", "train.max_steps=2", "optimizer.lr=1e-3", "logger=none", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert first.wait() == 0, first.stderr.read()[-2000:]
    job = next(p for p in sweep.iterdir() if p.is_dir())
    assert "=" in job.name and "," in job.name  # Hydra's job folder: the overrides in its name
    pasted = shlex.split(resume_argument(job))  # what the stop message tells the user to paste
    assert len(pasted) == 1 and override_value(pasted[0]) == str(job)
    for n, resume in enumerate([f"resume={job}", pasted[0]]):  # typed raw, or pasted
        again = _cli([resume, f"train.max_steps={3 + n}"], tmp_path)
        assert again.wait() == 0, again.stderr.read()[-2000:]
    steps = [json.loads(x)["step"] for x in (job / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
