"""The masked twins ``MaskedLinear`` / ``MaskedConv2d``: lossless swap, shared tensors, masked weights without
effect or gradient, signature parity with the host, ``from_module`` by exact type keeping hooks and training flag.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynsparse import UnsupportedModuleError
from dynsparse.prune import MaskedConv2d, MaskedLinear

torch.set_num_threads(1)


# ---------------------------------------------------------------- masked twins


@pytest.mark.parametrize(
    ("host", "x"),
    [
        (nn.Linear(5, 7), torch.randn(2, 3, 5)),
        (nn.Linear(5, 7, bias=False), torch.randn(4, 5)),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), torch.randn(2, 3, 6, 6)),
        (nn.Conv2d(4, 4, 3, groups=2, bias=False), torch.randn(1, 4, 5, 5)),
    ],
)
def test_masked_twin_is_lossless_and_shares_tensors(host, x):
    host = host.double()
    x = x.double()
    cls = MaskedLinear if isinstance(host, nn.Linear) else MaskedConv2d
    m = cls.from_module(host)
    assert isinstance(m, type(host)) and type(m) is cls
    assert m.weight is host.weight and m.bias is host.bias
    assert m.weight_mask.dtype == torch.bool and bool(m.weight_mask.all())
    torch.testing.assert_close(m(x), host(x), rtol=0, atol=0)
    assert set(m.state_dict()) == set(host.state_dict()) | {"weight_mask"}
    assert "weight_mask" not in host.state_dict()  # the host is not changed


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_masked_weights_have_no_effect_and_no_gradient(kind):
    torch.manual_seed(1)
    if kind == "linear":
        m, x = MaskedLinear(6, 4).double(), torch.randn(3, 6, dtype=torch.float64)
    else:
        m, x = MaskedConv2d(2, 3, 3).double(), torch.randn(2, 2, 5, 5, dtype=torch.float64)
    mask = torch.rand(m.weight.shape) > 0.5
    m.weight_mask.copy_(mask)
    y = m(x)
    w = m.weight.detach() * mask
    ref = F.linear(x, w, m.bias) if kind == "linear" else F.conv2d(x, w, m.bias)
    torch.testing.assert_close(y, ref)
    with torch.no_grad():  # changing masked raw weights changes nothing
        m.weight[~mask] = 1e6
    torch.testing.assert_close(m(x), ref)
    m(x).square().sum().backward()
    assert bool((m.weight.grad[~mask] == 0).all())
    assert bool((m.weight.grad[mask] != 0).any())


@pytest.mark.parametrize(("cls", "host"), [(MaskedLinear, nn.Linear), (MaskedConv2d, nn.Conv2d)])
def test_signature_parity_with_the_host(cls, host):
    def params(c):
        return [(p.name, p.default) for p in inspect.signature(c).parameters.values()]

    assert params(cls) == params(host)


def test_from_module_keeps_hooks_and_training_flag():
    host = nn.Linear(3, 2).eval()
    calls = []
    host.register_forward_hook(lambda mod, inp, out: calls.append(1))
    m = MaskedLinear.from_module(host)
    m(torch.randn(1, 3))
    assert calls == [1] and not m.training


def test_from_module_takes_exact_type_only():
    class MyLinear(nn.Linear):
        pass

    with pytest.raises(UnsupportedModuleError, match="MyLinear"):
        MaskedLinear.from_module(MyLinear(2, 2))
    with pytest.raises(UnsupportedModuleError):
        MaskedConv2d.from_module(nn.Linear(2, 2))


# ---------------------------------------------------------------- hook handles survive the swaps


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "forward_kwargs", "full_backward", "state_dict"])
def test_handles_registered_before_a_swap_still_remove_their_hooks(kind):
    from dynsparse import prune

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    calls = []

    def register(m):
        if kind == "forward":
            return m.register_forward_hook(lambda *a: calls.append(1))
        if kind == "forward_pre":
            return m.register_forward_pre_hook(lambda *a: calls.append(1))
        if kind == "forward_kwargs":
            return m.register_forward_hook(lambda *a: calls.append(1), with_kwargs=True)
        if kind == "full_backward":
            return m.register_full_backward_hook(lambda *a: calls.append(1))
        return m._register_state_dict_hook(lambda *a: calls.append(1))

    def run():
        model(torch.randn(2, 4, requires_grad=True)).sum().backward()
        model.state_dict()

    for swap in (lambda: prune.unstructured_(model, 0.5), lambda: prune.remove_(model)):
        handle = register(model[0])
        swap()
        run()
        assert calls, "the hook must still fire on the swapped module"
        calls.clear()
        handle.remove()
        run()
        assert calls == [], f"{kind}: handle.remove() after the swap left the hook in place"


def test_adopt_shares_hook_dicts_and_copies_the_rest():
    from dynsparse.modules import adopt

    class Twin(nn.Linear):
        pass

    host = nn.Linear(3, 3)
    calls = []
    handle = host.register_forward_hook(lambda *a: calls.append(1))
    new = adopt(host, Twin)
    new.register_buffer("extra", torch.zeros(1))
    assert "extra" not in host._buffers and new.weight is host.weight
    handle.remove()
    new(torch.randn(1, 3))
    assert calls == []
    copy = adopt(host, Twin, share_hooks=False)
    copy.register_forward_hook(lambda *a: calls.append(2))
    host(torch.randn(1, 3))
    assert calls == []  # a copy's hooks are its own
