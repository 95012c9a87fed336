"""Which parameters a recipe stage's gate optimizer trains: the gates', found by identity, not by name."""

from __future__ import annotations

import timm
import torch
from timm.layers import Mlp
from torch import nn

import dynsparse as ds
from dynsparse.recipes.optimizers import stage_optimizers
from dynsparse.recipes.schema import OptimizerSpec, StageSpec


class _HostWithAGateModule(nn.Module):
    """A host whose own child is called ``gate`` (as timm's gMLP ``mlp_channels.gate``): its weights are weights."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = Mlp(8, 16)
        self.gate = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.mlp(x))


def _groups(model: nn.Module) -> dict[str, set[int]]:
    st = StageSpec("s", 1, optimizer=OptimizerSpec(lr=1e-3), gate_optimizer=OptimizerSpec(lr=0.1))
    opts = stage_optimizers(model, st, [])
    return {k: {id(p) for g in o.param_groups for p in g["params"]} for k, o in opts.items()}


def test_a_host_module_named_gate_is_trained_as_weights():
    model = ds.sparsify_(_HostWithAGateModule(), {"neurons": "hard_concrete"})
    groups = _groups(model)
    host_gate = {id(p) for p in model.gate.parameters()}
    assert host_gate <= groups["weights"] and not host_gate & groups["gates"]
    assert groups["gates"] == {id(p) for _, g in ds.named_gates(model) for p in g.parameters()}
    dense = _HostWithAGateModule()  # no dynsparse gate at all: no gate optimizer
    assert set(_groups(dense)) == {"weights"}


def test_gate_optimizer_takes_the_gates_under_gate_children():
    model = timm.create_model("test_vit", pretrained=False)
    ds.sparsify_(model, {"heads": "hard_concrete", "neurons": "hard_concrete", "layers": "hard_concrete"})
    groups = _groups(model)
    expected = {id(p) for n, p in model.named_parameters() if ".gate." in f".{n}"}
    assert groups["gates"] == expected and len(expected) == 24
    assert not groups["gates"] & groups["weights"]


def test_without_a_gate_optimizer_static_gates_get_no_weight_decay():
    """AdamW's decay would pull log α towards 0 (keep probability about 0.83) whatever the data say."""
    model = timm.create_model("test_vit", pretrained=False)
    ds.sparsify_(model, {"heads": "hard_concrete", "tokens": {"gate": "predictor", "blocks": [1], "keep": 0.5}})
    st = StageSpec("s", 1, optimizer=OptimizerSpec(name="adamw", lr=1e-3, weight_decay=0.05))
    opt = stage_optimizers(model, st, [])["gates"]
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for fqn, gate in ds.named_gates(model):
        if ".gate." not in f".{fqn}.":
            continue
        want = 0.05 if isinstance(gate, ds.InputDependentGate) else 0.0
        assert {decay[id(p)] for p in gate.parameters()} == {want}, fqn
    with_spec = StageSpec("s", 1, optimizer=st.optimizer, gate_optimizer=OptimizerSpec(weight_decay=0.01))
    assert {g["weight_decay"] for g in stage_optimizers(model, with_spec, [])["gates"].param_groups} == {0.01}
