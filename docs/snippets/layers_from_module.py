import torch
from timm.layers import Mlp

from dynsparse.layers import GatedMlp

torch.manual_seed(0)
host = Mlp(8, 32).eval()
gated = GatedMlp.from_module(host, gate="hard_concrete").eval()
print(gated)
x = torch.randn(2, 5, 8)
print(torch.equal(gated(x), host(x)))
print(gated.fc1.weight is host.fc1.weight)  # parameters are shared, not copied
print(sorted(set(gated.state_dict()) - set(host.state_dict())))
