"""Tests of the fixed gate."""

from __future__ import annotations

import pytest
import torch
from _gate_helpers import _kw_id

from dynsparse.errors import GateError
from dynsparse.gates import FixedGate

# --------------------------------------------------------------------------------------------------------------
# Fixed gate
# --------------------------------------------------------------------------------------------------------------


def test_fixed_gate_respects_mask_and_values() -> None:
    mask = torch.tensor([True, False, True, False])
    values = torch.tensor([0.5, 2.0, 3.0, 4.0])
    gate = FixedGate(4, mask=mask, values=values)
    expected = torch.tensor([0.5, 0.0, 3.0, 0.0])
    for training in (True, False):
        assert torch.equal(gate.train(training)(), expected)
    assert torch.equal(gate.keep_mask(), mask)
    gate.keep_mask()[0] = False
    assert gate.keep_mask()[0], "keep_mask must return a copy"
    assert list(gate.parameters()) == []
    assert gate.penalty().item() == 0.0
    assert "kept=2" in repr(gate)


def test_fixed_gate_copies_mask_and_values() -> None:
    mask, values = torch.tensor([True, False, True]), torch.tensor([0.5, 1.0, 1.0])
    gate = FixedGate(3, mask=mask, values=values)
    mask[0], values[0] = False, 0.25  # the caller reuses its tensors
    assert gate.keep_mask().tolist() == [True, False, True]
    assert gate.eval_values().tolist() == [0.5, 0.0, 1.0]
    with torch.no_grad():
        gate.mask[2] = False
    assert mask.tolist() == [False, False, True]


def test_fixed_gate_mask_only_and_list_mask() -> None:
    gate = FixedGate(3, mask=[True, False, True])
    assert gate().tolist() == [1.0, 0.0, 1.0]
    assert gate.expected_keep().tolist() == [1.0, 0.0, 1.0]


def test_fixed_gate_state_dict() -> None:
    gate = FixedGate(3, mask=torch.tensor([False, True, True]), values=torch.tensor([1.0, 0.5, 0.25]))
    sd = gate.state_dict()
    assert set(sd) == {"mask", "values"}
    fresh = FixedGate(3)
    fresh.load_state_dict(sd)
    assert fresh.keep_mask().tolist() == [False, True, True]
    assert fresh().tolist() == [0.0, 0.5, 0.25]


def test_fixed_gate_values_dtype() -> None:
    gate = FixedGate(2, values=torch.tensor([0.5, 1.0]), dtype=torch.float64)
    assert gate.values.dtype == torch.float64
    assert gate().dtype == torch.float64
    assert gate.mask.dtype == torch.bool


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask": torch.ones(4, dtype=torch.bool)},
        {"mask": torch.ones(3, 1, dtype=torch.bool)},
        {"mask": torch.tensor(True)},
        {"mask": torch.tensor([1, 0, 1])},
        {"mask": torch.tensor([1.0, 0.0, 1.0])},
        {"values": torch.ones(4)},
        {"values": torch.tensor([1, 2, 3])},
    ],
    ids=_kw_id,
)
def test_fixed_gate_bad_mask_or_values_raise(kwargs: dict) -> None:
    with pytest.raises(GateError, match="FixedGate"):
        FixedGate(3, **kwargs)


@pytest.mark.parametrize("given", ["mask", "values", "both"])
def test_fixed_gate_buffers_share_the_given_tensors_device(given: str) -> None:
    """With no ``device``, both buffers follow the tensors given (``meta`` stands in for a GPU): a mask on the GPU
    with the default values left on the CPU made every forward fail with a device mismatch."""
    mask = torch.tensor([True, False, True], device="meta") if given in ("mask", "both") else None
    values = torch.tensor([0.5, 1.0, 2.0], device="meta") if given in ("values", "both") else None
    gate = FixedGate(3, mask=mask, values=values)
    assert gate.mask.device.type == gate.values.device.type == "meta"
    assert gate().shape == (3,) and gate().device.type == "meta"
