"""The contract every registered gate meets, parametrized over the gate registry."""

from __future__ import annotations

import pytest
import torch
from _gate_helpers import assert_close
from torch import Tensor, nn

from dynsparse.errors import ConfigError, DynsparseError, GateError
from dynsparse.gates import GATES, Gate, make_gate

GATE_NAMES = GATES.names()
N = 6


# --------------------------------------------------------------------------------------------------------------
# Contract, parametrized over every registered gate
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=GATE_NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_registry_holds_the_builtin_gates() -> None:
    assert {"hard_concrete", "sigmoid", "topk", "fixed"} <= set(GATE_NAMES)


def test_make_gate_builds_a_gate_of_num_units(name: str) -> None:
    gate = make_gate(name, N)
    assert isinstance(gate, Gate)
    assert gate.num_units == N
    factory = GATES.get(name)
    if isinstance(factory, type):
        assert type(gate) is factory


def test_default_gate_is_open(name: str) -> None:
    gate = make_gate(name, N).eval()
    assert_close(gate(), torch.ones(N), what=f"{name} eval output")
    assert_close(gate.eval_values(), torch.ones(N), what=f"{name} eval_values")
    assert gate.keep_mask().all(), f"{name}: default keep_mask {gate.keep_mask()}"


def test_forward_shape_and_range(name: str) -> None:
    gate = make_gate(name, N)
    for training in (True, False):
        gate.train(training)
        out = gate()
        assert out.shape == (N,), f"{name} training={training}: shape {tuple(out.shape)}"
        assert out.is_floating_point()
        assert torch.isfinite(out).all()
        lo, hi = type(gate).train_range if training else (0.0, 1.0)
        assert ((out >= lo) & (out <= hi)).all(), f"{name} training={training}: {out}"


def test_eval_is_deterministic(name: str) -> None:
    torch.manual_seed(0)
    gate = make_gate(name, N).eval()
    _perturb_(gate)
    first, second = gate(), gate()
    assert torch.equal(first, second), f"{name}: {first} != {second}"
    assert torch.equal(first, gate.eval_values())


def test_keep_mask_is_bool_of_num_units(name: str) -> None:
    gate = make_gate(name, N)
    _perturb_(gate)
    for training in (True, False):
        mask = gate.train(training).keep_mask()
        assert mask.dtype == torch.bool
        assert mask.shape == (N,)
        assert not mask.requires_grad
    # keep_mask does not depend on the mode.
    assert torch.equal(gate.train().keep_mask(), gate.eval().keep_mask())


def test_penalty_is_finite_scalar(name: str) -> None:
    gate = make_gate(name, N)
    for training in (True, False):
        p = gate.train(training).penalty()
        assert isinstance(p, Tensor)
        assert p.dim() == 0, f"{name}: penalty shape {tuple(p.shape)}"
        assert torch.isfinite(p), f"{name}: penalty {p}"
        assert p >= 0


def test_expected_keep_is_a_probability_per_unit(name: str) -> None:
    gate = make_gate(name, N)
    q = gate.expected_keep()
    assert q.shape == (N,)
    assert q.is_floating_point()
    assert ((q >= 0) & (q <= 1)).all(), f"{name}: expected_keep {q}"


def test_every_parameter_gets_finite_gradient(name: str) -> None:
    torch.manual_seed(0)
    gate = make_gate(name, N).train()
    params = dict(gate.named_parameters())
    if not params:
        pytest.skip(f"{name} has no parameters")
    (gate().sum() + gate.penalty()).backward()
    for pname, p in params.items():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert p.grad.shape == p.shape
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} gradient {p.grad}"


def test_dtype_is_kept(name: str) -> None:
    gate = make_gate(name, N, dtype=torch.float64)
    for pname, t in [*gate.named_parameters(), *gate.named_buffers()]:
        if t.is_floating_point():
            assert t.dtype == torch.float64, f"{name}.{pname} is {t.dtype}"
    for training in (True, False):
        gate.train(training)
        assert gate().dtype == torch.float64, f"{name} training={training}"
        assert gate.penalty().dtype == torch.float64
        assert gate.expected_keep().dtype == torch.float64
    assert gate.eval_values().dtype == torch.float64


def test_device_is_kept(name: str) -> None:
    gate = make_gate(name, N, device="meta")
    tensors = [*gate.parameters(), *gate.buffers()]
    assert all(t.device.type == "meta" for t in tensors), f"{name}: {[t.device for t in tensors]}"


def test_state_dict_round_trip(name: str) -> None:
    torch.manual_seed(0)
    src = make_gate(name, N)
    _perturb_(src)
    dst = make_gate(name, N)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.eval().eval_values(), src.eval().eval_values())
    assert torch.equal(dst.keep_mask(), src.keep_mask())
    assert torch.equal(dst.penalty(), src.penalty())


def test_extra_repr_mentions_num_units(name: str) -> None:
    gate = make_gate(name, N)
    assert f"num_units={N}" in gate.extra_repr()
    assert f"num_units={N}" in repr(gate)


@pytest.mark.parametrize("num_units", [0, -1, 2.5, True, None, "4"])
def test_bad_num_units_raise(name: str, num_units: object) -> None:
    with pytest.raises((GateError, ConfigError)):
        make_gate(name, num_units)  # type: ignore[arg-type]


def _perturb_(gate: nn.Module) -> None:
    """Give a gate non-default state: random parameters, and a random mask for mask buffers."""
    with torch.no_grad():
        for p in gate.parameters():
            p.copy_(torch.randn_like(p) * 3)
        for bname, b in gate.named_buffers():
            if b.dtype == torch.bool:
                b.copy_(torch.rand(b.shape) < 0.5)
            elif b.is_floating_point():
                b.copy_(torch.rand_like(b))
            else:  # pragma: no cover - no such buffer today
                raise AssertionError(f"unexpected buffer {bname}")


def test_errors_are_dynsparse_errors() -> None:
    assert issubclass(GateError, DynsparseError) and issubclass(GateError, ValueError)
    assert issubclass(ConfigError, DynsparseError) and issubclass(ConfigError, ValueError)
