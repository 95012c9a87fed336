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
