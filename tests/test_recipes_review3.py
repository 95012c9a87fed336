"""Third review of image recipes and the trainer: errors that name the recipe field, no silent no-ops."""

from __future__ import annotations

import pytest
import yaml
from test_recipes import GOOD  # the smallest recipe that loads

from dynsparse.recipes import RecipeError, load_recipe, parse_recipe


@pytest.mark.parametrize(
    ("override", "match"),
    [
        # each failed only after the stage had trained, in a library function naming no recipe field
        (
            "stages[0].prune={method: structured, dimensions: {chanels: 0.5}}",
            r"prune\.dimensions\.chanels: .*'channels'",
        ),
        ("stages[0].prune={method: structured, dimensions: {tokens: 0.5}}", r"prune\.dimensions\.tokens: "),
        ("stages[0].prune={method: structured, dimensions: {heads: 0.5}, max_ratio: 1.5}", r"prune\.max_ratio: "),
        ("stages[0].prune={method: structured, dimensions: {heads: 0.5}, max_ratio: -0.1}", r"prune\.max_ratio: "),
        ("stages[0].prune={method: bn_scale, ratio: 0.5, min_keep: -1}", r"prune\.min_keep: must be >= 0"),
        ("stages[0].prune={method: bn_scale, threshold: -1}", r"prune\.threshold: must be >= 0"),
        ("stages[0].prune={method: group_lasso, threshold: -1}", r"prune\.threshold: must be >= 0"),
        ("stages[0].prune={method: bn_scale, ratio: 0.5, threshold: 0.1}", r"prune\.threshold: .*not both"),
        ("stages[0].prune={method: bn_scale, threshold: 0.1, scope: layer}", r"prune\.scope: .*threshold"),
        (
            "stages[0].prune={method: structured, dimensions: {heads: 0.5}, importance: {name: taylor, foo: 1}}",
            r"prune\.importance: .*foo",
        ),
        (
            "stages[0].prune={method: structured, dimensions: {heads: 0.5}, importance: {p: 2}}",
            r"prune\.importance: .*needs a name",
        ),
    ],
)
def test_bad_prune_values_are_refused_at_load_naming_the_field(tmp_path, override, match):
    p = tmp_path / "bad.yaml"
    p.write_text(GOOD)
    with pytest.raises(RecipeError, match=match) as e:
        load_recipe(p, [override])
    assert "bad.yaml" in str(e.value)


@pytest.mark.parametrize(
    "override",
    [
        "stages[0].prune={method: structured, dimensions: {heads: 0.5, layers: 0.25}, max_ratio: 0.5}",
        "stages[0].prune={method: structured, dimensions: {heads: 0.5}, importance: {name: magnitude, p: 2}}",
        "stages[0].prune={method: bn_scale, threshold: 0.0, min_keep: 0}",
        "stages[0].prune={method: group_lasso, threshold: 0.0}",
    ],
)
def test_good_prune_values_load(tmp_path, override):
    p = tmp_path / "ok.yaml"
    p.write_text(GOOD)
    load_recipe(p, [override])


TRAIN = """\
name: t
seed: 0
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, num_classes: 10, embed_dim: 16, depth: 2, num_heads: 2}
data: {dataset: digits, batch_size: 32, train_subset: 64}
stages:
  - {name: dense, epochs: 1}
  - STAGE
evaluate: {latency: false}
convert: {enabled: false}
"""


