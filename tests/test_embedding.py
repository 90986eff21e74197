import pytest
import torch
from torch import nn

from tinv.backbone.tiny import tiny_model_path
from tinv.backbone import Backbone
from tinv.formats.embedding import EmbeddingMeta, load_embedding, save_embedding
from tinv.trained.token import ConceptToken, SplicedEmbedding
from tinv.errors import ConfigError


def test_token_names_follow_kohya():
    tok = ConceptToken("mychar", num_vectors=3)
    assert tok.names == ["mychar", "mychar1", "mychar2"]


def test_expand_replaces_whole_words_only():
    tok = ConceptToken("mychar", num_vectors=3)
    assert tok.expand("a photo of mychar, smiling") == "a photo of mychar mychar1 mychar2, smiling"
    assert tok.expand("mycharacter and xmychar") == "mycharacter and xmychar"
    assert tok.expand("MyChar") == "mychar mychar1 mychar2"
    assert ConceptToken("mychar").expand("a mychar") == "a mychar"


def test_token_string_must_be_one_word():
    with pytest.raises(ConfigError, match="token.string"):
        ConceptToken("two words")


def test_spliced_embedding_trains_only_its_rows():
    base = nn.Embedding(10, 4).requires_grad_(False)
    before = base.weight.clone()
    splice = SplicedEmbedding(base, first_new_id=10, vectors=torch.ones(2, 4))
    out = splice(torch.tensor([[1, 10, 11, 3]]))
    assert torch.equal(out[0, 0], before[1]) and torch.equal(out[0, 3], before[3])
    assert torch.equal(out[0, 1], torch.ones(4))
    out.sum().backward()
    assert base.weight.grad is None
    assert torch.equal(splice.vectors.grad, torch.ones(2, 4))


def test_vectors_stay_fp32_when_the_vocabulary_is_half():
    base = nn.Embedding(10, 4).to(torch.bfloat16).requires_grad_(False)
    splice = SplicedEmbedding(base, 10, torch.randn(1, 4))
    out = splice(torch.tensor([[10, 2]]))
    assert out.dtype == torch.bfloat16 and splice.vectors.dtype == torch.float32
    out.float().sum().backward()
    assert splice.vectors.grad.dtype == torch.float32


@pytest.mark.parametrize("word", ["cat", "photo", "<|endoftext|>", "a"])
def test_known_token_is_refused_with_a_suggestion(word):
    backbone = Backbone.from_pretrained("sd1", tiny_model_path("sd15"))
    with pytest.raises(ConfigError, match=r"token.string=.*already a word the model knows .* pick a new word"):
        ConceptToken(word).check_new(backbone.encoders)


def test_extra_vector_names_are_checked_too():
    backbone = Backbone.from_pretrained("sd1", tiny_model_path("sd15"))
    backbone.encoders[0].tokenizer.add_tokens(["zork1"])  # as if another embedding were loaded before
    ConceptToken("zork", num_vectors=1).check_new(backbone.encoders)
    with pytest.raises(ConfigError, match="'zork1' is already a word"):
        ConceptToken("zork", num_vectors=2).check_new(backbone.encoders)


def test_install_initialises_from_the_init_word():
    backbone = Backbone.from_pretrained("sd1", tiny_model_path("sd15"))
    backbone.load_models(torch.device("cpu"))
    enc = backbone.encoders[0]
    photo_id = enc.tokenizer.get_vocab()["photo</w>"]
    vocab = enc.model.get_input_embeddings().weight.clone()
    tok = ConceptToken("mychar", num_vectors=2, init_word="photo")
    tok.install(backbone.encoders, seed=0)
    assert torch.equal(tok.vectors()["emb_params"], vocab[[photo_id, photo_id]])
    ids = enc.tokenizer(tok.expand("a mychar"), add_special_tokens=False).input_ids
    assert ids[1:] == [len(enc.tokenizer) - 2, len(enc.tokenizer) - 1]


