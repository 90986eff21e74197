"""Extending a run from config alone: a callback and a trainable part defined here (not in tinv), added with
`+callbacks.<name>._target_` / `+parts.<name>._target_`, switched off with `~callbacks.<name>`."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import train
from tinv.errors import ConfigError


class Recorder:
    """A user's callback: a plain class with only the hooks it needs, no base class."""

    def __init__(self, label: str = "x"):
        self.label, self.events, self.steps, self.logged, self.files_at_end = label, [], [], [], []

    def on_start(self, run):
        self.events.append(("start", run.step))

    def on_step_end(self, run, step):
        self.steps.append((step.step, step.skipped, step.loss))

    def on_log(self, run, metrics):
        self.logged.append((run.step, sorted(metrics)))

    def on_end(self, run):
        self.events.append(("end", run.step))
        self.files_at_end = sorted(p.name for p in run.run_dir.glob("*.safetensors"))


class Offset:
    """A second trainable part: one scalar pulled towards 1 by its own loss term, written to its own file."""

    def setup(self, run):
        self.value = torch.nn.Parameter(torch.zeros(1, device=run.device))

    def parameters(self):
        return [self.value]

    def param_groups(self):
        return [{"params": [self.value], "lr": 0.1}]

    def loss_term(self, micro):
        return ((self.value - 1) ** 2).sum()

    def after_step(self):
        pass

    def metrics(self):
        return {"offset": self.value.item()}

    def state_dict(self):
        return {"value": self.value.detach().cpu().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.value.copy_(state["value"])

    def write(self, run, suffix):
        path = run.run_dir / f"{run.output_name}{suffix}-offset.safetensors"
        save_file({"value": self.value.detach().cpu().contiguous()}, str(path))
        return {"offset_file": path}


def test_a_callback_of_ones_own_sees_every_step_and_the_final_files(run_dir):
    result = train(run_dir, ["train.max_steps=4", "save.every_n_steps=2", "~callbacks.previews",
                             "+callbacks.mine._target_=test_extensions.Recorder", "+callbacks.mine.label=seen"])
    mine = result.run.callbacks["mine"]
    assert mine.label == "seen" and "previews" not in result.run.callbacks
    assert mine.events == [("start", 0), ("end", 4)]
    assert [s[0] for s in mine.steps] == [1, 2, 3, 4] and not any(s[1] for s in mine.steps)
    assert [s[2] for s in mine.steps][-1] == result.final_loss
    assert [step for step, keys in mine.logged if "train/loss" in keys] == [1, 2, 3, 4]
    # the final file is written by the embedding callback, which runs before ours at the end
    assert mine.files_at_end == ["mychar-step00000002.safetensors", "mychar-step00000004.safetensors",
                                 "mychar.safetensors"]


def test_callback_settings_switch_and_configure_the_shipped_ones(run_dir):
    result = train(run_dir, ["train.max_steps=3", "callbacks.embedding.every_n_steps=1", "~callbacks.state",
                             "save.state_every_n_steps=1"])
    assert len(list(run_dir.glob("mychar-step*.safetensors"))) == 3
    assert "state" not in result.run.callbacks  # off, whatever save.* says...
    assert json.loads((run_dir / "state" / "state.json").read_text())["step"] == 3  # ...but a run's end writes it


def test_a_bad_callback_is_one_line_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="callbacks.mine._target_='no_such_module.Thing' cannot be imported"):
        train(tmp_path, ["train.max_steps=1", "+callbacks.mine._target_=no_such_module.Thing"])
    with pytest.raises(ConfigError, match="callbacks.mine: .*unexpected keyword argument 'colour'"):
        train(tmp_path, ["train.max_steps=1", "+callbacks.mine._target_=test_extensions.Recorder",
                         "+callbacks.mine.colour=red"])


def test_a_part_of_ones_own_trains_writes_and_resumes_beside_the_vectors(tmp_path):
    common = ["train.max_steps=6", "+parts.offset._target_=test_extensions.Offset", "token.init_word=photo"]
    whole = train(tmp_path / "whole", common)
    run = whole.run
    groups = run.optimizer.param_groups
    assert [g["lr"] for g in groups] == [5e-3, 0.1]  # each part's groups, each with its own lr
    assert groups[1]["params"] == [run.parts["offset"].value]
    offset = load_file(str(tmp_path / "whole" / "mychar-offset.safetensors"))["value"]
    assert 0.3 < offset.item() < 1.0  # pulled towards 1 by its loss term
    assert whole.summary["offset_file"].endswith("mychar-offset.safetensors")
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["offset"] == pytest.approx(offset.item())

    # stopped at step 3 (state saved), then resumed: the same vectors and offset as the uninterrupted run
    train(tmp_path / "first", [*common, "train.max_steps=3", "save.state_every_n_steps=3"])
    state = torch.load(tmp_path / "first" / "state" / "state.pt", weights_only=True)
    assert set(state["parts"]) == {"vectors", "offset"}
    resumed = train(tmp_path / "again", [*common, f"resume={tmp_path / 'first'}"])
    assert resumed.step == 6
    end = Path(resumed.summary["embedding"]).parent
    assert torch.equal(load_file(str(end / "mychar.safetensors"))["emb_params"],
                       load_file(str(tmp_path / "whole" / "mychar.safetensors"))["emb_params"])
    assert torch.equal(load_file(str(end / "mychar-offset.safetensors"))["value"], offset)
