"""Recipe schema: every shipped recipe loads; bad inputs give errors that name the field and line."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest

from dynsparse.recipes import RecipeError, apply_overrides, load_recipe, parse_recipe
from dynsparse.recipes.run import dense_baseline
from dynsparse.recipes.tasks import recipe_task

RECIPES = sorted(  # sentence-embedding recipes have their own schema: tests/test_recipe_text.py
    p
    for p in Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml")
    if recipe_task(p) == "image-classification"
)
BUILTIN = [Path(str(files("dynsparse.recipes").joinpath("demo.yaml")))]

GOOD = """\
name: t
model: {name: test_vit}
data:
  dataset: digits
  batch_size: 8
stages:
  - name: dense
    epochs: 1
  - name: gates
    epochs: 1
    sparsify: {heads: {gate: hard_concrete}}
    regularizers:
      - {name: budget, target: 0.5}
"""


@pytest.mark.parametrize("path", RECIPES + BUILTIN, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.stages and recipe.name


def test_good_recipe_and_defaults(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(GOOD)
    r = load_recipe(p)
    assert r.data.batch_size == 8 and r.stages[1].regularizers[0].target == 0.5
    assert r.stages[0].optimizer.name == "adamw"
    base = dense_baseline(r)
    assert [s.epochs for s in base.stages] == [1, 1] and base.stages[1].sparsify is None


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        (
            "  batch_size: 8",
            "  batch_sise: 8",
            r"unknown field 'data\.batch_sise' \(line 5\)\. Did you mean 'batch_size'",
        ),
        ("  batch_size: 8", "  batch_size: eight", r"data\.batch_size \(line 5\): expected an integer"),
        ("    epochs: 1\n  - name: gates", "    epochs: 1.5\n  - name: gates", r"stages\[0\]\.epochs \(line 8\)"),
        (
            "{name: budget, target: 0.5}",
            "{name: budgett, target: 0.5}",
            r"stages\[1\]\.regularizers\[0\]\.name.*'budget'",
        ),
        ("{name: budget, target: 0.5}", "{name: budget}", r"regularizers\[0\]\.target: the budget regularizer needs"),
        (
            "{heads: {gate: hard_concrete}}",
            "{head: {gate: hard_concrete}}",
            r"stages\[1\]\.sparsify: unknown dimension 'head'",
        ),
        (
            "  dataset: digits",
            "  dataset: digits\n  root: /no/such/dir",
            r"data\.root \(line 5\): directory '/no/such/dir'",
        ),
        ("model: {name: test_vit}\n", "", r"missing required field 'model'"),
    ],
)
def test_bad_recipes_name_the_field(tmp_path, old, new, match):
    assert old in GOOD
    p = tmp_path / "bad.yaml"
    p.write_text(GOOD.replace(old, new))
    with pytest.raises(RecipeError, match=match) as e:
        load_recipe(p)
    assert "bad.yaml" in str(e.value)


def test_data_root_starting_with_tilde_is_under_the_home_directory(tmp_path, monkeypatch):
    """``data.root: ~/imgs`` is checked where the data readers read it ($HOME/imgs) and kept as written."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "imgs").mkdir(parents=True)
    p = tmp_path / "r.yaml"
    p.write_text(GOOD.replace("  dataset: digits", "  dataset: image-folder\n  root: ~/imgs"))
    assert load_recipe(p).data.root == "~/imgs"
    p.write_text(GOOD.replace("  dataset: digits", "  dataset: image-folder\n  root: ~/absent"))
    absent = tmp_path / "home" / "absent"
    with pytest.raises(RecipeError, match=rf"data\.root \(line 5\): directory '~/absent' \({absent}\) does not exist"):
        load_recipe(p)


def test_not_yaml_and_missing_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides():
    data = {"data": {"batch_size": 8}, "stages": [{"name": "a", "epochs": 1}]}
    out = apply_overrides(data, ["data.batch_size=16", "stages[0].epochs=3"])
    assert out["data"]["batch_size"] == 16 and out["stages"][0]["epochs"] == 3
    assert data["data"]["batch_size"] == 8
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        apply_overrides(data, ["nope"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages[a].epochs=1", r"\[a\] is not a list index like \[0\]"),
        ("stages[0=1", r"\[0 is not a list index"),
        ("stages[5]=1", r"stages has 1 entries, so no \[5\]"),
        ("stages[5].epochs=1", r"stages has 1 entries, so no \[5\]"),
        ("data.batch_size.x=1", r"data.batch_size is a int, not a mapping with 'x'"),
        ("data[0]=1", r"data is not a list, so it has no \[0\]"),
        ("=1", "KEY=VALUE"),
    ],
)
def test_bad_override_paths_are_recipe_errors(override, message):
    data = {"data": {"batch_size": 8}, "stages": [{"name": "a", "epochs": 1}]}
    with pytest.raises(RecipeError, match=message):
        apply_overrides(data, [override])


