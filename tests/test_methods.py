"""The editability methods (token.init_from, token.context_weight, token.norm) on every family: they train, start
where they say, and write files diffusers loads as they are."""

import math

import pytest
import torch

from conftest import train
from test_train_tiny import FAMILIES, _load_into, _pipeline

METHODS = {
    "cross_init": ["token.init_from=output"],
    "context": ["token.context_weight=1.0"],
    "l2_to_init": ["token.norm=l2_to_init"],
    "clamp_to_vocab_max": ["token.norm=clamp_to_vocab_max"],
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model", list(FAMILIES))
def test_each_method_trains_every_family_and_diffusers_loads_the_file(model, method, run_dir):
    result = train(run_dir, [f"model={model}", "train.max_steps=3", "token.num_vectors=2", "token.init_word=photo",
                             "optimizer.lr=0.05", *METHODS[method]])
    run, backbone = result.run, result.run.backbone
    assert result.step == 3 and math.isfinite(result.final_loss)
    photo = {enc.key: enc.tokenizer("photo", add_special_tokens=False).input_ids for enc in backbone.encoders}
    if method == "cross_init":  # the start is the encoder's output for the word, not its input row
        states = backbone.hidden_states(backbone.tokenize(["photo"]))
        for enc, state in zip(backbone.encoders, states):
            start = run.token.initial[enc.key]
            torch.testing.assert_close(start[0], state[0, 1].float())
            assert not torch.allclose(start[0], enc.model.get_input_embeddings().base.weight[photo[enc.key][0]])
    if method == "clamp_to_vocab_max":
        for enc in backbone.encoders:
            assert run.token.vectors()[enc.key].norm(dim=1).max() <= run.token.max_norms[enc.key] + 1e-5

    pipe = _pipeline(backbone)
    tensors = _load_into(pipe, result.embedding, "mychar")
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if backbone.family == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if backbone.family == "sdxl" else [])
    for te, tok, key in zip(encoders, tokenizers, FAMILIES[model][1]):
        ids = tok.convert_tokens_to_ids(["mychar", "mychar_1"])
        assert torch.equal(te.get_input_embeddings().weight[ids], tensors[key])
        assert torch.equal(tensors[key], run.token.vectors()[key].to(tensors[key].dtype))
    if method == "context":  # positive once the vectors moved, zero where they equal the word's rows again
        part = run.parts["vectors"]
        assert part.context_loss().item() > 0
        for enc in backbone.encoders:
            splice = enc.model.get_input_embeddings()
            with torch.no_grad():
                splice.vectors.copy_(splice.base.weight[photo[enc.key][0]].expand_as(splice.vectors))
        assert part.context_loss().item() == pytest.approx(0.0, abs=1e-10)
