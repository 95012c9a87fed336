"""Tests of ``make_gate`` specs: names, mappings, callables, keyword arguments and the errors they raise."""

from __future__ import annotations

import functools

import pytest
import torch
from _gate_helpers import LinearTopKGate
from torch import nn

from dynsparse.errors import ConfigError, GateError
from dynsparse.gates import FixedGate, Gate, SigmoidGate, TopKGate, make_gate

# --------------------------------------------------------------------------------------------------------------
# make_gate specs
# --------------------------------------------------------------------------------------------------------------


def test_make_gate_mapping_spec() -> None:
    spec = {"gate": "sigmoid", "temperature": 2.0}
    gate = make_gate(spec, 4, dtype=torch.float64)
    assert isinstance(gate, SigmoidGate)
    assert gate.temperature == 2.0
    assert gate.logits.dtype == torch.float64
    assert spec == {"gate": "sigmoid", "temperature": 2.0}, "make_gate must not mutate the spec"


def test_make_gate_callable_factory() -> None:
    calls = []

    def factory(num_units: int, device=None, dtype=None) -> Gate:
        calls.append((num_units, device, dtype))
        return FixedGate(num_units, mask=torch.arange(num_units) % 2 == 0, device=device, dtype=dtype)

    gate = make_gate(factory, 4, dtype=torch.float64)
    assert calls == [(4, None, torch.float64)]
    assert gate.keep_mask().tolist() == [True, False, True, False]
    partial = make_gate(functools.partial(SigmoidGate, temperature=3.0), 2)
    assert isinstance(partial, SigmoidGate) and partial.temperature == 3.0
    assert isinstance(make_gate(TopKGate, 3, k=1), TopKGate)


def test_make_gate_forwards_kwargs() -> None:
    assert make_gate("topk", 8, keep=0.25).k == 2
    assert make_gate("hard_concrete", 3, init_drop_rate=0.5).log_alpha.abs().max().item() == 0.0


def test_make_gate_bad_kwargs_name_the_gate() -> None:
    with pytest.raises(ConfigError, match="sigmoid") as info:
        make_gate({"gate": "sigmoid", "temprature": 2.0}, 4)
    assert "temprature" in str(info.value)
    with pytest.raises(ConfigError, match="topk"):
        make_gate("topk", 4, bogus=1)


def test_make_gate_mapping_without_gate_raises() -> None:
    with pytest.raises(ConfigError, match="gate"):
        make_gate({"temperature": 2.0}, 4)


def test_make_gate_unknown_name_suggests() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'hard_concrete'"):
        make_gate("hard_concret", 4)
    with pytest.raises(ConfigError, match="Did you mean 'sigmoid'"):
        make_gate({"gate": "sigmod"}, 4)


def test_make_gate_bad_spec_types_raise() -> None:
    with pytest.raises(ConfigError):
        make_gate(3, 4)  # type: ignore[arg-type]
    with pytest.raises(GateError, match="not a Gate"):
        make_gate(lambda n, device=None, dtype=None: nn.Identity(), 4)
    with pytest.raises(GateError, match="input-dependent"):
        make_gate(lambda n, device=None, dtype=None: LinearTopKGate(3, n), 4)


def test_make_gate_conflicting_kwargs_raise_config_error() -> None:
    """A mapping spec and a keyword both setting ``temperature``: a DynsparseError, not a raw TypeError."""
    with pytest.raises(ConfigError, match="temperature"):
        make_gate({"gate": "sigmoid", "temperature": 2.0}, 4, temperature=3.0)
