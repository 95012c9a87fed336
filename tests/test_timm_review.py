"""Review regressions for the timm table: families and variants that must be gated exactly or refused by name."""

from __future__ import annotations

import pytest
import timm
import torch

import dynsparse as ds

torch.set_num_threads(1)


def test_layers_refuses_timm_residual_blocks_with_no_known_layout():
    # CondConvResidual subclasses InvertedResidual but is not in the table; its skip blocks used to be passed over
    # in silence while the other blocks got layer gates.
    model = timm.create_model("efficientnet_cc_b0_4e", pretrained=False, num_classes=3).eval()
    with pytest.raises(ds.UnsupportedModuleError, match=r"'blocks\.\d\.\d' \(CondConvResidual\).*no residual branch"):
        ds.sparsify_(model, {"layers": "fixed"})
    plan = ds.plan_sparsify(model, {"layers": "fixed"})
    assert {s.module_type for s in plan.skipped} == {"CondConvResidual"}
    assert plan.targets  # the known blocks still get gates with on_unsupported="skip"


def test_layers_does_not_report_blocks_without_a_skip():
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3).eval()
    assert ds.plan_sparsify(model, {"layers": "fixed"}).skipped == []
