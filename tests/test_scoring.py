"""Subject and prompt fidelity on the models users train (tinv.scoring): the numbers against a hand computation on
tiny random CLIP and DINO scorers, the class word measured once, the scorers released after each scoring, the
objective of a scored run, and the one-line errors."""

import gc
import json
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli, compose
from tinv.errors import ConfigError
from tinv.scoring import callback as scoring_callback
from tinv.scoring.callback import FidelityScoring
from tinv.scoring.fidelity import combined
from tinv.scoring.models import ScorerModels
from tinv.scoring.tiny import tiny_scorer_path


def scored(*overrides):
    """Overrides that score a tiny model run with the tiny scorers (the tiny models' world turns scoring off)."""
    return ["~world", f"score.clip={tiny_scorer_path('clip')}", f"score.dino={tiny_scorer_path('dino')}",
            "token.init_word=shape", "sample.steps=3", *overrides]


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8))


class FakeRun(SimpleNamespace):
    """What the callback touches of a run, sampling replaced by fixed pictures."""

    def log(self, metrics):
        self.logged.append(dict(metrics))


def fake_run(tmp_path):
    tracker = SimpleNamespace(log_table=lambda *a: None, set_summary=lambda **k: None)
    return FakeRun(device=torch.device("cpu"), accelerator=SimpleNamespace(mixed_precision="no"), is_main=True,
                   run_dir=tmp_path, step=5, max_steps=5, tracker=tracker, logged=[])


def by_hand(features_a, features_b) -> float:
    """Mean cosine over every pair, one pair at a time."""
    total = 0.0
    for a in features_a:
        for b in features_b:
            total += float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return total / (len(features_a) * len(features_b))