@pytest.mark.parametrize(
    ("stage", "match"),
    [
        # a regularizer with nothing to act on: `dynamic` was silently a zero term, the others named no field
        ("{name: s, epochs: 1, regularizers: [{name: dynamic}]}", r"stages\[1\]\.regularizers\[0\]: .*input-dependent"),
        ("{name: s, epochs: 1, regularizers: [{name: l0}]}", r"stages\[1\]\.regularizers\[0\]: .*HardConcreteGate"),
        ("{name: s, epochs: 1, regularizers: [{name: bn_l1}]}", r"stages\[1\]\.regularizers\[0\]: .*BatchNorm"),
        # a sparsify spec or a pruning the model cannot take fails when the stage starts or ends: name the field
        ("{name: s, epochs: 1, sparsify: {channels: {gate: fixed}}}", r"stages\[1\]\.sparsify: .*'channels'"),
        (
            "{name: s, epochs: 1, prune: {method: unstructured, ratio: 0.5, include: [nothing]}}",
            r"stages\[1\]\.prune: .*include=\['nothing'\]",
        ),
        ("{name: s, epochs: 1, prune: {method: structured, dimensions: {channels: 0.5}}}", r"stages\[1\]\.prune: "),
        ("{name: s, epochs: 0, prune: {method: bn_scale, ratio: 0.5}}", r"stages\[1\]\.prune: .*BatchNorm"),
    ],
)
def test_a_stage_the_model_cannot_take_names_its_field(tmp_path, stage, match):
    from dynsparse.recipes.train import Trainer

    recipe = parse_recipe(yaml.safe_load(TRAIN.replace("STAGE", stage)))
    with pytest.raises(RecipeError, match=match):
        Trainer(recipe, tmp_path, progress=False).run()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        # fewer logits than classes: an IndexError of cross_entropy at the first step
        ("num_classes: 5, in_chans: 1", r"model: .*5 logits.*digits.* 10 classes.*model\.kwargs\.num_classes"),
        # timm's default head of 1000 classes: trained and reported silently, with 990 classes that do not exist
        ("in_chans: 1", r"model: .*1000 logits.*10 classes"),
        # images of the wrong channels: a RuntimeError of the first convolution, naming no field
        ("num_classes: 10, in_chans: 3", r"model: cannot run on a \(1, 8, 8\) image of data\.dataset 'digits'"),
    ],
)
def test_a_model_that_does_not_fit_the_data_is_refused_before_training(tmp_path, kwargs, match):
    from dynsparse.recipes.train import Trainer

    text = TRAIN.replace("STAGE", "{name: s, epochs: 1}").replace("in_chans: 1, num_classes: 10", kwargs)
    with pytest.raises(RecipeError, match=match):
        Trainer(parse_recipe(yaml.safe_load(text)), tmp_path, progress=False).run()
    assert not (tmp_path / "checkpoint.pt").exists()


def test_report_plot_is_written_atomically(tmp_path, monkeypatch):
    """A failure while writing report.png (disk full, a kill) leaves the last good plot, not a truncated file."""
    from matplotlib.figure import Figure

    from dynsparse.recipes.run import _plot

    history = [{"stage": "dense", "stage_index": 0, "epoch": 1, "step": 4, "test_acc": 0.5}]
    path = tmp_path / "report.png"
    _plot(history, None, path, "t")
    good = path.read_bytes()

    def broken(self, fname, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        _plot(history, None, path, "t")
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]


@pytest.mark.parametrize(("threshold", "want"), [(None, 1e-5), (0.0, 0.0), (0.25, 0.25)])
def test_group_lasso_pruning_uses_the_threshold_given(monkeypatch, threshold, want):
    """``threshold: 0`` (only groups whose norm is exactly 0) was read as no threshold, the default 1e-5."""
    import torch
    from torch import nn

    from dynsparse.recipes.pruning import StagePruning
    from dynsparse.recipes.schema import PruneSpec
    from dynsparse.regularizers.group_lasso import GroupLasso

    class Seen(Exception):
        pass

    def keep_masks(self, threshold=1e-5, min_keep=1):
        raise Seen(threshold)

    monkeypatch.setattr(GroupLasso, "__init__", lambda self, model: None)
    monkeypatch.setattr(GroupLasso, "keep_masks", keep_masks)
    spec = PruneSpec(method="group_lasso", threshold=threshold)
    pruning = StagePruning(nn.Linear(2, 2), spec, epochs=0, steps_per_epoch=1, data=list, example=torch.zeros(1, 2))
    with pytest.raises(Seen) as e:
        pruning.end_()
    assert e.value.args[0] == want


def test_a_binary_file_or_broken_yaml_is_one_recipe_error(tmp_path):
    """A model file given as the recipe, a --set value that is not YAML, and invalid YAML each give one RecipeError
    line naming the file or the item (they raised UnicodeDecodeError / yaml.ParserError tracebacks, or 7 lines)."""

    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x80\x81\xfe\xff" * 16)
    with pytest.raises(RecipeError, match=r"model\.safetensors: not a recipe \(not UTF-8 text"):
        load_recipe(binary)
    broken = tmp_path / "r.yaml"
    broken.write_text("name: x\ndata: {dataset: digits\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: not valid YAML \(line \d+, column \d+\): ") as e:
        load_recipe(broken)
    assert "\n" not in str(e.value)
    good = tmp_path / "g.yaml"
    good.write_text("name: x\nmodel: {name: test_vit}\ndata: {dataset: digits}\nstages: [{name: a, epochs: 1}]\n")
    with pytest.raises(RecipeError, match=r"--set 'data=\{': the value is not valid YAML"):
        load_recipe(good, ["data={"])
