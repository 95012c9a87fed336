"""Inputs a function runs through the model itself (calibration batches, FLOPs examples) go to the model's device.

A DataLoader yields CPU tensors; a model trained on a GPU would get them as they are and fail with a cross-device
error. The ``meta`` device stands in for the GPU: a meta model refuses CPU inputs the way a CUDA model does.
"""

from __future__ import annotations

import pytest
import timm
import torch
from _device_helpers import input_devices

import dynsparse as ds
from dynsparse.flops import CostModel, module_flops

torch.set_num_threads(1)


def _vit(spec=None):
    torch.manual_seed(0)
    m = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5).eval()
    return ds.sparsify_(m, spec) if spec else m


@pytest.mark.parametrize(
    "spec, calibrate",
    [
        ({"neurons": {"gate": "cats", "keep": 0.5}}, lambda m, b: ds.calibrate_neurons_(m, b)),
        ({"neurons": {"gate": "dejavu", "keep": 0.5, "rank": 8}}, lambda m, b: ds.train_predictors_(m, b)),
        ({"tokens": {"gate": "threshold", "blocks": [1]}}, lambda m, b: ds.calibrate_tokens_(m, b)),
    ],
    ids=["cats", "dejavu", "threshold-tokens"],
)
def test_calibration_moves_batches_to_the_model(spec, calibrate):
    model = _vit(spec).to("meta")
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    for batches in ([x], [(x, y)]):  # as a DataLoader yields them: on the CPU
        assert input_devices(model, lambda b=batches: calibrate(model, b))[0] == "meta"


def test_calibration_on_cpu_batches_equals_on_device_batches():
    # the move is the only change: on the CPU (model and batches) the result is the same as before
    a, b = _vit({"neurons": {"gate": "cats", "keep": 0.5}}), _vit({"neurons": {"gate": "cats", "keep": 0.5}})
    xs = [torch.randn(2, 3, 32, 32, dtype=torch.float64)]
    ds.calibrate_neurons_(a.double(), xs)
    ds.calibrate_neurons_(b.double(), [x.clone() for x in xs])
    for (fa, ga), (_, gb) in zip(ds.named_gates(a), ds.named_gates(b), strict=True):
        assert torch.equal(ga.quantiles, gb.quantiles), fa


def test_flops_example_input_moves_to_the_model():
    model = _vit({"neurons": "fixed", "heads": "fixed"})
    x = torch.randn(1, 3, 32, 32)
    on_cpu = module_flops(model, x)
    assert module_flops(model.to("meta"), x) == on_cpu  # counted on meta, the example given on the CPU
    assert module_flops(model, (x,)) == on_cpu


def test_cost_model_takes_a_cpu_example_for_a_device_model():
    model = _vit({"neurons": "hard_concrete"}).to("meta")
    cost = CostModel(model, torch.randn(1, 3, 32, 32))
    assert cost.total > 0
