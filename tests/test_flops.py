"""count_flops / module_flops against hand counts, and CostModel's parameter count."""

from __future__ import annotations

import torch
from torch import nn

from dynsparse.flops import CostModel, count_flops, module_flops

torch.set_num_threads(1)


class _Attend(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _mha_flops(n: int, c: int, ff: int = 0) -> int:
    """in-proj (3c) + out-proj + q·k and attention·v, 2 per multiply-add; plus the two FFN linears."""
    return 2 * n * c * 3 * c + 2 * n * c * c + 2 * (2 * n * n * c) + 2 * (2 * n * c * ff)


def test_multihead_attention_counts_in_eval_mode():
    # in eval mode without grad nn.MultiheadAttention takes a fused fast path that the flop counter cannot see
    x = torch.randn(1, 16, 8)
    model = _Attend().eval()
    assert count_flops(model, x) == _mha_flops(16, 8)
    assert module_flops(model, x)["attn"] == _mha_flops(16, 8)
    assert torch.backends.mha.get_fastpath_enabled()  # the global switch is restored


def test_transformer_encoder_layer_counts_in_eval_mode():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True).eval()
    assert count_flops(layer, torch.randn(1, 16, 8)) == _mha_flops(16, 8, ff=16)


def test_grouped_strided_conv_and_shared_linear_match_hand_counts():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            t = self.conv(x).flatten(2).transpose(1, 2)  # (1, 16, 8)
            return self.fc(self.fc(t))

    flops = module_flops(Net(), torch.randn(1, 4, 8, 8))
    conv = 2 * (4 // 2 * 3 * 3) * 8 * (4 * 4)
    fc = 2 * 16 * 8 * 8 * 2  # called twice
    assert flops == {"": conv + fc, "conv": conv, "fc": fc}


class _GluMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(4, 16)
        self.up_proj = nn.Linear(4, 16)
        self.down_proj = nn.Linear(16, 4)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def test_params_cost_counts_layers_named_like_gates():
    # a Llama-style MLP's gate_proj (and a module whose name ends in "gate") are host layers, not gates
    model = nn.Sequential()
    model.add_module("mlp", _GluMlp())
    model.add_module("aggregate", nn.Linear(4, 4))
    cost = CostModel(model, kind="params")
    assert cost.total == sum(p.numel() for p in model.parameters())


def test_models_feeding_an_expanded_parameter_to_a_submodule_are_counted():
    """PiT / CaiT / attention pooling pass a class token or latent (an expanded parameter) into a submodule: the
    counter's module tracker failed under no_grad; the count must equal the same model with frozen parameters."""
    import timm

    from dynsparse.flops import count_flops

    m = timm.create_model("vit_small_patch16_224", global_pool="map", img_size=32, patch_size=8, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    n = count_flops(m, x)
    assert n > 0 and all(p.requires_grad for p in m.parameters())  # parameters as they were
    for p in m.parameters():
        p.requires_grad_(False)
    assert count_flops(m, x) == n
