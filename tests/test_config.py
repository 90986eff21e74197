"""Composition: every config choice composes and checks, typos and bad values fail at composition or at start with
the key named, the toy world plugs in from the defaults list, deprecated keys still work."""

import ast
import logging
import re

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF, ROOT, compose
from tinv.commandline import precheck
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
    # without its world the toy model is scored as a real model is (conf/scorer/fidelity.yaml)
    assert "concept" not in bare.callbacks and bare.token.init_word is None
    assert bare.callbacks.fidelity._target_ == "tinv.scoring.callback.FidelityScoring"
    assert bare.objective.metric == "val/fidelity"
    sd15 = compose(["model=sd15"])
    assert "concept" not in sd15.callbacks and sd15.token.init_word is None


def imported_modules(source: str, module: str, known: set[str]) -> set[str]:
    """The modules of `known` that `source` (the module named `module`) imports anywhere, inside functions too,
    relative imports resolved; `from x import name` counts x.name when that is a module, else x."""
    package = module if module in PACKAGES else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # tinv.formats.embedding.read_embedding -> tinv.formats.embedding
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


PACKAGES = {module_name(p) for p in (ROOT / "tinv").rglob("__init__.py")}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (ROOT / "tinv").rglob("*.py")}
    return {m: imported_modules(p.read_text(), m, set(files)) for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: each strongly connected group of more than one module, or a module importing itself."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1 or v in graph.get(v, ()):
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circles():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 150
    assert cycles(graph) == [], "import circles (imports inside functions count)"
    # the check sees circles hidden in functions and through packages
    known = {"tinv.a", "tinv.b", "tinv.p", "tinv.p.c"}
    assert imported_modules("def f():\n    from .b import x", "tinv.a", known) == {"tinv.b"}
    assert imported_modules("from ..a import y", "tinv.p.c", known) == {"tinv.a"}
    assert imported_modules("from tinv.p import c", "tinv.a", known) == {"tinv.p.c"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_layers_point_one_way():
    """The core never imports the toy world, the commands or the sweeps' report; file formats never import what
    trains; what trains never imports a command."""
    graph = import_graph()

    def importers(of: str, among) -> dict[str, set[str]]:
        return {m: {i for i in graph[m] if i == of or i.startswith(of + ".")} for m in graph
                if among(m) and any(i == of or i.startswith(of + ".") for i in graph[m])}

    assert importers("tinv.toy", lambda m: not m.startswith("tinv.toy")) == {}
    assert importers("tinv.commands", lambda m: not m.startswith(("tinv.commands", "tinv.__main__"))) == {}
    assert importers("tinv.trained", lambda m: m.startswith("tinv.formats")) == {}
    assert importers("tinv.sweeping.report", lambda m: not m.startswith(("tinv.sweeping", "tinv.commands"))) == {}
    assert graph["tinv.commands.train"] >= {"tinv.train"} and "tinv.toy" not in graph["tinv.train"]


def test_installed_packages_keep_conf_and_sweeps_inside_tinv():
    """conf/ and sweeps/ stay at the top of the repository and install as tinv.conf and tinv.sweeps (tinv/conf and
    tinv/sweeps link to them): never as top-level packages named conf or sweeps in a user's site-packages."""
    import tomllib

    setuptools = pytest.importorskip("setuptools")
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    installed = setuptools.find_namespace_packages(str(ROOT), include=find["include"])
    assert {"tinv.conf", "tinv.conf.model", "tinv.sweeps", "tinv.sweeps.sweep", "tinv.formats"} <= set(installed)
    assert {p.split(".")[0] for p in installed} == {"tinv", "hydra_plugins"}
    for name in ("conf", "sweeps"):
        assert (ROOT / "tinv" / name).resolve() == ROOT / name
    from tinv.commandline import CONF, SWEEPS

    assert (CONF / "train.yaml").is_file() and (SWEEPS / "lr_vectors.yaml").is_file()


@pytest.mark.parametrize("override, new", [
    ("parts.vectors._target_=tinv.parts.TokenVectors", "tinv.trained.token.TokenVectors"),
    ("+parts.lora._target_=tinv.lora.LoraWeights", "tinv.trained.lora.LoraWeights"),
    ("hydra.callbacks.best_job._target_=tinv.report.AnnounceBestJob", "tinv.sweeping.best.AnnounceBestJob")])
def test_a_moved_target_fails_at_composition_naming_the_new_path(override, new):
    with pytest.raises(ConfigError, match=rf"_target_=tinv\.\S+ has moved to {re.escape(new)}"):
        precheck([override])
    if not override.startswith("hydra."):  # a run built without the command line (tinv.train.run) checks it too
        with pytest.raises(ConfigError, match=re.escape(new)):
            check_values(compose([override]))


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
