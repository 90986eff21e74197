"""Composition: every config choice composes and checks, typos and bad values fail at composition or at start with
the key named, the toy world plugs in from the defaults list, deprecated keys still work."""

import ast
import logging

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF, ROOT, compose
from tinv.config import apply_deprecated, check_values, recorded_config
from tinv.errors import ConfigError
from tinv.optim import check_optimization, check_target

CHOICES = [(group.name, p.stem) for group in sorted(CONF.iterdir()) if group.is_dir() and group.name != "hydra"
           for p in sorted(group.glob("*.yaml"))]


@pytest.mark.parametrize("group,choice", CHOICES, ids=[f"{g}={c}" for g, c in CHOICES])
def test_every_choice_composes_and_passes_the_checks(group, choice):
    overrides = [f"{group}={choice}"] + (["data.image_dir=/tmp"] if group == "experiment" else [])
    cfg = compose(overrides)
    apply_deprecated(cfg)
    check_values(cfg)
    assert cfg.data.resolution == cfg.model.resolution
    if group in ("optimizer", "scheduler") and choice != "adamw8bit":  # bitsandbytes is optional
        check_target(group, cfg[group], choice)
    if group == "model" and not choice.startswith("tiny") and not choice.endswith("_shape"):
        OmegaConf.resolve(cfg)  # the others resolve to folders written on first use


def test_the_toy_world_comes_from_the_defaults_list_not_from_the_model():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="train", return_hydra_config=True)  # no overrides at all
        bare = hydra_compose(config_name="train", overrides=["~world"])
    choices = cfg.hydra.runtime.choices
    assert (choices.model, choices.data, choices.world) == ("toy", "demo", "toy")
    assert cfg.callbacks.concept._target_ == "tinv.toy.evaluation.ConceptScoring"
    assert (cfg.token.init_word, cfg.objective.metric, cfg.objective.mode) == ("shape", "val/concept_and_edit", "max")
    # the model file itself sets model keys only; without the world the toy model is a plain model
    assert set(OmegaConf.load(CONF / "model" / "toy.yaml")) == {"name", "family", "path", "resolution",
                                                                 "prediction_type"}
    assert "concept" not in bare.callbacks and bare.token.init_word is None and bare.objective.metric == "val/loss"
    sd15 = compose(["model=sd15"])
    assert "concept" not in sd15.callbacks and sd15.token.init_word is None


