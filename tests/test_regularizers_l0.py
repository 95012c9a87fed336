"""Tests of the expected-L0 regularizer against Louizos, Welling & Kingma (2018) and methods.md 2.17."""

from __future__ import annotations

import math

import pytest
import torch
from _regularizer_helpers import assert_close, tiny_vit

import dynsparse as ds
from dynsparse.errors import ConfigError
from dynsparse.regularizers import ExpectedL0

# Paper constants, written out here rather than imported.
HC_BETA, HC_GAMMA, HC_ZETA = 2.0 / 3.0, -0.1, 1.1


# ----------------------------------------------------------------------------------------------------------------
# Expected L0
# ----------------------------------------------------------------------------------------------------------------


def test_expected_l0_is_normalised_sum_of_gate_penalties() -> None:
    model = tiny_vit(gate="hard_concrete")
    gates = dict(ds.named_gates(model))
    torch.manual_seed(0)
    with torch.no_grad():
        for g in gates.values():
            g.log_alpha.normal_(0.0, 2.0)
    shift = HC_BETA * math.log(-HC_GAMMA / HC_ZETA)
    expected = sum(torch.sigmoid(g.log_alpha.detach() - shift).sum() for g in gates.values())
    units = sum(g.num_units for g in gates.values())
    reg = ExpectedL0(model, weight=0.1)
    assert reg.num_units() == units
    assert_close(reg(), 0.1 * expected / units, what="normalised")
    assert_close(ExpectedL0(model, weight=0.1, normalize=False)(), 0.1 * expected, what="count")
    reg().backward()
    assert all(g.log_alpha.grad is not None for g in gates.values())
    # A frozen gate drops out of the sum and the count.
    first = next(iter(gates))
    ds.fix_gates_(model, {first: torch.ones(gates[first].num_units, dtype=torch.bool)})
    rest = [g for k, g in gates.items() if k != first]
    assert reg.num_units() == units - gates[first].num_units
    assert_close(
        reg(),
        0.1 * sum(torch.sigmoid(g.log_alpha.detach() - shift).sum() for g in rest) / reg.num_units(),
        what="after fix",
    )
    assert "ExpectedL0" in repr(reg)


def test_expected_l0_errors() -> None:
    with pytest.raises(ConfigError, match="HardConcreteGate"):
        ExpectedL0(tiny_vit(gate="fixed"))
    with pytest.raises(ConfigError, match="weight"):
        ExpectedL0(tiny_vit(gate="hard_concrete"), weight=-1.0)
    model = tiny_vit(gate="hard_concrete")
    reg = ExpectedL0(model)
    ds.fix_gates_(model)
    assert reg().item() == 0.0


def test_expected_l0_sums_gates_of_mixed_dtypes() -> None:
    """A model whose gates differ in dtype (one block cast to half) still gets one penalty, in float32 at least."""
    model = tiny_vit(gate="hard_concrete")
    gates = list(dict(ds.named_gates(model)).values())
    gates[0].half()
    total = ExpectedL0(model)()
    assert total.dtype in (torch.float32, torch.float64) and torch.isfinite(total)