@torch.no_grad()
def raw_features(images, texts):
    """The scorers' features computed here, without tinv.scoring: the transformers classes and processors."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

    clip, dino = tiny_scorer_path("clip"), tiny_scorer_path("dino")
    clip_model, dino_model = CLIPModel.from_pretrained(clip), AutoModel.from_pretrained(dino, add_pooling_layer=False)
    clip_pixels = AutoImageProcessor.from_pretrained(clip)(images=images, return_tensors="pt").pixel_values
    dino_pixels = AutoImageProcessor.from_pretrained(dino)(images=images, return_tensors="pt").pixel_values
    tokens = AutoTokenizer.from_pretrained(clip)(texts, padding=True, return_tensors="pt")
    return (clip_model.get_image_features(pixel_values=clip_pixels).pooler_output.numpy(),
            dino_model(pixel_values=dino_pixels).last_hidden_state[:, 0].numpy(),
            clip_model.get_text_features(**tokens).pooler_output.numpy())


def test_logged_numbers_equal_a_hand_computation_and_the_class_word_is_measured_once(tmp_path, monkeypatch):
    references = [picture(s) for s in range(3)]
    for n, image in enumerate(references):
        image.save(tmp_path / f"{n}.png")
    drawn = {"mychar": [picture(10 + s) for s in range(4)], "shape": [picture(20 + s) for s in range(4)]}
    calls = []

    def fake_sampling(run, specs, batch_size=1):
        subject = "shape" if "shape" in specs[0].prompt else "mychar"
        calls.append([s.prompt for s in specs])
        return drawn[subject]

    monkeypatch.setattr(scoring_callback, "sample_images", fake_sampling)
    scorer = FidelityScoring(clip=tiny_scorer_path("clip"), dino=tiny_scorer_path("dino"),
                             subject_prompts=["a {} in the snow", "a red {}"], num_samples=2, class_word="shape")
    scorer.on_dataset(SimpleNamespace(samples=[SimpleNamespace(path=tmp_path / f"{n}.png") for n in range(3)]))
    run = fake_run(tmp_path)
    scorer.on_start(run)
    first = scorer.score(run)
    second = scorer.score(run)
    assert first == second
    assert calls == [["a photo of shape"] * 2 + ["a shape in the snow", "a red shape"],
                     ["a photo of mychar"] * 2 + ["a mychar in the snow", "a red mychar"],
                     ["a photo of mychar"] * 2 + ["a mychar in the snow", "a red mychar"]]  # the word once

    texts = ["a shape in the snow", "a red shape"]  # CLIP-T's text: the prompt with the class word
    for subject, numbers in (("mychar", first), ("shape", scorer.word)):
        images = drawn[subject]
        clip, dino, text = raw_features(references + images, texts)
        assert numbers["dino"] == pytest.approx(by_hand(dino[3:5], dino[:3]), abs=1e-5)
        assert numbers["clip_i"] == pytest.approx(by_hand(clip[3:5], clip[:3]), abs=1e-5)
        assert numbers["clip_t"] == pytest.approx((by_hand(clip[5:6], text[:1]) + by_hand(clip[6:7], text[1:])) / 2,
                                                  abs=1e-5)
        if subject == "shape":  # the scale's 0: each prompt's sample against the other prompt
            assert numbers["clip_t_floor"] == pytest.approx(
                (by_hand(clip[5:6], text[1:]) + by_hand(clip[6:7], text[:1])) / 2, abs=1e-5)
    assert run.logged[0] == {f"val/word_{k}": v for k, v in scorer.word.items()}
    assert run.logged[1] == {f"val/{k}": v for k, v in first.items()}
    saved = json.loads((tmp_path / "samples" / "score-step-00000005" / "scores.json").read_text())
    assert saved["fidelity"] == first["fidelity"] and saved["word_dino"] == scorer.word["dino"]
    assert (tmp_path / "samples" / "word.png").is_file()


def test_the_combined_score_is_the_harmonic_mean_of_scaled_subject_and_prompt_fidelity():
    word = {"dino": 0.4, "clip_i": 0.6, "clip_t": 0.30, "clip_t_floor": 0.18}
    ceiling = {"dino": 0.8, "clip_i": 0.9}
    token = {"dino": 0.6, "clip_i": 0.75, "clip_t": 0.27}
    out = combined(token, word, ceiling)
    assert out["subject_fidelity"] == pytest.approx((0.5 + 0.5) / 2)
    assert out["prompt_fidelity"] == pytest.approx((0.27 - 0.18) / (0.30 - 0.18))
    assert out["fidelity"] == pytest.approx(2 * 0.5 * 0.75 / 1.25)
    # the training images copied whatever the prompt: CLIP-T as low as for a prompt the image does not show
    copies = combined({"dino": 0.9, "clip_i": 0.95, "clip_t": 0.18}, word, ceiling)
    assert copies["subject_fidelity"] == 1.0 and copies["fidelity"] == 0.0
    assert combined({**word}, word, ceiling)["fidelity"] == 0.0  # the class word itself gains nothing
    worse = combined({"dino": 0.3, "clip_i": 0.6, "clip_t": 0.30}, word, ceiling)  # below the word: ranked, not cut
    much_worse = combined({"dino": 0.2, "clip_i": 0.6, "clip_t": 0.30}, word, ceiling)
    assert much_worse["fidelity"] < worse["fidelity"] < 0
    assert combined(token, word, {"dino": None, "clip_i": None})["subject_fidelity"] == pytest.approx(
        ((0.6 - 0.4) / 0.6 + (0.75 - 0.6) / 0.4) / 2)  # one training image: a perfect score is the ceiling
    no_floor = combined(token, {**word, "clip_t_floor": None}, ceiling)  # one prompt: the scale starts at 0
    assert no_floor["prompt_fidelity"] == pytest.approx(0.27 / 0.30)


def test_scoring_leaves_no_scorer_tensor_alive(tmp_path, monkeypatch):
    loaded = []
    enter = ScorerModels.__enter__

    def watched(self):
        scorers = enter(self)
        loaded.extend(weakref.ref(p) for key in ("clip", "dino") for p in scorers.models[key].parameters())
        return scorers

    monkeypatch.setattr(ScorerModels, "__enter__", watched)
    monkeypatch.setattr(scoring_callback, "sample_images", lambda run, specs, batch_size=1: [picture(1)] * len(specs))
    picture(0).save(tmp_path / "0.png")
    scorer = FidelityScoring(clip=tiny_scorer_path("clip"), dino=tiny_scorer_path("dino"),
                             subject_prompts=["a {} in the snow"], num_samples=1, class_word="shape")
    scorer.on_dataset(SimpleNamespace(samples=[SimpleNamespace(path=tmp_path / "0.png")]))
    run = fake_run(tmp_path)
    scorer.on_start(run)
    scorer.score(run)
    gc.collect()
    assert loaded and all(ref() is None for ref in loaded)


def test_a_missing_scorer_model_is_one_line_naming_its_key(tmp_path):
    dino = tiny_scorer_path("dino")
    with pytest.raises(ConfigError, match=r"score.clip='openai/clip-vit-base-patch32': no folder of that name here, "
                                          r"and as a hub id it is not in the Hugging Face cache .*`hf download"):
        FidelityScoring(clip="openai/clip-vit-base-patch32", dino=dino, subject_prompts=["a {}"], class_word="dog")
    with pytest.raises(ConfigError, match=r"score.dino='.*nowhere': no model folder there"):
        FidelityScoring(clip=tiny_scorer_path("clip"), dino=str(tmp_path / "nowhere"), subject_prompts=["a {}"],
                        class_word="dog")
    with pytest.raises(ConfigError, match=r"score.clip='.*' is a 'vit' model; score.clip needs a clip model"):
        FidelityScoring(clip=dino, dino=dino, subject_prompts=["a {}"], class_word="dog")  # the folders swapped
    with pytest.raises(ConfigError, match=r"score.dino='bad id!': no model folder there"):
        FidelityScoring(clip=tiny_scorer_path("clip"), dino="bad id!", subject_prompts=["a {}"], class_word="dog")
    with pytest.raises(ConfigError, match=r"score.dino='a b/c d' is neither a folder nor a hub id"):
        FidelityScoring(clip=tiny_scorer_path("clip"), dino="a b/c d", subject_prompts=["a {}"], class_word="dog")
    with pytest.raises(ConfigError, match="token.init_word is not set"):
        FidelityScoring(clip=tiny_scorer_path("clip"), dino=dino, subject_prompts=["a {}"], class_word=None)
    with pytest.raises(ConfigError, match=r"score.subject_prompts entry 'a dog' needs exactly one"):
        FidelityScoring(clip=tiny_scorer_path("clip"), dino=dino, subject_prompts=["a dog"], class_word="dog")


def test_scorer_choices_and_worlds_set_the_objective():
    assert compose(["model=sd15"]).objective.metric == "val/fidelity"
    assert compose(["model=sd15", "scorer=none"]).objective.metric == "val/loss"
    assert "fidelity" not in compose(["model=sd15", "scorer=none"]).callbacks
    for model, metric in (("toy", "val/concept_and_edit"), ("tiny_sdxl", "val/loss")):
        cfg = compose([f"model={model}"])
        assert cfg.callbacks.fidelity is None and cfg.objective.metric == metric


@pytest.mark.parametrize("model,extra", [("tiny_sd15", ["logger=wandb"]), ("tiny_sd2", ["template=style"]),
                                         ("tiny_sdxl", [])])
def test_a_scored_tiny_run_reports_fidelity_as_its_objective(tmp_path, model, extra):
    """Each family scored at its end; on SD1 through wandb (offline: the sample table with its images is logged
    without a loss), on SD2 with the style prompts that template=style asks for."""
    from tinv.train import run

    logger = [] if any(o.startswith("logger=") for o in extra) else ["logger=none"]
    cfg = compose([*logger, *scored(f"model={model}", "train.max_steps=2", "score.num_samples=1",
                                    "score.subject_prompts=['a {} in the snow']",
                                    "score.style_prompts=['a cat in the style of {}']", *extra)])
    result = run(cfg, run_dir=tmp_path / "run")
    summary = result.summary
    assert summary["objective_name"] == "best val/fidelity" and summary["objective"] == summary["fidelity"]
    assert 0.0 <= summary["fidelity"] <= 1.0 and summary["scoring_s"] > 0
    assert {"dino", "clip_i", "clip_t", "subject_fidelity", "prompt_fidelity"} <= summary.keys()
    assert "wandb_stopped_at_step" not in summary and "error" not in summary
    scores = json.loads((tmp_path / "run" / "samples" / "score-step-00000002" / "scores.json").read_text())
    style = "template=style" in extra
    assert scores["prompts"] == (["a painting in the style of {}", "a cat in the style of {}"] if style else
                                 ["a photo of {}", "a {} in the snow"])
    assert (tmp_path / "run" / "samples" / "score-step-00000002" / "grid.png").is_file()
    if "logger=wandb" in extra:
        assert summary.get("wandb_id") and list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_tinv_score_gives_the_callbacks_numbers_for_a_pt_file_a_kohya_file_and_a_bundle(tmp_path, capsys):
    """A pivotal run scored at its end; tinv-score on its embedding (kohya layout, and converted to A1111's .pt) with
    its LoRA, and on its bundle alone, finds the same numbers from the run's recorded settings."""
    from tinv.commands.convert import main as convert
    from tinv.commands.score import main as score
    from tinv.toy.demo import demo_images_dir

    run = tmp_path / "run"
    done = cli(scored("method=pivotal", "train.max_steps=4", "score.num_samples=2", "logger=none",
                      f"hydra.run.dir={run}", "score.subject_prompts=['a {} in the snow','a red {}']"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert convert([str(run / "mychar.safetensors"), str(run / "mychar.pt"), "--to", "a1111"]) == 0
    images = str(demo_images_dir())
    for n, args in enumerate(([str(run / "mychar.safetensors")],  # its -lora file beside it comes along
                              [str(run / "mychar.pt"), "--lora", str(run / "mychar-lora.safetensors")],
                              [str(run / "mychar-bundle.safetensors")])):
        assert score([*args, "--images", images, "--out", str(tmp_path / f"scores{n}")]) == 0, args
        found = json.loads((tmp_path / f"scores{n}" / "scores.json").read_text())
        for key in ("dino", "clip_i", "clip_t", "fidelity", "word_dino", "word_clip_t"):
            assert found[key] == pytest.approx(summary[key], abs=1e-5), (args[0], key)
        assert found["lora"]
    assert "with the LoRA" in capsys.readouterr().out
    assert score([str(run / "mychar.safetensors"), "--no-lora", "--images", images, "--out", str(tmp_path / "bare")]) == 0
    bare = json.loads((tmp_path / "bare" / "scores.json").read_text())
    assert bare["lora"] is None and bare["word_dino"] == pytest.approx(summary["word_dino"], abs=1e-5)


def test_tinv_score_says_what_is_missing_in_one_line(tmp_path, capsys):
    """Another tool's file has no run beside it: without --class-word, one line says to give it; an empty --images
    folder, one line naming it; both before any model loads."""
    from tinv.commands.score import main as score
    from tinv.formats.embedding import SD_KEY, EmbeddingMeta, save_embedding
    from tinv.toy.demo import demo_images_dir

    other = save_embedding(tmp_path / "other.safetensors", {SD_KEY: torch.randn(1, 32)}, EmbeddingMeta("other"),
                           "safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert score([str(other), "--images", str(empty), "--model", "tiny_sd15"]) == 2
    assert "--images" in capsys.readouterr().err
    assert score([str(other), "--images", str(demo_images_dir()), "--model", "tiny_sd15"]) == 2
    err = capsys.readouterr().err
    assert "give it with --class-word" in err and len(err.strip().splitlines()) == 1
    assert score([str(other), "--images", str(demo_images_dir()), "--class-word", "dog", "--clip", "/nope"]) == 2
    err = capsys.readouterr().err
    assert "--clip='/nope': no model folder there" in err and "scorer=none" not in err


def test_a_resumed_scored_run_keeps_its_class_word_numbers(tmp_path):
    """The class word is drawn once per run: a run resumed to more steps takes its numbers from the state, and
    scores its end against them."""
    from conftest import train

    common = scored("score.num_samples=1", "score.subject_prompts=['a {} in the snow']", "save.state_every_n_steps=2")
    first = train(tmp_path / "run", [*common, "train.max_steps=2"]).summary
    resumed = train(tmp_path / "again", [*common, "train.max_steps=4", f"resume={tmp_path / 'run'}"]).summary
    assert resumed["step"] == 4 and resumed["word_dino"] == first["word_dino"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("val/word_dino" in r for r in records) == 1 and sum("val/fidelity" in r for r in records) == 2
    assert resumed["scoring_s"] > first["scoring_s"]


def test_the_prompts_follow_the_template_unless_score_kind_says_otherwise():
    common = dict(clip=tiny_scorer_path("clip"), dino=tiny_scorer_path("dino"), subject_prompts=["a {} in the snow"],
                  style_prompts=["a cat in the style of {}"], class_word="painting")
    for kind, score_kind, prompts, reference in (("object", None, ["a {} in the snow"], "a photo of {}"),
                                                 ("caption", None, ["a {} in the snow"], "a photo of {}"),
                                                 ("style", None, ["a cat in the style of {}"], "a painting in the style of {}"),
                                                 ("caption", "style", ["a cat in the style of {}"], "a painting in the style of {}")):
        scorer = FidelityScoring(kind=kind, score_kind=score_kind, **common)
        assert (scorer.prompts, scorer.reference_prompt) == (prompts, reference), (kind, score_kind)
    assert compose(["experiment=sdxl_style"]).callbacks.fidelity.score_kind == "style"


def test_the_class_word_is_drawn_with_a_lora_switched_off_and_settings_decide_what_a_resume_keeps(tmp_path,
                                                                                               monkeypatch):
    """A run resumed without the class word's numbers (started with scorer=none, or other scorer settings) draws
    them with the trained parts that can be switched off (a LoRA) off, as before training."""
    from contextlib import contextmanager

    states = []

    class Lora:
        off = False

        @contextmanager
        def switched_off(self):
            self.off = True
            yield
            self.off = False

    lora = Lora()
    monkeypatch.setattr(scoring_callback, "sample_images",
                        lambda run, specs, batch_size=1: states.append(lora.off) or [picture(1)] * len(specs))
    picture(0).save(tmp_path / "0.png")
    common = dict(clip=tiny_scorer_path("clip"), dino=tiny_scorer_path("dino"), subject_prompts=["a {} in the snow"],
                  num_samples=1)
    scorer = FidelityScoring(class_word="shape", **common)
    scorer.on_dataset(SimpleNamespace(samples=[SimpleNamespace(path=tmp_path / "0.png")]))
    run = fake_run(tmp_path)
    run.parts = {"lora": lora}
    scorer.on_start(run)
    scorer.score(run)
    assert states == [True, False]  # the class word without the LoRA, the token with it
    kept = FidelityScoring(class_word="shape", **common)
    kept.load_state_dict(scorer.state_dict())
    assert kept.word == scorer.word
    other = FidelityScoring(class_word="dog", **common)  # another class word: its numbers are drawn again
    other.load_state_dict(scorer.state_dict())
    assert other.word is None and other.seconds == scorer.seconds
