"""Trainer checks: no silent zero-step epochs, a resumed run's log holds each epoch once, and ``--resume`` refuses a
checkpoint written by a recipe that trains differently."""

from __future__ import annotations

import json

import pytest
import yaml

from dynsparse.recipes import RecipeError, parse_recipe

TINY = """\
name: tiny
seed: 3
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, num_classes: 10, embed_dim: 16, depth: 1, num_heads: 2}
data: {dataset: digits, batch_size: 32, train_subset: 96}
stages:
  - {name: dense, epochs: 3, optimizer: {name: adamw, lr: 0.003}}
evaluate: {latency: false}
"""


def _recipe(**data):
    raw = yaml.safe_load(TINY)
    raw["data"].update(data)
    return parse_recipe(raw)


def _log(out) -> list[tuple[str, int]]:
    return [(r["stage"], r["epoch"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


def test_a_batch_larger_than_the_training_set_is_refused_before_training(tmp_path):
    from dynsparse.recipes.train import Trainer

    with pytest.raises(RecipeError, match=r"data\.batch_size: 500 is more than the 96 training images") as e:
        Trainer(_recipe(batch_size=500), tmp_path / "x", progress=False).run()
    assert "data.train_subset" in str(e.value) and "no optimizer step" in str(e.value)
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


def test_killed_while_checkpointing_resumes_with_each_epoch_logged_once(tmp_path, monkeypatch):
    """A kill while the 2nd checkpoint is written: the resumed run repeats epoch 2 and logs it once."""
    from dynsparse.recipes import train as train_mod
    from dynsparse.recipes.train import Trainer

    class Killed(Exception):
        pass

    real, calls = train_mod.save_checkpoint, []

    def dying(state, path):
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real(state, path)

    recipe = _recipe()
    monkeypatch.setattr(train_mod, "save_checkpoint", dying)
    with pytest.raises(Killed):
        Trainer(recipe, tmp_path, progress=False).run()
    monkeypatch.setattr(train_mod, "save_checkpoint", real)
    assert _log(tmp_path) == [("dense", 1)]  # the checkpoint first: no record of an epoch the checkpoint lacks
    Trainer(recipe, tmp_path, resume=True, progress=False).run()
    assert _log(tmp_path) == [("dense", 1), ("dense", 2), ("dense", 3)]


def test_resume_rewrites_the_log_from_the_checkpoint(tmp_path, monkeypatch):
    """A log with records past the checkpoint (one written by a kill after the log write) is cut back to it."""
    from dynsparse.recipes.train import Trainer

    recipe, real = _recipe(), Trainer._save

    def stop_after_first(self, *args):
        real(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        Trainer(recipe, tmp_path, progress=False).run()
    monkeypatch.setattr(Trainer, "_save", real)
    record = json.dumps({"stage": "dense", "stage_index": 0, "epoch": 2, "step": 6, "train_loss": 1.0})
    with open(tmp_path / "log.jsonl", "a") as fh:
        fh.write(record + "\n")
    Trainer(recipe, tmp_path, resume=True, progress=False).run()
    assert _log(tmp_path) == [("dense", 1), ("dense", 2), ("dense", 3)]
    assert 1.0 not in [r["train_loss"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())]


@pytest.mark.parametrize(
    ("overrides", "fields"),
    [
        (["seed=99"], "seed"),
        (["data.batch_size=8"], r"data\.batch_size"),
        (["model.kwargs.drop_rate=0.5"], r"model\.kwargs\.drop_rate"),
        (["stages[0].optimizer.lr=0.1"], r"stages\[0\]\.optimizer\.lr"),
        (["stages[0].epochs=2"], r"stages\[0\]\.epochs"),  # the stage had finished: its end actions ran
        (["seed=99", "stages[0].optimizer.lr=0.1"], r"seed, stages\[0\]\.optimizer\.lr"),
    ],
)
def test_image_resume_refuses_a_recipe_that_trains_differently(tmp_path, overrides, fields):
    from dynsparse.recipes import apply_overrides
    from dynsparse.recipes.train import Trainer

    raw = apply_overrides(yaml.safe_load(TINY), ["stages[0].epochs=1"])
    Trainer(parse_recipe(raw), tmp_path, progress=False).run()
    with pytest.raises(RecipeError, match=rf"checkpoint\.pt: written by a recipe that differs in {fields};"):
        Trainer(parse_recipe(apply_overrides(raw, overrides)), tmp_path, resume=True, progress=False).run()


def test_image_resume_accepts_more_epochs_more_stages_and_other_names(tmp_path, monkeypatch):
    from dynsparse.recipes.train import Trainer

    raw = yaml.safe_load(TINY)
    real = Trainer._save

    def stop_after_first(self, *args):
        real(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", stop_after_first)
    with pytest.raises(KeyboardInterrupt):  # stopped after epoch 1 of 3
        Trainer(parse_recipe(raw), tmp_path, progress=False).run()
    monkeypatch.setattr(Trainer, "_save", real)
    first = {**raw["stages"][0], "name": "warmup", "epochs": 2}  # a stage name is a label only
    more = {**raw, "name": "renamed", "device": "auto", "stages": [first, {"name": "more", "epochs": 1}]}
    more["data"] = {**raw["data"], "eval_batch_size": 7}  # sizes the test loader only
    Trainer(parse_recipe(more), tmp_path, resume=True, progress=False).run()
    assert _log(tmp_path) == [("dense", 1), ("warmup", 2), ("more", 1)]


def test_trim_log_keeps_each_step_once(tmp_path):
    """Text runs: records of a stage past the resumed checkpoint's step go; other stages stay."""
    from dynsparse.recipes.checkpoint import trim_log

    p = tmp_path / "log.jsonl"
    steps = [("gates", 1), ("gates", 2), ("gates", 3), ("finetune", 1)]
    p.write_text("".join(json.dumps({"stage": s, "step": n}) + "\n" for s, n in steps))
    trim_log(p, "gates", 2)
    assert [(r["stage"], r["step"]) for r in map(json.loads, p.read_text().splitlines())] == [
        ("gates", 1),
        ("gates", 2),
        ("finetune", 1),
    ]
    trim_log(p, "finetune", 0)
    assert [r["stage"] for r in map(json.loads, p.read_text().splitlines())] == ["gates", "gates"]
    trim_log(tmp_path / "missing.jsonl", "gates", 0)  # no log yet: nothing to do


def test_resume_without_a_checkpoint_says_it_starts_afresh(tmp_path, caplog):
    from dynsparse.recipes.train import Trainer

    raw = yaml.safe_load(TINY)
    with caplog.at_level("WARNING", logger="dynsparse.recipes.train"):
        Trainer(parse_recipe(raw), tmp_path, resume=True, progress=False).run()
    assert any("no checkpoint" in r.getMessage() and "afresh" in r.getMessage() for r in caplog.records)
