import logging
import os
import tempfile
import warnings

import numpy as np
import onnxruntime as ort
import timm
import torch

import dynsparse as ds

warnings.filterwarnings("ignore")
logging.getLogger("torch.onnx").setLevel(logging.ERROR)
torch.manual_seed(0)
# per-input channel gates (FBS) on a small ResNet; the converted model keeps them as run-time modules
model = timm.create_model("resnet10t", num_classes=10, channels=(16, 32, 64, 128)).eval()
ds.sparsify_(model, {"channels": {"gate": "fbs", "keep": 0.5}})
with torch.no_grad():  # untrained gates: random saliency weights, so the images decide differently
    for gate in model.modules():
        if isinstance(gate, ds.gates.FBSGate):
            gate.fc.weight.normal_(0, 1.0)
            gate.fc.bias.zero_()
small = ds.convert(model.eval(), static=False)

g = torch.Generator().manual_seed(0)
contrast = torch.tensor([0.5, 1.0, 3.0])[:, None, None, None]
example = torch.randn(3, 3, 64, 64, generator=g) * contrast
other = torch.randn(3, 3, 64, 64, generator=g) * contrast.flip(0) + 1.0  # other images, other decisions

program = torch.export.export(small, (example,))
print(f"torch.export on other images: max-abs difference {(program.module()(other) - small(other)).abs().max():.2e}")
path = os.path.join(tempfile.mkdtemp(), "fbs.onnx")
torch.onnx.export(small, (example,), path, dynamo=True, verbose=False)
sess = ort.InferenceSession(path)
(out,) = sess.run(None, {sess.get_inputs()[0].name: other.numpy()})
print(f"onnxruntime on other images: max-abs difference {np.abs(out - small(other).detach().numpy()).max():.2e}")