def test_overrides_create_missing_mappings():
    data = {"model": {"name": "lenet_300_100"}, "stages": [{"name": "a", "epochs": 1}]}
    out = apply_overrides(data, ["model.kwargs.img_size=8", "evaluate.latency=false"])
    assert out["model"] == {"name": "lenet_300_100", "kwargs": {"img_size": 8}} and out["evaluate"] == {
        "latency": False
    }
    assert "kwargs" not in data["model"]


def test_parse_recipe_from_python_data():
    r = parse_recipe(
        {
            "name": "x",
            "model": {"name": "test_vit"},
            "data": {"dataset": "digits"},
            "stages": [{"name": "s", "epochs": 2}],
        }
    )
    assert r.stages[0].epochs == 2
    with pytest.raises(RecipeError, match="needs at least one stage"):
        parse_recipe({"name": "x", "model": {"name": "m"}, "data": {"dataset": "d"}, "stages": []})


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("data.train_subset=-300", r"data\.train_subset \(line 5\): must be >= 1, got -300"),
        ("data.train_subset=0", r"data\.train_subset \(line 5\): must be >= 1, got 0"),
        ("data.batch_size=0", r"data\.batch_size \(line 6\): must be >= 1"),
        ("data.eval_batch_size=-1", r"data\.eval_batch_size: must be >= 1"),
        ("evaluate={rounds: 0}", r"evaluate\.rounds: must be >= 1, got 0"),
        ("evaluate={threads: 0}", r"evaluate\.threads: must be >= 1, got 0"),
        ("evaluate={batch_sizes: [1, 0]}", r"evaluate\.batch_sizes\[1\]: must be >= 1"),
        ("stages[0].distill={temperature: 0}", r"stages\[0\]\.distill\.temperature: must be > 0, got 0"),
        ("stages[0].distill={weight: -1}", r"stages\[0\]\.distill\.weight: must be >= 0"),
        ("stages[0].optimizer={lr: -1}", r"stages\[0\]\.optimizer\.lr: must be > 0, got -1"),
        ("stages[0].optimizer={lr: 0}", r"stages\[0\]\.optimizer\.lr: must be > 0"),
        ("stages[0].optimizer={weight_decay: -0.1}", r"stages\[0\]\.optimizer\.weight_decay: must be >= 0"),
        ("stages[1].gate_optimizer={lr: 0}", r"stages\[1\]\.gate_optimizer\.lr: must be > 0"),
        ("stages[0].schedule={min_lr_ratio: 2}", r"stages\[0\]\.schedule\.min_lr_ratio: must be in \[0, 1\]"),
        ("stages[1].regularizers[0].lr=0", r"stages\[1\]\.regularizers\[0\]\.lr: must be > 0"),
        ("stages[0].epochs=-1", r"stages\[0\]\.epochs \(line 9\): must be >= 0"),
        # end actions with nothing to act on (the trainer skipped them silently)
        ("stages[0].enforce_budget=true", r"stages\[0\]\.enforce_budget: needs a budget regularizer in this stage"),
        ("stages[1].prune_vd=true", r"stages\[1\]\.prune_vd: needs sparse-VD layers"),
    ],
)
def test_out_of_range_values_name_the_field(tmp_path, override, match):
    """Values that would train on the wrong data, on nothing, to NaN, or crash after training: refused up front."""
    p = tmp_path / "bad.yaml"
    p.write_text(GOOD.replace("  dataset: digits\n", "  dataset: digits\n  train_subset: 64\n"))
    with pytest.raises(RecipeError, match=match) as e:
        load_recipe(p, [override])
    assert "bad.yaml" in str(e.value)


IGNORED = [
    ("stages[1].regularizers=[{name: l0, target: 0.3}]", r"regularizers\[0\]\.target.*regularizer 'l0' does not use"),
    ("stages[1].regularizers=[{name: l0, kind: params}]", r"regularizers\[0\]\.kind.*'l0' does not use"),
    ("stages[1].regularizers=[{name: budget, target: 0.5, weight: 2}]", r"\.weight.*'budget' does not use"),
    ("stages[1].regularizers=[{name: bn_l1, prox: true}]", r"\.prox.*'bn_l1' does not use"),
    (
        "stages[0].prune={method: unstructured, ratio: 0.5, schedule: agp, at: start}",
        r"stages\[0\]\.prune\.at: .*schedule 'agp'.* does not use this field",
    ),
    ("stages[0].prune={method: unstructured, ratio: 0.5, frequency: 5}", r"prune\.frequency: .*'one_shot'"),
    ("stages[0].prune={method: unstructured, ratio: 0.5, calibration_batches: 2}", r"calibration_batches: .*"),
    ("stages[0].prune={method: unstructured, ratio: 0.5, round_to: 8}", r"prune\.round_to: .*does not use"),
    ("stages[0].prune={method: bn_scale, ratio: 0.5, importance: taylor}", r"prune\.importance: method 'bn_scale'"),
    ("stages[0].prune={method: bn_scale, ratio: 0.5, include: [a]}", r"prune\.include: method 'bn_scale'"),
    ("stages[0].prune={method: group_lasso, ratio: 0.5}", r"prune\.ratio: method 'group_lasso' does not use"),
    ("stages[0].prune={method: structured, dimensions: {heads: 0.5}, ratio: 0.5}", r"prune\.ratio: .*'structured'"),
    ("stages[0].prune={method: structured, dimensions: {heads: 0.5}, min_keep: 2}", r"prune\.min_keep: .*"),
]


