"""SlicePlan validation and apply_plan range checks, with and without the optional ``units`` field."""

from __future__ import annotations

import pytest
import timm
import torch

import dynsparse as ds

torch.set_num_threads(1)
FQN = "blocks.0.mlp.norm"


def _plan(entry: dict, units: dict | None = None) -> ds.SlicePlan:
    data = {"format": "dynsparse.slice_plan", "version": 1, "entries": {FQN: entry}}
    if units is not None:
        data["units"] = units
    return ds.SlicePlan.from_dict(data)


def _host() -> torch.nn.Module:
    return timm.create_model("test_vit", pretrained=False)


@pytest.mark.parametrize("units", [None, {FQN: 192}], ids=["no-units", "units"])
def test_out_of_range_index_names_the_entry(units):
    with pytest.raises(ds.ConfigError, match=r"'blocks\.0\.mlp\.norm'\.neurons: index 999 out of range"):
        ds.apply_plan(_host(), _plan({"neurons": [0, 999]}, units))


@pytest.mark.parametrize("units", [None, {FQN: 192}], ids=["no-units", "units"])
def test_negative_index_is_refused_by_the_plan(units):
    with pytest.raises(ds.ConfigError, match=r"'blocks\.0\.mlp\.norm'\.neurons: negative index -1"):
        _plan({"neurons": [-1, 3]}, units)


def test_layers_entry_must_be_kept_or_removed():
    with pytest.raises(ds.ConfigError, match=r"'blocks\.0\.mlp\.norm'\.layers: must be \[0\] \(kept\) or \[\]"):
        _plan({"layers": [5]})


def test_plan_without_units_still_applies():
    m = ds.apply_plan(_host(), _plan({"neurons": [0, 5, 191]}))
    assert m.blocks[0].mlp.fc1.out_features == 3


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({}, r"field 'entries' must be an object, got None"),
        ({"entries": {}, "units": [192]}, r"field 'units' must be an object, got list"),
        ({"entries": {}, "producers": None}, r"field 'producers' must be an object, got None"),
        (
            {"entries": {FQN: {"neurons": [0]}}, "units": {FQN: "192"}},
            r"slice plan units 'blocks\.0\.mlp\.norm': .*positive int",
        ),
        (
            {"entries": {FQN: {"neurons": [0]}}, "units": {FQN: True}},
            r"slice plan units 'blocks\.0\.mlp\.norm': .*positive int",
        ),
        (
            {"entries": {FQN: {"neurons": [0]}}, "units": {FQN: 0}},
            r"slice plan units 'blocks\.0\.mlp\.norm': .*positive int",
        ),
    ],
)
def test_malformed_fields_are_named(data, match):
    """A damaged plan names the field (was: 'fields entries, units, dynamic and producers must be objects', or a
    raw TypeError for a unit count that is not a number)."""
    with pytest.raises(ds.ConfigError, match=r"^file\.json: " + match):
        ds.SlicePlan.from_dict({"format": "dynsparse.slice_plan", "version": 1, **data}, source="file.json")