def test_without_init_word_the_vectors_have_vocabulary_scale():
    backbone = Backbone.from_pretrained("sd1", tiny_model_path("sd15"))
    backbone.load_models(torch.device("cpu"))
    vocab = backbone.encoders[0].model.get_input_embeddings().weight
    tok = ConceptToken("mychar", num_vectors=4)
    tok.install(backbone.encoders, seed=3)
    norms = tok.vectors()["emb_params"].norm(dim=1)
    mean_norm = vocab.norm(dim=1).mean()
    assert torch.all((norms > 0.5 * mean_norm) & (norms < 2 * mean_norm))
    assert len(set(norms.tolist())) == 4


def test_save_refuses_nan(tmp_path):
    meta = EmbeddingMeta("t", "sd1", "x", 1)
    with pytest.raises(RuntimeError, match="NaN"):
        save_embedding(tmp_path / "t.safetensors", {"emb_params": torch.tensor([[float("nan")]])}, meta, "safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_formats_round_trip(tmp_path, fmt):
    meta = EmbeddingMeta("t", "sd1", "x", 7)
    vec = {"emb_params": torch.randn(3, 8)}
    path = save_embedding(tmp_path / f"t.{fmt}", vec, meta, fmt)
    assert torch.equal(load_embedding(path)["emb_params"], vec["emb_params"])
    xl = {"clip_l": torch.randn(2, 8), "clip_g": torch.randn(2, 16)}
    path = save_embedding(tmp_path / f"xl.{fmt}", xl, meta, fmt)
    loaded = load_embedding(path)
    assert all(torch.equal(loaded[k], xl[k]) for k in xl)


def test_the_same_vectors_make_the_same_file(tmp_path):
    import hashlib

    from safetensors import safe_open

    from tinv.formats.embedding import EmbeddingMeta, save_embedding

    vectors = {"clip_l": torch.randn(2, 8), "clip_g": torch.randn(2, 16)}
    meta = EmbeddingMeta("mychar", "sdxl", "/models/xl", 7)
    digests = set()
    for i in range(6):  # safetensors' own metadata order varies from call to call
        path = save_embedding(tmp_path / f"{i}.safetensors", vectors, meta, "safetensors")
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata()["tinv.base_model"] == "/models/xl" and torch.equal(f.get_tensor("clip_g"), vectors["clip_g"])


@pytest.mark.parametrize("fmt,name", [("kohya", "t.safetensors"), ("a1111", "t.pt"), ("diffusers", "learned_embeds.safetensors")])
def test_the_metadata_travels_in_every_format_with_room_for_it(tmp_path, fmt, name):
    from tinv.formats.embedding import read_embedding

    meta = EmbeddingMeta("bluetri", "sd1", "/models/sd15", 7, "sd15")
    path = save_embedding(tmp_path / name, {"emb_params": torch.randn(2, 8)}, meta, fmt)
    loaded = read_embedding(path)
    assert loaded.name == "bluetri" and EmbeddingMeta.from_header(loaded.header, loaded.name) == meta


def test_an_a1111_embedding_image_is_read_without_unpickling(tmp_path):
    """A1111 can save an embedding as a PNG: JSON in a text chunk, each tensor as nested lists."""
    import base64
    import json

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from tinv.formats.embedding import read_embedding

    vectors = torch.randn(2, 8)
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": {"TORCHTENSOR": vectors.tolist()}},
            "name": "pngchar", "step": 500, "sd_checkpoint": None, "sd_checkpoint_name": None}
    info = PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data).encode()).decode())
    Image.new("RGB", (16, 16)).save(tmp_path / "pngchar.png", pnginfo=info)
    loaded = read_embedding(tmp_path / "pngchar.png")
    assert loaded.name == "pngchar" and torch.allclose(loaded.vectors["emb_params"], vectors)
    Image.new("RGB", (16, 16)).save(tmp_path / "plain.png")  # a picture, not an embedding: said in one line
    with pytest.raises(ConfigError, match=r"plain.png: not an embedding file \(it is an image, PNG\)"):
        read_embedding(tmp_path / "plain.png")
    (tmp_path / "notes.pt").write_text("a photo of mychar\n")
    with pytest.raises(ConfigError, match=r"not an embedding file \(it is a text file\)"):
        read_embedding(tmp_path / "notes.pt")
