"""Tests of the name -> factory registry and of registering a custom gate."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dynsparse.errors import ConfigError
from dynsparse.gates import GATES, Gate, SigmoidGate, make_gate, register_gate
from dynsparse.registry import Registry, suggest


class Alpha:
    pass


class Beta:
    pass


@pytest.fixture
def reg() -> Registry:
    r: Registry = Registry("widget")
    r.register("alpha")(Alpha)
    r.register("beta")(Beta)
    return r


def test_register_and_get(reg: Registry) -> None:
    assert reg.get("alpha") is Alpha
    assert reg.get("beta") is Beta
    assert reg.names() == ["alpha", "beta"]
    assert list(reg) == ["alpha", "beta"]
    assert len(reg) == 2
    assert "alpha" in reg and "gamma" not in reg and 3 not in reg


def test_register_is_a_decorator_returning_the_object() -> None:
    r: Registry = Registry("widget")

    @r.register("thing")
    class Thing:
        pass

    assert r.get("thing") is Thing

    def factory() -> int:
        return 1

    assert r.register("factory")(factory) is factory


def test_names_are_sorted() -> None:
    r: Registry = Registry("widget")
    for name in ["zeta", "alpha", "mu"]:
        r.register(name)(object())
    assert r.names() == ["alpha", "mu", "zeta"]


def test_duplicate_name_raises_and_keeps_the_first(reg: Registry) -> None:
    with pytest.raises(ConfigError, match="widget 'alpha' is already registered"):
        reg.register("alpha")(Beta)
    assert reg.get("alpha") is Alpha
    assert len(reg) == 2
    with pytest.raises(ConfigError):
        reg.register("alpha")(Alpha)  # even the same object


def test_unknown_name_lists_close_matches(reg: Registry) -> None:
    with pytest.raises(ConfigError, match="unknown widget 'alpah'") as info:
        reg.get("alpah")
    msg = str(info.value)
    assert "Did you mean 'alpha'?" in msg
    assert "Known: alpha, beta" in msg


def test_unknown_name_without_close_match(reg: Registry) -> None:
    with pytest.raises(ConfigError) as info:
        reg.get("zzzzzz")
    assert "Did you mean" not in str(info.value)
    assert "Known: alpha, beta" in str(info.value)


@pytest.mark.parametrize("name", [3, None, ("alpha",)])
def test_non_string_name_raises(reg: Registry, name: object) -> None:
    with pytest.raises(ConfigError, match="widget name must be a string"):
        reg.get(name)  # type: ignore[arg-type]


def test_suggest() -> None:
    assert suggest("hard_concret", ["hard_concrete", "sigmoid"]) == " Did you mean 'hard_concrete'?"
    assert suggest("xyz", ["hard_concrete", "sigmoid"]) == ""
    assert suggest("topk", []) == ""
    many = suggest("gate", ["gate1", "gate2", "gate3", "gate4"])
    assert many.count("'gate") == 3  # at most three suggestions


def test_gates_registry_suggests_hard_concrete() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'hard_concrete'") as info:
        GATES.get("hard_concret")
    assert "unknown gate" in str(info.value)


def test_gates_registry_refuses_duplicate_builtin() -> None:
    with pytest.raises(ConfigError, match="gate 'sigmoid' is already registered"):
        register_gate("sigmoid")(Gate)
    assert GATES.get("sigmoid") is SigmoidGate


class ScaleGate(Gate):
    """A custom gate: a learned per-unit scale, kept when positive (open at init)."""

    def __init__(self, num_units: int, init: float = 1.0, device=None, dtype=None) -> None:
        super().__init__(num_units)
        self.scale = nn.Parameter(torch.full((num_units,), float(init), device=device, dtype=dtype))

    def forward(self) -> Tensor:
        return torch.clamp(self.scale, 0.0, 1.0)

    def eval_values(self) -> Tensor:
        return torch.clamp(self.scale, 0.0, 1.0)

    def penalty(self) -> Tensor:
        return self.scale.abs().sum()


@pytest.fixture
def private_gates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register into GATES without leaking the registration into other tests."""
    monkeypatch.setattr(GATES, "_items", dict(GATES._items))


def test_register_gate_custom_subclass(private_gates: None) -> None:
    name = "test_registry_scale_gate"
    assert register_gate(name)(ScaleGate) is ScaleGate
    assert name in GATES.names()
    gate = make_gate(name, 4, dtype=torch.float64)
    assert isinstance(gate, ScaleGate)
    assert gate.scale.dtype == torch.float64
    assert gate.eval().keep_mask().tolist() == [True] * 4
    assert make_gate({"gate": name, "init": -1.0}, 2).keep_mask().tolist() == [False, False]
    with pytest.raises(ConfigError, match="already registered"):
        register_gate(name)(ScaleGate)
    with pytest.raises(ConfigError, match=f"Did you mean '{name}'"):
        make_gate(name[:-1], 4)


def test_private_registration_does_not_leak() -> None:
    assert "test_registry_scale_gate" not in GATES


def test_suggest_ignores_case() -> None:
    # 'MNIST' for 'mnist': difflib compares case-sensitively and found nothing close
    assert suggest("MNIST", ["mnist", "digits"]) == " Did you mean 'mnist'?"
    assert suggest("Hard_Concrete", ["hard_concrete", "sigmoid"]) == " Did you mean 'hard_concrete'?"
    assert suggest("Gate", ["gate", "Gate2"]) == " Did you mean 'gate', 'Gate2'?"
