"""Pruning as a recipe stage: gradual (AGP, linear) and one-shot unstructured, structured importance pruning."""

from __future__ import annotations

import pytest
import yaml

from dynsparse.recipes import RecipeError, parse_recipe

MLP = """\
name: agp
seed: 1
model: {name: lenet_300_100, library: dynsparse, kwargs: {img_size: 8}}
data: {dataset: digits, batch_size: 32, train_subset: 320}
stages:
  - {name: dense, epochs: 1, optimizer: {lr: 0.003}}
  - name: prune
    epochs: 4
    optimizer: {lr: 0.001}
    prune: PRUNE
evaluate: {latency: false}
convert: {enabled: false}
"""


def _recipe(prune: str, text: str = MLP):
    return parse_recipe(yaml.safe_load(text.replace("PRUNE", prune)))


def _layer_sparsity(model) -> dict[str, float]:
    from dynsparse.prune import masks

    return {k: 1 - float(m.float().mean()) for k, m in masks(model).items()}


@pytest.mark.parametrize(
    ("prune", "match"),
    [
        ("{method: structured}", r"stages\[1\]\.prune\.dimensions: method 'structured' needs"),
        ("{method: unstructured}", r"stages\[1\]\.prune\.ratio: method 'unstructured' needs the sparsity"),
        ("{method: unstructured, ratio: 1.5}", r"prune\.ratio: must be a fraction"),
        ("{method: unstructured, ratio: 0.5, importance: snipp}", r"prune\.importance: 'snipp'.*Did you mean 'snip'"),
        ("{method: magnitude, ratio: 0.5, importance: snip}", r"use method 'unstructured'"),
        ("{method: structured, dimensions: {channels: 0.5}, schedule: agp}", r"prune\.schedule: gradual schedules"),
        ("{method: structured, dimensions: {channels: 1.0}}", r"prune\.dimensions\.channels: must be a fraction"),
        ("{method: bn_scale}", r"method 'bn_scale' needs a ratio or a threshold"),
        ("{method: unstructured, ratio: 0.5, schedule: agp, frequency: 0}", r"prune\.frequency: must be >= 1"),
        ("{method: unstructured, ratio: 0.5, schedule: cubic}", r"prune\.schedule.*'cubic' is not one of"),
        (
            "{method: unstructured, ratio: 0.5, schedule: agp, begin_epoch: 2, end_epoch: 9}",
            r"prune\.end_epoch: the schedule must run within the stage.*epochs 4",
        ),
    ],
)
def test_bad_prune_specs_name_the_field(prune, match):
    with pytest.raises(RecipeError, match=match):
        _recipe(prune)


def test_agp_stage_follows_the_cubic_schedule_and_masks_hold(tmp_path):
    """Sparsity per epoch follows AGP (layer scope: every layer exactly at the target); pruned weights stay zero."""
    from dynsparse.prune import agp, masks
    from dynsparse.recipes.train import Trainer

    r = _recipe("{method: unstructured, ratio: 0.8, schedule: agp, scope: layer, end_epoch: 3, frequency: 5}")
    t = Trainer(r, tmp_path, progress=False)
    model = t.run()
    spe = 320 // 32
    got = [rec["weight_sparsity"] for rec in t.state.history if rec["stage"] == "prune"]
    # the trainer prunes after each step; at the end of epoch e it has applied the target of step (e+1)*spe
    want = [agp((e + 1) * spe, 0.0, 0.8, 0, 3 * spe, 5) for e in range(4)]
    assert 0 < want[0] < want[1] < want[2] == want[3] == 0.8
    assert got == pytest.approx(want, abs=2e-3)
    assert got[-1] == pytest.approx(0.8, abs=1e-3)
    for name, s in _layer_sparsity(model).items():
        assert s == pytest.approx(0.8, abs=2e-3), name
    for name, m in masks(model).items():  # the raw weight, not only the masked one: the optimizer's state is reset
        w = model.get_submodule(name.rpartition(".")[0]).weight.detach()
        assert not w[~m].any(), f"{name}: the optimizer revived masked weights"


