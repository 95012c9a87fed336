"""`count_flops` of a per-input neuron-gated MLP on one token counts the kept neurons' matmuls.

On one row the ``"auto"`` strategy runs compiled kernels; under ``FlopCounterMode`` they fall back to PyTorch ops
that the counter misreads (a dense producer sliced afterwards, an ``embedding_bag`` down projection it does not
count). The count must be that of the gathered matmuls, which is what the kernels compute.
"""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import Mlp, SwiGLU
from torch import nn

from dynsparse.flops import count_flops, mean_flops
from dynsparse.layers.neuron_gating import calibrate_neurons_, gate_neurons_, set_strategy_

C, H = 32, 128


def _gated(host: str, gate: str, keep: float) -> nn.Module:
    torch.manual_seed(0)
    dense = nn.Sequential(Mlp(C, H) if host == "mlp" else SwiGLU(C, H)).eval()
    dyn = gate_neurons_(copy.deepcopy(dense), gate, keep=keep, per="token")
    if gate == "cats":
        calibrate_neurons_(dyn, [torch.randn(64, 1, C, generator=torch.Generator().manual_seed(1))])
    return dyn.eval()


def _kept(dyn: nn.Module, token: torch.Tensor) -> int:
    """How many neurons the gate keeps for ``token`` (1, 1, C)."""
    mlp = dyn[0]
    with torch.no_grad():
        rows = token.reshape(1, C)
        cats = type(mlp.neurons).__name__ == "CatsGate"
        keep = mlp.neurons(mlp.gate_activation(rows)) if cats else mlp.neurons(token)
    return int(keep.sum())


@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_one_token_of_cats_on_mlp_counts_fc1_whole_and_fc2_for_the_kept_neurons(keep):
    dyn = _gated("mlp", "cats", keep)
    token = torch.randn(1, 1, C, generator=torch.Generator().manual_seed(2))
    k = _kept(dyn, token)
    assert 0 < k < H
    # used to be 2*C*H: fc1 only, the embedding_bag down projection uncounted
    assert count_flops(dyn, token) == 2 * C * H + 2 * k * C


@pytest.mark.parametrize("host", ["mlp", "swiglu"])
@pytest.mark.parametrize("gate", ["cats", "dejavu"])
@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_one_token_under_auto_counts_as_the_gathered_path(host, gate, keep):
    dyn = _gated(host, gate, keep)
    tokens = torch.randn(4, 1, 1, C, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        auto = [count_flops(dyn, t) for t in tokens]
        set_strategy_(dyn, "gather")
        gather = [count_flops(dyn, t) for t in tokens]
        set_strategy_(dyn, "auto")
    assert auto == gather
    assert dyn[0].strategy == "auto", "the strategy is restored"
    assert mean_flops(dyn, tokens.reshape(4, 1, C)) == sum(gather) / 4


def test_several_tokens_under_auto_are_counted_as_they_run():
    # more than one row: "auto" picks union or mask; the count follows the strategy that runs, not "gather"
    dyn = _gated("mlp", "dejavu", 0.5)
    x = torch.randn(4, 1, C, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        auto = count_flops(dyn, x)
        set_strategy_(dyn, "mask")
        mask = count_flops(dyn, x)
        set_strategy_(dyn, "union")
        union = count_flops(dyn, x)
    assert auto in (mask, union)
