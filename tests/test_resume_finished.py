"""``--resume`` of a run whose last stage changed the structure at its end (or start) rebuilds that structure."""

from __future__ import annotations

import pytest
import yaml

CNN = """\
name: structured
seed: 0
model: {name: test_resnet, kwargs: {num_classes: 10, in_chans: 1}}
data: {dataset: digits, image_size: 16, batch_size: 32, train_subset: 128}
stages:
  - {name: dense, epochs: 1}
  - {name: prune, epochs: 2, prune: PRUNE}
evaluate: {latency: false}
"""
LENET = """\
name: svd
seed: 0
model: {name: lenet_300_100, library: dynsparse, kwargs: {img_size: 8}}
data: {dataset: digits, batch_size: 32, train_subset: 160}
stages:
  - {name: dense, epochs: 1}
  - {name: vd, epochs: 2, regularizers: [{name: sparse_vd, kl_end: 1}], prune_vd: true}
evaluate: {latency: false}
"""
STRUCTURED = "{method: structured, dimensions: {channels: 0.5}, importance: taylor, calibration_batches: 2, at: AT}"
CASES = {
    "structured-end": CNN.replace("PRUNE", STRUCTURED.replace("AT", "end")),
    "structured-start": CNN.replace("PRUNE", STRUCTURED.replace("AT", "start")),
    "prune-vd": LENET,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_after_the_end_and_in_the_middle(case, tmp_path, monkeypatch):
    from dynsparse.recipes import parse_recipe
    from dynsparse.recipes.run import run_recipe
    from dynsparse.recipes.train import Trainer, state_digest

    recipe = parse_recipe(yaml.safe_load(CASES[case]))
    first = run_recipe(recipe, tmp_path / "a", progress=False)
    again = run_recipe(recipe, tmp_path / "a", resume=True, progress=False)  # a finished run: nothing to train
    assert again["final_state_digest"] == first["final_state_digest"]
    assert again["converted_test_acc"] == first["converted_test_acc"]

    class Crash(Exception):
        pass

    original, saves = Trainer._save, []

    def crash_after_two(self, *args):
        original(self, *args)
        saves.append(1)
        if len(saves) == 2:  # after the first epoch of the pruning stage
            raise Crash

    monkeypatch.setattr(Trainer, "_save", crash_after_two)
    with pytest.raises(Crash):
        Trainer(recipe, tmp_path / "b", progress=False).run()
    monkeypatch.setattr(Trainer, "_save", original)
    resumed = Trainer(recipe, tmp_path / "b", resume=True, progress=False).run()
    assert state_digest(resumed) == first["final_state_digest"]