def test_gradual_stage_resumes_exactly(tmp_path, monkeypatch):
    from dynsparse.recipes.train import Trainer, state_digest

    r = _recipe("{method: unstructured, ratio: 0.7, schedule: linear, frequency: 3}")
    straight = Trainer(r, tmp_path / "a", progress=False).run()

    class Crash(Exception):
        pass

    original, saves = Trainer._save, []

    def crash(self, *args):
        original(self, *args)
        saves.append(1)
        if len(saves) == 3:  # dense epoch, then two epochs into the ramp
            raise Crash

    monkeypatch.setattr(Trainer, "_save", crash)
    with pytest.raises(Crash):
        Trainer(r, tmp_path / "b", progress=False).run()
    monkeypatch.setattr(Trainer, "_save", original)
    resumed = Trainer(r, tmp_path / "b", resume=True, progress=False).run()
    assert state_digest(resumed) == state_digest(straight)


@pytest.mark.parametrize("importance", ["snip", "synflow", "random", "taylor", "wanda"])
def test_one_shot_at_start_with_a_data_score(tmp_path, importance):
    """Pruning at initialization (``at: start``): exact global sparsity before training, kept through it."""
    from dynsparse.prune import sparsity
    from dynsparse.recipes.train import Trainer

    text = MLP.replace("  - {name: dense, epochs: 1, optimizer: {lr: 0.003}}\n", "").replace("epochs: 4", "epochs: 1")
    r = _recipe(f"{{method: unstructured, ratio: 0.9, importance: {importance}, at: start}}", text)
    t = Trainer(r, tmp_path, progress=False)
    model = t.run()
    assert sparsity(model).overall == pytest.approx(0.9, abs=1e-4)
    assert t.state.history[-1]["weight_sparsity"] == pytest.approx(0.9, abs=1e-4)


CNN = """\
name: structured
seed: 0
model:
  name: test_resnet
  kwargs: {num_classes: 10, in_chans: 1}
data: {dataset: digits, image_size: 16, batch_size: 32, train_subset: 128}
stages:
  - {name: dense, epochs: 1}
  - name: prune
    epochs: 1
    prune: PRUNE
evaluate: {latency: false}
"""


@pytest.mark.parametrize("importance", ["taylor", "{name: magnitude, p: 1}"])
def test_structured_stage_prunes_channels_and_converts(tmp_path, importance):
    """Structured importance pruning at the end of a stage: half the gated channels of each block closed, then a
    converted model with the same outputs (``convert`` verifies them) and fewer FLOPs."""
    from dynsparse.recipes.checkpoint import load_checkpoint
    from dynsparse.recipes.run import run_recipe

    prune = f"{{method: structured, dimensions: {{channels: 0.5}}, importance: {importance}, calibration_batches: 2}}"
    r = _recipe(prune, CNN)
    report = run_recipe(r, tmp_path, progress=False)
    assert report["flops"]["converted"] < 0.8 * report["flops"]["dense"]
    assert report["gated_test_acc"] == pytest.approx(report["converted_test_acc"], abs=1e-6)
    assert '"FixedGate"' in load_checkpoint(tmp_path / "checkpoint.pt")["meta"]["gates"]


def test_random_pruning_follows_the_recipe_seed():
    """``importance: random`` draws from the recipe's seed (and the stage): runs with other seeds prune other weights,
    the same seed the same ones (a random baseline over seeds has its variance)."""
    import torch

    from dynsparse.prune import masks
    from dynsparse.recipes.pruning import StagePruning
    from dynsparse.recipes.train import build_model

    r = _recipe("{method: unstructured, ratio: 0.5, importance: random, at: start}")

    def pruned(seed: int) -> dict[str, torch.Tensor]:
        model = build_model(r)
        x = torch.zeros(1, 1, 8, 8)
        StagePruning(model, r.stages[1].prune, epochs=1, steps_per_epoch=1, data=list, example=x, seed=seed).start_()
        return masks(model)

    a, b, c = pruned(1), pruned(1), pruned(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
