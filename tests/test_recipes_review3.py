"""Third review of image recipes and the trainer: errors that name the recipe field, no silent no-ops."""

from __future__ import annotations

import pytest

from dynsparse.recipes import RecipeError, load_recipe

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
