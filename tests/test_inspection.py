"""tinv-inspect and the inspect callback: what the vectors became, and warnings when they learned nothing."""

import json
import logging

import torch

from conftest import train
from tinv.formats.embedding import EmbeddingMeta, save_embedding
from tinv.commands.inspect import main


def test_a_vector_copied_from_a_word_is_read_as_that_word(tmp_path, capsys):
    from transformers import CLIPTextModel, CLIPTokenizer

    from tinv.backbone.tiny import tiny_model_path

    model = tiny_model_path("sd15")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    rows = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").get_input_embeddings().weight.detach()
    photo, cat = tokenizer.get_vocab()["photo</w>"], tokenizer.get_vocab()["cat</w>"]
    path = save_embedding(tmp_path / "copy.safetensors", {"emb_params": torch.stack([rows[photo], 3 * rows[cat]])},
                          EmbeddingMeta("copy", "sd1", model, 0), "safetensors")
    assert main([str(path), "--init-word", "photo", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["nearest"][0][0] for r in report] == ["photo", "cat"]  # a longer copy still points at its word
    assert report[0]["cosine_to_start"] > 0.999 and report[1]["norm_percentile"] > report[0]["norm_percentile"]
    assert main([str(path)]) == 0 and "nearest: photo" in capsys.readouterr().out


def test_a_run_logs_the_report_at_each_validation_and_warns_when_nothing_moved(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        train(tmp_path / "still", ["train.max_steps=4", "val.every_n_steps=2", "optimizer.lr=0.0",
                                   "token.init_word=photo"])
    assert "the vectors barely moved from their start" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "still" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "inspect/emb_params/0/cosine_to_start" in r] == [2, 4]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(tmp_path / "moved", ["train.max_steps=4", "optimizer.lr=0.5", "token.init_word=photo"])
    assert "barely moved" not in caplog.text
