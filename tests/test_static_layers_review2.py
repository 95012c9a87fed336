"""Second review pass of the static gated layers and the timm table: regressions found by differential tests."""

from __future__ import annotations

import torch
from timm.models.resnet import BasicBlock, ResNet

import dynsparse as ds

torch.set_num_threads(1)


def _tiny_resnet() -> ResNet:
    torch.manual_seed(0)
    return ResNet(BasicBlock, layers=(2, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8, num_classes=3)


def test_closed_resnet_block_without_downsample_trains_after_convert():
    # A closed BasicBlock without downsample becomes its act2; timm's is ReLU(inplace=True), which then rewrote the
    # previous block's ReLU output in place, so backward through the converted model raised.
    model = _tiny_resnet()
    ds.sparsify_(model, {"layers": "fixed"})
    ds.fix_gates_(model, {"layer1.1.drop_path": torch.tensor([False])})
    x = torch.randn(2, 3, 32, 32)
    c = ds.convert(model.eval(), verify_inputs=x)
    assert isinstance(c.layer1[1], torch.nn.ReLU)
    c.train()
    c(x).square().sum().backward()
    assert all(p.grad is not None for p in c.layer1[0].parameters())
