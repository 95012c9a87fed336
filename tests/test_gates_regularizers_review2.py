"""Second review of the static gates and the regularizers: regressions of the bugs it found."""

from __future__ import annotations

import torch
from torch import nn

import dynsparse as ds
from dynsparse.gates import CatsGate, HardConcreteGate

torch.set_num_threads(1)


def test_input_dependent_gate_penalty_is_on_the_device_of_its_buffers() -> None:
    """A gate with buffers and no parameter (CATS) gave a CPU zero: ``ds.penalty`` of a model moved to another
    device then failed to stack it with the other gates' penalties."""
    model = nn.ModuleDict({"hc": HardConcreteGate(4), "cats": CatsGate(4, dim=8)}).to("meta")
    assert model["cats"].penalty().device.type == "meta"
    assert ds.penalty(model).device.type == "meta"
