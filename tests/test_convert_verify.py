"""``verify``: non-finite outputs count as a difference unless both models give the same non-finite value."""

from __future__ import annotations

import math

import pytest
import torch
from _device_helpers import input_devices
from torch import nn

import dynsparse as ds

NAN, INF = float("nan"), float("inf")


class Const(nn.Module):
    """Returns a fixed tensor, whatever the input."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.register_buffer("out", torch.tensor(values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out.clone()


@pytest.mark.parametrize(
    ("ref", "cand"),
    [
        ([1.0, 2.0], [NAN, 2.0]),  # the candidate is broken
        ([NAN, 2.0], [1.0, 2.0]),  # the reference is broken
        ([NAN, 2.0], [1.0, NAN]),  # NaN in both, in different places
        ([INF, 2.0], [-INF, 2.0]),
        ([INF, 2.0], [1.0, 2.0]),
        ([1.0, 2.0], [1.0, INF]),
    ],
)
def test_nonfinite_mismatch_fails_and_reports_nan(ref, cand):
    with pytest.raises(ds.DynsparseError, match=r"max-abs difference nan .*NaN or inf"):
        ds.verify(Const(ref), Const(cand), torch.zeros(1))


@pytest.mark.parametrize(("ref", "cand"), [([NAN, 2.0], [NAN, 2.0]), ([INF, -INF, 1.0], [INF, -INF, 1.0 + 1e-7])])
def test_same_nonfinite_values_pass(ref, cand):
    diff = ds.verify(Const(ref), Const(cand), torch.zeros(1))
    assert math.isfinite(diff) and diff < 1e-6


def test_nan_weight_in_a_linear_fails():
    torch.manual_seed(0)
    ref, bad = nn.Linear(4, 3), nn.Linear(4, 3)
    with torch.no_grad():
        bad.load_state_dict(ref.state_dict())
        bad.weight[0, 0] = NAN
    with pytest.raises(ds.DynsparseError, match="verify: outputs differ"):
        ds.verify(ref, bad, torch.randn(2, 4))


def test_finite_difference_still_measured():
    with pytest.raises(ds.DynsparseError, match=r"max-abs difference 0\.5 .*beyond the tolerance"):
        ds.verify(Const([1.0, 2.0]), Const([1.5, 2.0]), torch.zeros(1))
    assert ds.verify(Const([1.0, 2.0]), Const([1.0, 2.0]), torch.zeros(1)) == 0.0


@pytest.mark.parametrize("tol", [NAN, INF, -1.0])
@pytest.mark.parametrize("name", ["atol", "rtol"])
def test_tolerances_must_be_finite_and_not_negative(name, tol):
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)  # different weights: a NaN tolerance used to let them pass
    with pytest.raises(ds.ConfigError, match=f"verify: {name} must be a finite number >= 0"):
        ds.verify(a, b, torch.randn(1, 2), **{name: tol})


def test_inputs_go_to_each_models_device():
    # the meta device stands in for a GPU: a meta model refuses CPU inputs the way a CUDA model does
    torch.manual_seed(0)
    reference = nn.Linear(4, 3)
    candidate = nn.Linear(4, 3).to("meta")
    x = torch.randn(2, 4)  # on the CPU, as a DataLoader yields it
    assert input_devices(candidate, lambda: ds.verify(reference, candidate, x)) == ["meta"]
    assert input_devices(candidate, lambda: ds.verify(candidate, reference, (x,))) == ["meta"]


class Wrapped(nn.Module):
    """Returns its output inside an object verify cannot read (a dataclass, a custom class)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> object:
        return type("Output", (), {"logits": self.inner(x)})()


def test_output_without_a_tensor_is_refused_not_passed():
    """Nothing to compare is no agreement: two different models once verified with difference 0."""
    ref, cand = Wrapped(Const([1.0, 2.0])), Wrapped(Const([5.0, 6.0]))
    with pytest.raises(ds.DynsparseError, match=r"verify: the reference's output \(Output\) holds no tensor"):
        ds.verify(ref, cand, torch.zeros(1))
