"""A resumed recipe run gets back the gate settings that live outside the state dict (``TopKGate.k``, the ``keep`` of
input-dependent gates), also when the rebuild from the recipe would not set them again."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import dynsparse as ds
from dynsparse.gates import TopKGate
from dynsparse.recipes import RecipeError, parse_recipe
from dynsparse.recipes.train_checkpoint import gate_settings, restore_

RECIPE = """\
name: settings
seed: 3
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, num_classes: 10, embed_dim: 16, depth: 2, num_heads: 2}
data: {dataset: digits, batch_size: 32, train_subset: 96}
stages:
  - name: gated
    epochs: 3
    sparsify:
      neurons: {gate: topk, keep: 0.5}
      tokens: {gate: cls_attention, blocks: [1]}
    optimizer: {name: adamw, lr: 0.003}
evaluate: {latency: false}
"""


def _knob_at_start(monkeypatch):
    """At the stage's start (not replayed by a resumed run) set every top-k gate to k=3 and the token budget to 0.4,
    as a knob or schedule acting during the run would."""
    from dynsparse.recipes.train import Trainer

    def calibrate(self, si, st, when):
        if when == "start":
            for _, g in ds.named_gates(self.model):
                if isinstance(g, TopKGate):
                    g.set_k_(k=3)
            ds.set_budget_(self.model, 0.4)

    monkeypatch.setattr(Trainer, "_calibrate", calibrate)


def test_resume_restores_topk_k_and_token_keep_changed_during_the_run(tmp_path, monkeypatch):
    from dynsparse.recipes.train import Trainer, state_digest

    _knob_at_start(monkeypatch)
    recipe = parse_recipe(yaml.safe_load(RECIPE))
    straight = Trainer(recipe, tmp_path / "a", progress=False).run()
    expected = gate_settings(straight)
    assert {s.get("k") for s in expected.values()} >= {3} and {s.get("keep") for s in expected.values()} >= {0.4}

    class Crash(Exception):
        pass

    original, saves = Trainer._save, []

    def crash_after_first(self, *args):
        original(self, *args)
        saves.append(1)
        if len(saves) == 1:
            raise Crash

    monkeypatch.setattr(Trainer, "_save", crash_after_first)
    with pytest.raises(Crash):
        Trainer(recipe, tmp_path / "b", progress=False).run()
    monkeypatch.setattr(Trainer, "_save", original)
    resumed = Trainer(recipe, tmp_path / "b", resume=True, progress=False).run()
    assert gate_settings(resumed) == expected, "the resumed run went back to the recipe's k / keep"
    assert state_digest(resumed) == state_digest(straight)


def _ckpt(model, settings):
    return {"model": model.state_dict(), "rng": torch.get_rng_state(), "meta": {"gates": "{}", "settings": settings}}


def test_restore_applies_settings_and_refuses_one_without_a_gate_to_take_it():
    import timm

    def gated():
        m = timm.create_model("test_vit", pretrained=False, img_size=32)
        return ds.sparsify_(m, {"neurons": {"gate": "topk", "include": "blocks.0.*"}, "tokens": {"blocks": [1]}})

    src = gated()
    topk = next(f for f, g in ds.named_gates(src) if isinstance(g, TopKGate))
    src.get_submodule(topk).set_k_(k=2)
    ds.set_budget_(src, 0.3)
    dst = restore_(gated(), None, _ckpt(src, json.dumps(gate_settings(src))), torch.device("cpu"))
    assert gate_settings(dst) == gate_settings(src) and dst.get_submodule(topk).k == 2
    old = gated()  # a checkpoint written before settings were recorded loads as before
    ckpt = _ckpt(src, "")
    del ckpt["meta"]["settings"]
    assert gate_settings(restore_(old, None, ckpt, torch.device("cpu"))) == gate_settings(gated())
    for bad, match in (
        ({topk: {"keep": 0.5}}, "no gate there that takes it"),
        ({"blocks.9.gate": {"k": 1}}, "no gate there"),
        ({topk: {"k": 10_000}}, "k must be an int"),
    ):
        with pytest.raises(RecipeError, match=match):
            restore_(gated(), None, _ckpt(src, json.dumps(bad)), torch.device("cpu"))
