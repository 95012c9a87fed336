"""Every registered input-dependent module exports (`torch.export`, `torch.jit.trace`, ONNX) with its decisions
made per input in the graph: a capture records the masked path, equal to the skipping path in eager mode."""

from __future__ import annotations

import logging

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse.gates.channel_gates import CHANNEL_GATES
from dynsparse.gates.neuron_gates import NEURON_GATES
from dynsparse.gates.routers import ROUTERS
from dynsparse.gates.tokens import TOKEN_GATES
from dynsparse.layers import calibrate_tokens_
from dynsparse.layers.neuron_gating import calibrate_neurons_

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=5)

SPECS = {
    **{f"tokens/{g}": {"tokens": {"gate": g, "blocks": [1, 2], "keep": 0.5}} for g in TOKEN_GATES.names()},
    **{f"neurons/{g}": {"neurons": {"gate": g, "keep": 0.5}} for g in NEURON_GATES.names()},
    "neurons/dejavu-per-input": {"neurons": {"gate": "dejavu", "keep": 0.5, "per": "input"}},
    **{f"depth/{g}": {"depth": {"gate": g, "blocks": "all", "keep": 0.5}} for g in ROUTERS.names()},
    **{f"channels/{g}": {"channels": {"gate": g, "keep": 0.5}} for g in CHANNEL_GATES.names()},
}


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of 3 images; per-image brightness and contrast, so that pooled features differ per image."""
    g = torch.Generator().manual_seed(1)
    x, other = torch.randn(2, 3, 3, 32, 32, generator=g)
    scale, shift = (
        torch.tensor([0.5, 1.0, 3.0])[:, None, None, None],
        torch.tensor([-1.0, 0.0, 1.0])[:, None, None, None],
    )
    return x * scale + shift, other * scale.flip(0) - shift


def _model(case: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if case.startswith("channels/"):
        m = timm.create_model("resnet10t", pretrained=False, num_classes=5, channels=(16, 32, 64, 128))
    else:
        m = timm.create_model("vit_small_patch16_224", pretrained=False, **VIT)
    m = ds.sparsify_(m.eval(), SPECS[case]).eval()
    if case == "channels/fbs":  # decisions that differ between the inputs of a batch
        with torch.no_grad():
            for gate in m.modules():
                if isinstance(gate, CHANNEL_GATES.get("fbs")):
                    gate.fc.weight.normal_(0, 1.0)
                    gate.fc.bias.zero_()
    if case == "neurons/cats":
        calibrate_neurons_(m, [_inputs()[0]])
    if case == "tokens/threshold":  # keep 0.5: the calibrated threshold
        calibrate_tokens_(m, [_inputs()[0]])
    return m


def test_every_registered_dynamic_gate_is_covered():
    names = {c.split("/")[1] for c in SPECS}
    for reg in (TOKEN_GATES, NEURON_GATES, ROUTERS, CHANNEL_GATES):
        assert set(reg.names()) <= names


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("case", sorted(SPECS))
def test_export_and_trace_decide_per_input(case):
    m = _model(case)
    x, other = _inputs()
    with torch.no_grad():
        exported = torch.export.export(m, (x,)).module()
        traced = torch.jit.trace(m, (x,), check_trace=False)
        for y in (x, other):  # a capture must not bake in the example's decisions
            torch.testing.assert_close(exported(y), m(y), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(traced(y), m(y), rtol=1e-5, atol=1e-5)


def test_fbs_inputs_of_the_test_batch_decide_differently():
    """The FBS case above checks per-input decisions only if the batch's inputs disagree."""
    m = _model("channels/fbs")
    block = m.layer1[0]
    with torch.no_grad():
        idx, _ = block.gate["conv1"].decide(m.act1(m.bn1(m.conv1(_inputs()[1]))).mean((2, 3)))
    assert len(torch.unique(idx, dim=0)) > 1


@pytest.mark.parametrize(("case", "error"), [("neurons/cats", ds.GateError), ("tokens/threshold", ds.ConfigError)])
def test_uncalibrated_thresholds_are_refused_by_export(case, error):
    """Export cannot read a buffer's values: the gates remember whether they hold a calibration."""
    torch.manual_seed(0)
    m = ds.sparsify_(timm.create_model("vit_small_patch16_224", **VIT).eval(), SPECS[case]).eval()
    with pytest.raises(error, match="calibrat"):
        torch.export.export(m, (_inputs()[0],))


@pytest.mark.parametrize("case", ["neurons/cats", "tokens/threshold"])
def test_loaded_calibrated_gates_export(case, tmp_path):
    m = ds.convert(_model(case), static=False)
    arch = {"library": "timm", "name": "vit_small_patch16_224", "kwargs": VIT}
    loaded = ds.load(ds.save(m, tmp_path / "m.safetensors", arch=arch)).eval()
    x, other = _inputs()
    with torch.no_grad():
        exported = torch.export.export(loaded, (x,)).module()
        torch.testing.assert_close(exported(other), m(other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["channels/fbs", "neurons/dejavu", "tokens/threshold"])
def test_onnx_export_runs_in_onnxruntime(case, tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs the 'export' extra (onnx, onnxscript, onnxruntime)")
    ort = pytest.importorskip("onnxruntime", reason="needs the 'export' extra")
    m = ds.convert(_model(case), static=False)
    x, other = _inputs()
    path = tmp_path / "m.onnx"
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.onnx.export(m, (x,), str(path), dynamo=True, verbose=False)
    sess = ort.InferenceSession(str(path))
    (y,) = sess.run(None, {sess.get_inputs()[0].name: other.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), m(other).detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore")
def test_fbs_block_runs_under_torch_compile():
    """torch.compile traces the gathered convs with fake tensors: they must not call oneDNN directly then."""
    m = _model("channels/fbs")
    block = m.layer2[0]
    h = (
        torch.randn(3, 16, 16, 16, generator=torch.Generator().manual_seed(3))
        * torch.tensor([0.5, 1.0, 3.0])[:, None, None, None]
    )
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(block)(h), block(h), rtol=1e-5, atol=1e-5)
