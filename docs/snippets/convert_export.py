import os
import tempfile

import numpy as np
import onnxruntime as ort
import timm
import torch

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3).eval()
ds.sparsify_(model, {"heads": "fixed", "neurons": "fixed", "layers": "fixed"})
masks = {f"blocks.{i}.mlp.norm": torch.rand(768) < 0.5 for i in range(3)}
masks |= {"blocks.0.attn.norm": torch.tensor([True, False, True]), "blocks.1.drop_path1": torch.tensor([False])}
masks |= {"blocks.2.drop_path1": torch.tensor([False]), "blocks.2.drop_path2": torch.tensor([False])}
ds.fix_gates_(model, masks)
small = ds.convert(model)
x = torch.randn(2, 3, 32, 32)

program = torch.export.export(small, (x,))  # a ZeroBranch and an Identity block export like any module
print(f"torch.export: max-abs difference {(program.module()(x) - small(x)).abs().max():.2e}")

path = os.path.join(tempfile.mkdtemp(), "small.onnx")
torch.onnx.export(small, (x,), path, dynamo=True, verbose=False)
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
(out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
with torch.no_grad():
    print(f"onnxruntime: max-abs difference {np.abs(out - small(x).numpy()).max():.2e}")
