import numpy as np
import torch
from sklearn.datasets import load_sample_images
from timm.data import ImageNetInfo

from dynsparse.pretrained import load_pretrained, pretrained_path

torch.set_num_threads(1)
print(pretrained_path("efficientnet_lite0").name)  # the .pth file inside the installed package
model = load_pretrained("efficientnet_lite0").eval()  # timm tf_efficientnet_lite0, 1000 ImageNet classes
print(type(model).__name__, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])

# scikit-learn ships two photos: a Chinese temple and a flower; resize to 224 (center crop) and normalize
x = torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2).float() / 255
x = torch.nn.functional.interpolate(x, size=(224, 336), mode="bilinear", antialias=True)[..., 56:280]
with torch.no_grad():
    probs = model((x - 0.5) / 0.5).softmax(-1)
info = ImageNetInfo()
for name, p in zip(["china.jpg", "flower.jpg"], probs, strict=True):
    top = p.topk(3)
    print(
        name, [(info.index_to_description(int(i)).split(",")[0], round(float(v), 2)) for v, i in zip(*top, strict=True)]
    )

# for transfer: a new 10-class head, and a 1-channel stem (the RGB filters summed, as timm does)
gray = load_pretrained("efficientnet_lite0", num_classes=10, in_chans=1)
print(gray.conv_stem.weight.shape, gray(torch.randn(2, 1, 48, 48)).shape)