@pytest.mark.parametrize(("override", "match"), IGNORED)
def test_fields_the_method_ignores_are_refused(tmp_path, override, match):
    p = tmp_path / "bad.yaml"
    p.write_text(GOOD)
    with pytest.raises(RecipeError, match=match) as e:
        load_recipe(p, [override])
    assert "bad.yaml" in str(e.value) and "remove it" in str(e.value)


@pytest.mark.parametrize(
    "override",
    [
        "stages[1].regularizers=[{name: sparse_vd, weight: 0.5, kl_start: 1, kl_end: 2}]",
        "stages[1].enforce_budget=true",
        "stages[1].regularizers=[{name: group_lasso, weight: 0.1, prox: true}]",
        "stages[0].prune={method: unstructured, ratio: 0.5, importance: taylor, calibration_batches: 2, at: start}",
        "stages[0].prune={method: unstructured, ratio: 0.5, schedule: agp, frequency: 5, end_epoch: 1}",
        "stages[0].prune={method: bn_scale, threshold: 0.01, min_keep: 2, at: start}",
        "stages[0].prune={method: bn_scale, ratio: 0.3, min_keep: 2, scope: layer, at: start}",
        "stages[0].prune={method: structured, dimensions: {heads: 0.5}, round_to: 2, calibration_batches: 2}",
    ],
)
def test_fields_the_method_uses_are_accepted(tmp_path, override):
    p = tmp_path / "ok.yaml"
    p.write_text(GOOD)
    load_recipe(p, [override])


def test_output_dir_starting_with_tilde_is_under_the_home_directory(tmp_path, monkeypatch):
    """``output_dir: ~/runs/x`` writes under $HOME, not into a directory named '~' in the working directory."""
    from dynsparse.recipes.train import Trainer

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "r.yaml"
    p.write_text(GOOD.replace("name: t\n", "name: t\noutput_dir: ~/runs/x\n", 1))
    recipe = load_recipe(p)
    assert recipe.output_dir == "~/runs/x"
    assert Trainer(recipe, progress=False).out == tmp_path / "home" / "runs" / "x"


@pytest.mark.parametrize(
    "override, field",
    [
        ("stages[0].optimizer={lr: .nan}", r"stages\[0\]\.optimizer\.lr"),
        ("stages[1].regularizers[0].lr=.inf", r"stages\[1\]\.regularizers\[0\]\.lr"),
        ("convert={atol: .nan}", r"convert\.atol"),
    ],
)
def test_non_finite_numbers_name_the_field(tmp_path, override, field):
    """NaN passes every range check (all comparisons are false) and would train to NaN: refused as a type error."""
    p = tmp_path / "bad.yaml"
    p.write_text(GOOD)
    with pytest.raises(RecipeError, match=field + r".*expected a finite number") as e:
        load_recipe(p, [override])
    assert "bad.yaml" in str(e.value)


def test_a_field_given_twice_is_refused(tmp_path):
    """YAML keeps the last of two equal keys: a second ``stages:`` silently dropped the first list of stages."""
    p = tmp_path / "twice.yaml"
    p.write_text(GOOD + "stages:\n  - {name: other, epochs: 1}\n")
    with pytest.raises(RecipeError, match=r"twice\.yaml: stages \(line 14\): given twice \(first on line 6\)"):
        load_recipe(p)
    p.write_text(GOOD.replace("    epochs: 1\n", "    epochs: 1\n    epochs: 5\n", 1))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.epochs \(line 9\): given twice \(first on line 8\)"):
        load_recipe(p)


def test_load_recipe_takes_an_image_recipe_with_its_task_written_out(tmp_path):
    """``task: image-classification`` is the default written out (the CLI takes it): `load_recipe` takes it too, and
    sends a recipe of another task to `load_task_recipe`."""
    p = tmp_path / "task.yaml"
    p.write_text("task: image-classification\n" + GOOD)
    assert load_recipe(p).name == "t"
    p.write_text("task: sentence-embedding\n" + GOOD)
    with pytest.raises(RecipeError, match=r"task\.yaml: task \(line 1\): .*load_task_recipe"):
        load_recipe(p)


def test_a_number_yaml_reads_as_text_gets_a_hint(tmp_path):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: the error says how to write it."""
    p = tmp_path / "lr.yaml"
    p.write_text(GOOD.replace("    epochs: 1\n", "    epochs: 1\n    optimizer: {lr: 1e-3}\n", 1))
    with pytest.raises(
        RecipeError, match=r"stages\[0\]\.optimizer\.lr \(line 9\): expected a number, got '1e-3'.*1\.0e-0?3"
    ):
        load_recipe(p)
