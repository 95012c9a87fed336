"""Tests of the input-dependent gate base, through a small linear top-k gate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _gate_helpers import LinearTopKGate

from dynsparse.errors import ConfigError, GateError
from dynsparse.gates import BlockRouter, CatsGate, Gate, TopKGate, make_gate
from dynsparse.gates.tokens import PredictorTokenGate

# --------------------------------------------------------------------------------------------------------------
# Input-dependent gate base
# --------------------------------------------------------------------------------------------------------------


def test_input_dependent_gate_forward_and_budget() -> None:
    torch.manual_seed(0)
    gate = LinearTopKGate(5, 8, keep=0.5)
    x = torch.randn(3, 5)
    out = gate(x)
    assert out.shape == (3, 8)
    assert out.sum(-1).tolist() == [4.0, 4.0, 4.0]
    out.sum().backward()
    assert gate.score.weight.grad is not None and torch.isfinite(gate.score.weight.grad).all()
    assert gate.set_budget_(0.25) is gate
    assert gate.keep == 0.25
    assert gate(x).sum(-1).tolist() == [2.0, 2.0, 2.0]
    assert not isinstance(gate, Gate)
    assert not hasattr(gate, "keep_mask")


@pytest.mark.parametrize("keep", [0, 0.0, -0.5, 1.5, float("nan"), "0.5", None])
def test_input_dependent_set_budget_validation(keep: object) -> None:
    gate = LinearTopKGate(2, 4, keep=0.5)
    with pytest.raises(GateError, match="LinearTopKGate"):
        gate.set_budget_(keep)  # type: ignore[arg-type]
    assert gate.keep == 0.5, "a failed set_budget_ must not change the budget"
    with pytest.raises(GateError):
        LinearTopKGate(2, 4, keep=keep)  # type: ignore[arg-type]


@pytest.mark.parametrize("keep", [np.float32(0.5), np.float16(0.5), np.float64(0.5), 0.5, np.int64(1)])
def test_keep_accepts_any_real_number(keep: object) -> None:
    """numpy scalars (``np.float32`` from an array, a YAML loader, a sweep) are fractions like plain floats."""
    gate = LinearTopKGate(2, 4, keep=keep)  # type: ignore[arg-type]
    assert gate.keep == float(keep) and type(gate.keep) is float
    gate.set_budget_(0.25)
    assert gate.set_budget_(keep).keep == float(keep) and type(gate.keep) is float  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "keep", [np.float32("nan"), np.float32("inf"), np.float32(-0.5), np.float32(1.5), np.float32(0), np.bool_(True)]
)
def test_keep_refuses_bad_numpy_scalars(keep: object) -> None:
    gate = LinearTopKGate(2, 4, keep=0.5)
    with pytest.raises(GateError, match="keep must be a fraction"):
        gate.set_budget_(keep)  # type: ignore[arg-type]
    assert gate.keep == 0.5


@pytest.mark.parametrize("num_units", [np.int64(4), np.int32(4), np.uint8(4)])
def test_num_units_accepts_numpy_ints(num_units: object) -> None:
    gate = LinearTopKGate(2, num_units)  # type: ignore[arg-type]
    assert gate.num_units == 4 and type(gate.num_units) is int
    static = make_gate("hard_concrete", num_units)  # type: ignore[arg-type]
    assert static.num_units == 4 and type(static.num_units) is int and static.keep_mask().shape == (4,)


@pytest.mark.parametrize("num_units", [np.int64(0), np.float32(4.0), np.bool_(True)])
def test_num_units_refuses_bad_numpy_scalars(num_units: object) -> None:
    with pytest.raises(GateError, match="num_units"):
        LinearTopKGate(2, num_units)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_units", [0, -1, 2.5, True])
def test_input_dependent_bad_num_units(num_units: object) -> None:
    with pytest.raises(GateError):
        LinearTopKGate(2, num_units)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "keep", "kept"),
    [(10, 1.0, 10), (10, 0.3, 3), (10, 0.34, 3), (10, 0.36, 4), (10, 0.01, 1), (3, 0.1, 1), (1, 0.5, 1), (7, 0.5, 4)],
)
def test_input_dependent_num_kept(n: int, keep: float, kept: int) -> None:
    assert LinearTopKGate(2, n, keep=keep).num_kept() == kept


def test_input_dependent_num_kept_rounds_like_topk_gate() -> None:
    """The same keep fraction keeps the same number of units in a dynamic and a static top-k gate (half up)."""
    cases = [(5, 0.5), (10, 0.25), (4, 0.625), (6, 0.75), (10, 0.45), (7, 0.5), (10, 0.3)]
    mismatches = [
        (n, keep, LinearTopKGate(2, n, keep=keep).num_kept(), TopKGate(n, keep=keep).k)
        for n, keep in cases
        if LinearTopKGate(2, n, keep=keep).num_kept() != TopKGate(n, keep=keep).k
    ]
    assert not mismatches, "(num_units, keep, InputDependentGate.num_kept(), TopKGate.k): " + repr(mismatches)


def test_input_dependent_penalty_and_repr() -> None:
    gate = LinearTopKGate(2, 4, keep=0.5)
    p = gate.penalty()
    assert p.dim() == 0 and p.item() == 0.0
    assert "num_units=4" in repr(gate) and "keep=0.5" in repr(gate)


# --------------------------------------------------------------------------------------------------------------
# State after load, bad arguments
# --------------------------------------------------------------------------------------------------------------


def test_cats_threshold_follows_keep_after_load() -> None:
    torch.manual_seed(0)
    saved = CatsGate(8, dim=4, keep=1.0)
    saved.start_calibration()
    saved.observe(torch.randn(200, 8))
    saved.finish_calibration()
    loaded = CatsGate(8, dim=4, keep=0.5)
    loaded.load_state_dict(saved.state_dict())
    assert float(loaded.threshold) == pytest.approx(loaded.threshold_at(0.5)), "threshold must follow this gate's keep"
    kept = loaded(torch.randn(4000, 8)).float().mean().item()
    assert abs(kept - 0.5) < 0.05, f"keep=0.5 after load keeps {kept:.3f}"


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: BlockRouter(8, tau=0.0), "tau"),
        (lambda: BlockRouter(8, tau=float("nan")), "tau"),
        (lambda: BlockRouter(8, weight=-1.0), "weight"),
        (lambda: BlockRouter(True), "dim"),
        (lambda: PredictorTokenGate(8, dim=8, tau=0.0), "tau"),
        (lambda: PredictorTokenGate(8, dim=8, weight=float("inf")), "weight"),
        (lambda: CatsGate(4, dim=2, max_samples=0), "max_samples"),
    ],
)
def test_input_dependent_gates_refuse_bad_arguments(build, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build()


def test_numpy_scalars_for_k_keep_and_gate_options():
    """Values computed with numpy (np.int64 counts, np.float32 fractions) are numbers, not errors."""
    import timm

    import dynsparse as ds

    g = TopKGate(8, k=np.int64(3))
    assert g.k == 3 and type(g.k) is int
    assert g.set_k_(keep=np.float32(0.5)).k == 4
    with pytest.raises(GateError, match="k must be an int"):
        TopKGate(8, k=np.bool_(True))
    spec = {"gate": "threshold", "blocks": [1], "temperature": np.float32(0.5), "momentum": np.float64(0.1)}
    ds.sparsify_(timm.create_model("test_vit"), {"tokens": spec})
    router = {"gate": "router", "blocks": [1], "keep": np.float32(0.5), "target": np.float32(0.5)}
    ds.sparsify_(timm.create_model("test_vit"), {"depth": router})
