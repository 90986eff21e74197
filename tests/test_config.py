import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF, compose
from tinv.config import check_values
from tinv.errors import ConfigError
from tinv.optim import check_optimization, check_target

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
TEMPLATES = sorted(p.stem for p in (CONF / "template").glob("*.yaml"))
OPTIMIZERS = sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in (CONF / "scheduler").glob("*.yaml"))


def test_groups_hold_the_promised_choices():
    assert set(MODELS) == {"toy", "sd15", "sd2", "sdxl", "tiny_sd15", "tiny_sd2", "tiny_sdxl", "sd15_shape", "sd2_shape",
                           "sdxl_shape"}
    assert set(TEMPLATES) == {"object", "style", "caption"}
    assert set(OPTIMIZERS) == {"adamw", "adamw8bit", "lion", "prodigy", "sgd", "adafactor"}
    assert set(SCHEDULERS) == {"constant", "constant_with_warmup", "cosine", "linear"}


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_and_template_composes(model, template):
    cfg = compose([f"model={model}", f"template={template}"])
    check_values(cfg)
    assert cfg.template.kind == template
    assert cfg.model.family in ("sd1", "sd2", "sdxl")
    assert cfg.data.resolution == cfg.model.resolution
    if not model.startswith("tiny") and not model.endswith("_shape"):  # those resolve to folders written on use
        OmegaConf.resolve(cfg)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_states_family_resolution_and_prediction(model):
    text = (CONF / "model" / f"{model}.yaml").read_text()
    for key in ("family:", "path:", "resolution:", "prediction_type:"):
        assert key in text


def test_the_toy_model_and_demo_data_are_the_defaults():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="train", return_hydra_config=True)  # no overrides at all
    choices = cfg.hydra.runtime.choices
    assert (choices.model, choices.data) == ("toy", "demo")
    assert (cfg.model.family, cfg.model.resolution, cfg.val.judge, cfg.token.init_word) == ("sd1", 32, "toy", "shape")
    assert compose(["model=sd15"]).val.judge is None  # only the toy model turns concept scoring on


def test_model_configs_carry_family_resolution_and_prediction():
    sd2 = compose(["model=sd2"]).model
    assert (sd2.family, sd2.resolution, sd2.prediction_type) == ("sd2", 768, "v_prediction")
    assert compose(["model=tiny_sd2"]).model.prediction_type == "v_prediction"
    assert compose(["model=sdxl"]).model.resolution == 1024


@pytest.mark.parametrize("override", ["model.pathh=x", "train.max_step=3", "token.strng=x", "save.fromat=pt",
                                      "data.image_dirr=x", "logger.projct=x"])
def test_misspelled_key_fails_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        compose([override])


def test_wrong_type_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose(["train.max_steps=many"])


@pytest.mark.parametrize("override,key", [("train.mixed_precision=fp8", "train.mixed_precision"),
                                          ("save.format=ckpt", "save.format"),
                                          ("template.kind=people", "template.kind"),
                                          ("token.num_vectors=0", "token.num_vectors")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        check_values(compose([override]))


@pytest.mark.parametrize("name", [o for o in OPTIMIZERS if o != "adamw8bit"] + SCHEDULERS)
def test_optimizer_and_scheduler_targets_accept_their_keys(name):
    group = "optimizer" if name in OPTIMIZERS else "scheduler"
    cfg = compose([f"{group}={name}"])
    check_target(group, cfg[group], name)
    assert "lr" in cfg.optimizer


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
    pytest.importorskip("hydra")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    cfg = compose(["optimizer=adamw8bit"])
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        check_target("optimizer", cfg.optimizer, "adamw8bit")


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiment_presets_compose(experiment):
    cfg = compose([f"experiment={experiment}", "data.image_dir=/tmp"])
    check_values(cfg)
    assert cfg.train.max_steps > 0


def test_sdxl_style_preset_overrides_groups():
    cfg = compose(["experiment=sdxl_style", "data.image_dir=/tmp"])
    assert (cfg.model.family, cfg.template.kind, cfg.scheduler.name) == ("sdxl", "caption", "cosine")
    assert cfg.token.num_vectors == 8


@pytest.mark.parametrize("overrides,message", [
    (["optimizer.lr=-1"], "optimizer: Invalid learning rate: -1"),
    (["optimizer=sgd", "optimizer.momentum=-1"], "optimizer: Invalid momentum value"),
    (["scheduler.name=cosinus"], "scheduler: 'cosinus' is not a valid SchedulerType"),
])
def test_bad_optimizer_and_scheduler_values_fail_before_loading(overrides, message):
    cfg = compose(overrides)
    with pytest.raises(ConfigError, match=message):
        check_optimization(cfg.optimizer, cfg.scheduler, 10, {})