def toy_imports(source: str, package: str) -> list[str]:
    """The tinv.toy modules that `source` (a module of `package`) imports, relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found += [n for n in names if n == "tinv.toy" or n.startswith("tinv.toy.")]
    return found


def test_no_core_module_imports_the_toy_world():
    offenders = {}
    for path in sorted((ROOT / "tinv").rglob("*.py")):
        module = path.relative_to(ROOT).with_suffix("").parts
        if "toy" not in module:
            offenders[str(path.relative_to(ROOT))] = toy_imports(path.read_text(), ".".join(module[:-1]))
    assert len(offenders) > 20 and not any(offenders.values()), {k: v for k, v in offenders.items() if v}
    # the check sees every form of import
    assert toy_imports("from ..toy import world", "tinv.data") == ["tinv.toy", "tinv.toy.world"]
    assert toy_imports("def f():\n    from .toy.model import x", "tinv")[0] == "tinv.toy.model"
    assert toy_imports("import tinv.toy.judge", "tinv") == ["tinv.toy.judge"]


def test_model_configs_carry_family_resolution_and_prediction():
    sd2 = compose(["model=sd2"]).model
    assert (sd2.family, sd2.resolution, sd2.prediction_type) == ("sd2", 768, "v_prediction")
    assert compose(["model=tiny_sd2"]).model.prediction_type == "v_prediction"
    assert compose(["model=sdxl"]).model.resolution == 1024
    for file in (CONF / "model").glob("*.yaml"):  # the name embedding files record must find the same choice again
        assert OmegaConf.load(file).name == file.stem, file


@pytest.mark.parametrize("override", ["model.pathh=x", "train.max_step=3", "token.strng=x", "save.fromat=pt",
                                      "data.image_dirr=x", "logger.projct=x", "callbacks.previews.every_n_step=2",
                                      "objective.metrc=x"])
def test_misspelled_key_fails_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        compose([override])


def test_wrong_type_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose(["train.max_steps=many"])


@pytest.mark.parametrize("override,allowed", [("train.mixed_precision=fp8", "no, fp16, bf16"),
                                              ("save.format=ckpt", "safetensors, pt"),
                                              ("template.kind=people", "object, style, caption"),
                                              ("sample.sampler=plms", "ddim, euler, euler_a, dpmsolver++"),
                                              ("data.resize_interpolation=cubic", "lanczos, nearest"),
                                              ("objective.mode=up", "min, max")])
def test_values_outside_their_choices_fail_at_composition_listing_them(override, allowed):
    with pytest.raises(ConfigCompositionException) as err:
        compose([override])
    text = str(err.value) + str(err.value.__cause__)
    assert override.split("=")[0] in text and allowed in text


def test_every_allowed_value_has_its_implementation():
    from tinv.backbone import FAMILIES
    from tinv.choices import Family, Interpolation, Precision, Sampler
    from tinv.data.dataset import RESAMPLING
    from tinv.run import DTYPES
    from tinv.sampling import SAMPLER_CLASSES

    assert set(FAMILIES) == set(Family.values())
    assert set(DTYPES) == set(Precision.values())
    assert set(SAMPLER_CLASSES) == set(Sampler.values())
    assert set(RESAMPLING) == set(Interpolation.values())


def test_choices_read_as_plain_strings():
    cfg = compose(["sample.sampler=dpmsolver++", "train.mixed_precision=bf16"])
    assert cfg.sample.sampler == "dpmsolver++" and f"{cfg.train.mixed_precision}" == "bf16"
    assert repr(cfg.train.mixed_precision) == "'bf16'"


@pytest.mark.parametrize("override,message", [("token.num_vectors=0", "token.num_vectors=0 must be at least 1"),
                                              ("data.vae_batch_size=0", "data.vae_batch_size=0 must be at least 1"),
                                              ("sample.every_n_steps=-2", "sample.every_n_steps=-2 must be at least 0"),
                                              ("val.split=1.5", "val.split=1.5 must be in"),
                                              ("token.train_encoders=clip_l", "applies to SDXL only"),
                                              ("optimizer.lr=inf", "optimizer.lr=inf must be a finite number"),
                                              ("optimizer.lr=nan", "optimizer.lr=nan must be a finite number"),
                                              ("optimizer.lr=-0.1", "optimizer.lr=-0.1 must be at least 0"),
                                              ("optimizer.lr=1e30", "optimizer.lr=1e\\+30 is above 1000"),
                                              ("train.min_snr_gamma=-inf", "min_snr_gamma=-inf must be a finite"),
                                              ("train.noise_offset=1e30", "noise_offset=1e\\+30 must be in \\[0, 1\\]"),
                                              ("method=pivotal", None),
                                              ("method=pivotal lora.lr=-1", "lora.lr=-1.0 must be at least 0")])
def test_bad_values_name_the_key(override, message):
    if message is None:  # the sibling that must pass: the default of a group the checks read
        check_values(compose(override.split()))
        return
    with pytest.raises(ConfigError, match=message):
        check_values(compose(override.split()))


def test_deprecated_keys_warn_once_and_reach_their_new_place(caplog):
    cfg = compose(["model=toy", "val.num_samples=8", "val.concept=red circle on a gray background"])
    with caplog.at_level(logging.WARNING):
        apply_deprecated(cfg)
    assert (cfg.callbacks.concept.num_samples, cfg.callbacks.concept.concept) == (8, "red circle on a gray background")
    assert caplog.text.count("is deprecated") == 2 and "val.num_samples is deprecated; use callbacks.concept" in \
        caplog.text
    recorded = recorded_config(cfg)  # what the dashboard gets: each setting once, where it now lives
    assert "num_samples" not in recorded["val"] and recorded["callbacks"]["concept"]["num_samples"] == 8
    off = compose(["model=toy", "val.judge=null"])
    apply_deprecated(off)
    assert "concept" not in off.callbacks  # val.judge=null turned scoring off, and still does
    with pytest.raises(ConfigError, match="val.judge=toy: that setting belongs to callbacks.concept"):
        apply_deprecated(compose(["model=tiny_sd15", "val.judge=toy"]))


def test_the_objective_picks_optunas_direction():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        toy = hydra_compose(config_name="train", overrides=["sweep=optuna"], return_hydra_config=True)
        tiny = hydra_compose(config_name="train", overrides=["sweep=optuna", "model=tiny_sd15"],
                             return_hydra_config=True)
    assert toy.hydra.sweeper.direction == "maximize" and tiny.hydra.sweeper.direction == "minimize"


def test_sdxl_style_preset_overrides_groups():
    cfg = compose(["experiment=sdxl_style", "data.image_dir=/tmp"])
    assert (cfg.model.family, cfg.template.kind, cfg.scheduler.name) == ("sdxl", "caption", "cosine")
    assert cfg.token.num_vectors == 8


def test_misspelled_optimizer_argument_is_named():
    cfg = compose(["+optimizer.betaz=1"])
    with pytest.raises(ConfigError, match="optimizer.betaz is not an argument of torch.optim.AdamW"):
        check_target("optimizer", cfg.optimizer, "adamw")


def test_missing_optimizer_package_names_it(monkeypatch):
    import tinv.optim as optim

    def no_import(path):
        raise ImportError(path)

    monkeypatch.setattr(optim, "get_method", no_import)
    cfg = compose(["optimizer=prodigy"])
    with pytest.raises(ConfigError, match=r"optimizer=prodigy needs the package 'prodigyopt': pip install prodigyopt"):
        check_target("optimizer", cfg.optimizer, "prodigy")


def test_adamw8bit_without_bitsandbytes_says_how_to_fix():
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    cfg = compose(["optimizer=adamw8bit"])
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        check_target("optimizer", cfg.optimizer, "adamw8bit")


@pytest.mark.parametrize("overrides,message", [
    (["optimizer.lr=-1"], "optimizer.lr=-1: Invalid learning rate: -1"),
    (["optimizer=sgd", "optimizer.momentum=-1"], "optimizer.momentum=-1: Invalid momentum value"),
    (["scheduler.name=cosinus"], "scheduler.name=cosinus: 'cosinus' is not a valid SchedulerType"),
])
def test_bad_optimizer_and_scheduler_values_fail_before_loading(overrides, message):
    cfg = compose(overrides)
    with pytest.raises(ConfigError, match=message):
        check_optimization(cfg.optimizer, cfg.scheduler, 10, {})
