"""Tests of the sigmoid gate (straight-through)."""

from __future__ import annotations

import pytest
import torch
from _gate_helpers import _kw_id, assert_close

from dynsparse.errors import GateError
from dynsparse.gates import SigmoidGate

# --------------------------------------------------------------------------------------------------------------
# Sigmoid gate (straight-through)
# --------------------------------------------------------------------------------------------------------------


def test_sigmoid_train_forward_is_hard_decision() -> None:
    gate = SigmoidGate(6, temperature=2.0, dtype=torch.float64).train()
    logits = torch.tensor([-3.0, -0.2, 0.0, 0.2, 1.0, 5.0], dtype=torch.float64)
    with torch.no_grad():
        gate.logits.copy_(logits)
    hard = (torch.sigmoid(logits / 2.0) > 0.5).double()
    out = gate()
    assert torch.equal(out.detach(), hard), f"{out} != {hard}"
    assert out.requires_grad
    assert torch.equal(gate.eval()(), hard)
    assert gate.keep_mask().tolist() == [False, False, False, True, True, True]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_sigmoid_straight_through_gradient(temperature: float) -> None:
    gate = SigmoidGate(7, temperature=temperature, dtype=torch.float64).train()
    logits = torch.linspace(-3, 3, 7, dtype=torch.float64)
    with torch.no_grad():
        gate.logits.copy_(logits)
    w = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (gate() * w).sum().backward()
    s = torch.sigmoid(logits / temperature)
    assert_close(gate.logits.grad, w * s * (1 - s) / temperature, what="analytic sigmoid'(l/T)/T")
    h = 1e-6
    numeric = (torch.sigmoid((logits + h) / temperature) - torch.sigmoid((logits - h) / temperature)) / (2 * h)
    assert_close(gate.logits.grad, w * numeric, atol=1e-8, rtol=1e-6, what="finite differences")


def test_sigmoid_threshold_and_init_logit() -> None:
    assert SigmoidGate(3, init_logit=2.0, threshold=0.9).keep_mask().tolist() == [False] * 3  # sigmoid(2) = 0.88
    assert SigmoidGate(3, init_logit=2.0, threshold=0.85).keep_mask().tolist() == [True] * 3
    assert SigmoidGate(3, init_logit=-3.0).eval()().tolist() == [0.0] * 3


def test_sigmoid_penalty_is_sum_of_soft() -> None:
    gate = SigmoidGate(4, temperature=2.0, dtype=torch.float64)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([-2.0, 0.0, 1.0, 4.0]))
    soft = torch.sigmoid(gate.logits.detach() / 2.0)
    assert_close(gate.expected_keep(), soft, what="expected_keep")
    assert_close(gate.penalty(), soft.sum(), what="penalty")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"threshold": 0.0},
        {"threshold": 1.0},
        {"threshold": -0.5},
        {"threshold": 1.5},
        {"threshold": float("nan")},
        {"init_logit": float("nan")},
        {"init_logit": float("inf")},
    ],
    ids=_kw_id,
)
def test_sigmoid_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(GateError, match="SigmoidGate"):
        SigmoidGate(3, **kwargs)
