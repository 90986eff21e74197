"""What a user or a bad day can hand tinv, injected: sizes the machine cannot hold, files cut short, flipped or of the
wrong kind, and network services that never answer. Each ends in one line naming the file, key or value and the
fix (or a repaired result) before anything heavy runs, and nothing the user made changes."""

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import cli, train
from tinv.errors import ConfigError

ARGS = ["train.max_steps=3", "token.num_vectors=2", "train.batch_size=2", "val.every_n_steps=0"]


def command(name: str, *args: str, capsys) -> subprocess.CompletedProcess:
    """A tinv console command as a user runs it, in this process (its entry point, its exit code, its stderr)."""
    from importlib import import_module

    module = f"tinv.commands.{name}"
    capsys.readouterr()
    try:
        code = import_module(module).main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess([name, *args], code, out.out, out.err)


def one_line(proc: subprocess.CompletedProcess, *parts: str) -> str:
    """The error a command ended with: one line, no traceback, holding every part."""
    text = proc.stderr.strip()
    assert proc.returncode != 0 and "Traceback" not in text, text[-2000:]
    line = text.splitlines()[-1]
    assert all(p in line for p in parts), line
    return line


def digests(folder: Path) -> dict[str, str]:
    """Every file of a run but its lock (which records who holds the folder, tinv.ownership)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".tinv-lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A small finished run with its state, to break copies of."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(run_dir, ARGS)
    return run_dir


# ---- sizes checked against the machine, before anything heavy -------------------------------------------------------

def test_more_vectors_than_a_prompt_holds_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="token.num_vectors=10000: a prompt holds 77 tokens.*at most 75 vectors"):
        train(tmp_path / "run", ["token.num_vectors=10000"])
    assert not (tmp_path / "run" / "state").exists()


def test_repeats_that_make_an_epoch_too_long_are_one_line(tmp_path):
    from tinv.data.dataset import build_training_set
    from tinv.toy.demo import demo_images_dir

    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{demo_images_dir()}"\nnum_repeats = 100000000\n')
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"num_repeats=100000000 \(.*d.toml.*\) makes one epoch 800,000,000 images"):
        build_training_set(family="sd1", batch_size=1, dataset_config=str(toml), resolution=64)
    assert time.perf_counter() - started < 30  # refused from the count, not after building the list
    toml.write_text(toml.read_text().replace("100000000", "1000"))  # the sibling that fits
    assert len(build_training_set(family="sd1", batch_size=1, dataset_config=str(toml), resolution=64).order) == 8000


def test_a_resolution_the_memory_cannot_hold_is_one_line_before_encoding(tmp_path, monkeypatch):
    import tinv.memory
    from tinv.data.latent_cache import Latents

    encoded = []
    monkeypatch.setattr(Latents, "prepare", lambda *a, **k: encoded.append(1))  # must not be reached
    monkeypatch.setattr(tinv.memory, "free_bytes", lambda device: 40 * 2**20)  # 40 MB free
    with pytest.raises(ConfigError, match=r"encoding the latents at 256x256 needs about .* of the 40.0 MB free on "
                                          r"this machine: lower data.resolution \(the model's own is 64\)"):
        train(tmp_path / "run", [*ARGS, "data.resolution=256"])
    assert not encoded
    monkeypatch.undo()
    monkeypatch.setattr(tinv.memory, "free_bytes", lambda device: 40 * 2**20)
    assert train(tmp_path / "small", ARGS).step == 3  # 64 pixels fits in the same 40 MB


def test_a_fifo_as_metadata_file_is_one_line_not_a_hang(tmp_path):
    fifo = tmp_path / "meta.json"
    os.mkfifo(fifo)
    signal.alarm(60)  # a hang fails the test instead of the suite
    try:
        with pytest.raises(ConfigError, match="metadata_file=.*meta.json' is not a regular file"):
            train(tmp_path / "run", [*ARGS, f"data.metadata_file={fifo}"])
    finally:
        signal.alarm(0)


# ---- embedding and LoRA files ---------------------------------------------------------------------------------------

BAD_TENSORS = {"0-d": torch.tensor(1.0), "rank 3": torch.zeros(2, 2, 32), "empty": torch.zeros(0, 32),
               "complex": torch.zeros(2, 32, dtype=torch.complex64), "bool": torch.zeros(2, 32, dtype=torch.bool),
               "NaN": torch.full((2, 32), float("nan")), "inf": torch.full((2, 32), float("inf"))}
EXPECTED = {"0-d": "holds a 0-d tensor", "rank 3": "holds a 3-d tensor", "empty": "holds an empty tensor",
            "complex": "holds torch.complex64 values", "bool": "holds torch.bool values",
            "NaN": "holds NaN or inf values", "inf": "holds NaN or inf values"}


def broken_files(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """{case: (file, what the one line says)} for every way an embedding file can be broken."""
    folder.mkdir(exist_ok=True)
    data = good.read_bytes()
    files = {"truncated": (data[:len(data) // 2], "not a readable safetensors file"),
             "empty": (b"", "not an embedding file (it is empty)"),
             "2^62 header": (struct.pack("<Q", 2**62) + b"{}", "not a readable safetensors file")}
    out = {}
    for case, (content, said) in files.items():
        (folder / f"{case}.safetensors").write_bytes(content)
        out[case] = (folder / f"{case}.safetensors", said)
    for case, tensor in BAD_TENSORS.items():
        save_file({"emb_params": tensor}, str(folder / f"{case}.safetensors"))
        out[case] = (folder / f"{case}.safetensors", EXPECTED[case])
    return out


def test_every_broken_embedding_file_is_one_line_naming_it(tmp_path, finished):
    from tinv.formats.embedding import read_embedding

    for case, (path, said) in broken_files(tmp_path, finished / "mychar.safetensors").items():
        with pytest.raises(ConfigError) as err:
            read_embedding(path)
        assert str(path) in str(err.value) and said in str(err.value), (case, str(err.value))


def test_each_command_that_reads_an_embedding_says_so_in_one_line(tmp_path, finished, capsys):
    """The same reader behind tinv-inspect, tinv-convert, tinv-generate and token.weights."""
    cases = broken_files(tmp_path / "bad", finished / "mychar.safetensors")
    truncated, nan = cases["truncated"][0], cases["NaN"][0]
    one_line(command("inspect", str(truncated), "--model", "tiny_sd15", capsys=capsys), str(truncated),
             "cut short")
    one_line(command("convert", str(cases["rank 3"][0]), str(tmp_path / "out.pt"), capsys=capsys),
             "holds a 3-d tensor")
    assert not (tmp_path / "out.pt").exists()  # nothing written from it
    one_line(command("generate", str(nan), "a photo of mychar", "--model", "tiny_sd15", "--n", "1", "--steps", "1",
                     "--out", str(tmp_path / "images"), capsys=capsys), str(nan), "NaN or inf")
    assert not (tmp_path / "images").exists() or not any((tmp_path / "images").iterdir())  # no black images
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(finished.joinpath("mychar.safetensors").read_bytes()[:100])
    one_line(command("generate", str(finished / "mychar.safetensors"), "a photo of mychar", "--model", "tiny_sd15",
                     "--lora", str(lora), "--n", "1", "--steps", "1", capsys=capsys), str(lora), "not a LoRA")
    with pytest.raises(ConfigError, match=f"token.weights: {nan}: emb_params holds NaN or inf"):
        train(tmp_path / "run", [*ARGS, f"token.weights={nan}"])


# ---- a run's own files ----------------------------------------------------------------------------------------------

def _break_state(run_dir: Path, case: str) -> None:
    state = run_dir / "state"
    pt, meta = state / "state.pt", state / "state.json"
    if case == "state.pt cut short":
        pt.write_bytes(pt.read_bytes()[:len(pt.read_bytes()) // 2])
    elif case == "state.pt with a flipped byte":
        data = bytearray(pt.read_bytes())
        data[len(data) // 2] ^= 1
        pt.write_bytes(bytes(data))
    elif case == "state.json cut short":
        meta.write_text(meta.read_text()[:40])
    elif case == "state.json empty":
        meta.write_text("")
    elif case == "state.json a list":
        meta.write_text('["step", 3]')
    elif case == "state.json step a string":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "step": "3"}))


@pytest.mark.parametrize("case", ["state.pt cut short", "state.pt with a flipped byte", "state.json cut short",
                                  "state.json empty", "state.json a list", "state.json step a string"])
def test_a_broken_state_is_one_line_and_the_run_stays_as_it_was(tmp_path, finished, case):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    _break_state(run_dir, case)
    before = digests(run_dir)
    file = "state.pt" if case.startswith("state.pt") else "state.json"
    with pytest.raises(ConfigError, match=f"resume: .*{file} is broken .* start a new run \\(token.weights=.*"
                                          "mychar.safetensors starts it"):
        train(tmp_path / "other", [*ARGS, "train.max_steps=6", f"resume={run_dir}"])
    assert digests(run_dir) == before


def test_a_broken_state_through_the_command_line_exits_2_in_one_line(tmp_path, finished):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    _break_state(run_dir, "state.json cut short")
    before = digests(run_dir)
    one_line(cli([*ARGS, "logger=none", f"resume={run_dir}"], cwd=tmp_path), "state.json is broken")
    assert digests(run_dir) == before


def test_damaged_bytes_in_metrics_jsonl_are_left_out_on_resume(tmp_path, finished):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 2, "train/loss": 1.0\xff\xfe}\n')
    assert train(tmp_path / "other", [*ARGS, "train.max_steps=5", f"resume={run_dir}"]).step == 5


def test_a_broken_latent_cache_entry_is_encoded_again(tmp_path, caplog):
    args = [*ARGS, "train.max_steps=1", "train.cache_latents_to_disk=true", f"data.cache_dir={tmp_path / 'cache'}"]
    train(tmp_path / "a", args)
    entries = sorted((tmp_path / "cache").rglob("*.safetensors"))
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # cut short
    save_file({"latent": torch.full((4, 8, 8), float("nan"))}, str(entries[1]))
    save_file({"latent": torch.zeros(4, 3, 3)}, str(entries[2]))  # another shape
    data = bytearray(entries[3].read_bytes())
    data[3] ^= 0xFF  # a flipped byte in the header's length
    entries[3].write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        train(tmp_path / "b", args)
    assert caplog.text.count("is broken") == 4 and "encoding it again" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        train(tmp_path / "c", args)
    assert "8 reused, 0 encoded" in caplog.text  # repaired on disk, not only in memory


def test_report_lists_a_job_whose_summary_is_cut_short(tmp_path, finished, capsys):
    sweep = tmp_path / "sweep"
    for n in (0, 1):
        shutil.copytree(finished, sweep / f"{n}_optimizer.lr={n + 1}e-3")
    summary = sweep / "1_optimizer.lr=2e-3" / "summary.json"
    summary.write_text(summary.read_text()[:30])
    proc = command("report", str(sweep), capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert "summary.json cannot be read" in proc.stderr
    rows = (sweep / "report.csv").read_text().splitlines()
    assert len(rows) == 3  # the header and both jobs


# ---- network services that never answer -----------------------------------------------------------------------------

@pytest.fixture
def silent_server():
    """A TCP port that accepts connections (the kernel's backlog) and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


@pytest.mark.parametrize("url,said", [("postgresql://u:secret@127.0.0.1:1/x", "postgresql://u:***@127.0.0.1:1/x: "
                                                                        "cannot connect (connection to server"),
                                       ("postgress://u@127.0.0.1/x", "not a database URL"),
                                       ("mysql://u@127.0.0.1/x", "its database driver is not installed")])
def test_an_optuna_storage_refused_or_misspelled_is_one_line(url, said):
    pytest.importorskip("optuna")
    from hydra_plugins.tinv_sweeper import ResumableOptunaSweeper

    with pytest.raises(ConfigError) as err:
        ResumableOptunaSweeper._storage(url)
    assert str(err.value).startswith(f"hydra.sweeper.storage=") and said in str(err.value), str(err.value)
    assert "secret" not in str(err.value)


def test_an_optuna_storage_that_never_answers_is_given_up_in_one_line(tmp_path, silent_server):
    """Through the command line: the sweeper's error is tinv's one line, not Hydra's frames."""
    pytest.importorskip("optuna")
    os.environ["TINV_STORAGE_TIMEOUT_S"] = "2"
    try:
        started = time.perf_counter()
        proc = cli(["-m", "sweep=optuna", "hydra.sweeper.n_trials=1", "train.max_steps=1", "logger=none",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}",
                    f"hydra.sweeper.storage=postgresql://u@127.0.0.1:{silent_server}/x"], cwd=tmp_path)
        assert time.perf_counter() - started < 60
    finally:
        del os.environ["TINV_STORAGE_TIMEOUT_S"]
    assert proc.returncode == 2
    one_line(proc, "cannot connect", "timeout expired")
    assert "giving up after 2 s" in proc.stderr + proc.stdout  # it said what it waits for, and how long


def test_wandb_without_a_network_logs_offline_at_once(silent_server, caplog):
    from tinv.tracking import WandbTracker

    started = time.perf_counter()
    with caplog.at_level("WARNING"):
        assert WandbTracker._online_or_offline("https://127.0.0.1:1") == "offline"
    assert time.perf_counter() - started < 5 and "127.0.0.1:1 cannot be reached" in caplog.text
    assert WandbTracker._online_or_offline(f"http://127.0.0.1:{silent_server}") == "online"  # there: its own timeout
