"""Tests of `dynsparse.importance`, each score against its paper's formula re-derived here on tiny cases.

* Per weight: magnitude, gradient, Taylor / OBD (methods.md 2.13), SNIP (2.3), GraSP (2.4, against an explicit
  Hessian from ``torch.autograd.functional.hessian``), SynFlow (2.5, closed form of a linear chain), Wanda (2.23),
  movement (2.22).
* Per unit: producer-weight norms, Taylor through the gates (2.20), activation mean / APoZ (2.21), branch ablation.
* ``keep_masks`` / ``unstructured_masks`` invariants; scores -> keep masks -> ``fix_gates_`` -> ``convert`` on timm.

Expected values come from explicit formulas (manual back-prop, reshapes, loops), not from ``dynsparse`` helpers.
Package convention under test: higher score = kept.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import dynsparse as ds
from dynsparse.errors import ConfigError
from dynsparse.importance import (
    IMPORTANCES,
    WEIGHT_IMPORTANCES,
    ActivationImportance,
    Importance,
    LayerImportance,
    MagnitudeImportance,
    MovementTracker,
    RandomImportance,
    TaylorImportance,
    gradient,
    grasp,
    keep_masks,
    magnitude,
    make_importance,
    movement,
    obd,
    random,
    snip,
    synflow,
    taylor,
    unstructured_masks,
    wanda,
)
from dynsparse.layers import GatedMlp

RESNET_GATES = {  # gate fqn -> (block, conv producing the channels, BN of the channels)
    "layer1.0.act1.gate": ("layer1.0", "conv1", "bn1"),
    "layer2.0.act1.gate": ("layer2.0", "conv1", "bn1"),
    "layer3.0.act1.gate": ("layer3.0", "conv1", "bn1"),
    "layer3.0.act2.gate": ("layer3.0", "conv2", "bn2"),
    "layer4.0.act1.gate": ("layer4.0", "conv1", "bn1"),
}


def assert_close(actual: Tensor, expected, atol: float = 1e-10, rtol: float = 1e-7, what: str = "") -> None:
    """``torch.testing.assert_close`` with the max-abs difference in the message."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = actual.detach().double().cpu()
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: max diff {diff:.3g}\n{m}"
    )


def f64(values) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def half_sq(out: Tensor, target: Tensor) -> Tensor:
    """``mean_i ½‖y_i − t_i‖²``: its gradient in ``y_i`` is ``(y_i − t_i) / B``."""
    return 0.5 * (out - target).pow(2).sum(-1).mean()


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def mlp2(w1, w2, act: nn.Module | None = None) -> nn.Sequential:
    """Linear(no bias) -> act -> Linear(no bias) in float64 with hand-set weights."""
    w1, w2 = f64(w1), f64(w2)
    m = nn.Sequential(
        nn.Linear(w1.shape[1], w1.shape[0], bias=False),
        act or nn.Identity(),
        nn.Linear(w2.shape[1], w2.shape[0], bias=False),
    )
    m = m.double()
    with torch.no_grad():
        m[0].weight.copy_(w1)
        m[2].weight.copy_(w2)
    return m


def tiny_vit(dims=("neurons", "heads", "layers"), seed=0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5).to(dtype).eval()
    return ds.sparsify_(model, {d: "fixed" for d in dims})


def tiny_resnet(dims=("channels", "layers"), seed=0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5).to(dtype).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.0, 1.0)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return ds.sparsify_(model, {d: "fixed" for d in dims})


def image_batches(n=2, b=4, dtype=torch.float64, seed=1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, 3, 32, 32, generator=g, dtype=dtype), torch.randint(0, 5, (b,), generator=g)) for _ in range(n)
    ]


# ------------------------------------------------------------------------------------------------------------------
# Per weight
# ------------------------------------------------------------------------------------------------------------------


def test_magnitude_random_and_selection() -> None:
    m = mlp2([[1.0, -2.0], [-3.0, 0.5]], [[4.0, -1.0]])
    s1, s2 = magnitude(m), magnitude(m, p=2)
    assert list(s1) == ["0.weight", "2.weight"]
    assert_close(s1["0.weight"], [[1.0, 2.0], [3.0, 0.5]], what="|w|")
    assert_close(s2["2.weight"], [[16.0, 1.0]], what="w²")
    assert list(magnitude(m, exclude="2")) == ["0.weight"]
    assert list(magnitude(m, include=["2"])) == ["2.weight"]
    a = random(m, torch.Generator().manual_seed(3))
    b = random(m, torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) and a[k].shape == m.get_parameter(k).shape for k in a)
    with pytest.raises(ConfigError, match="matches"):
        magnitude(m, include="nothing*")
    with pytest.raises(ConfigError, match="p must"):
        magnitude(m, p=0)


def linear_data():
    """A Linear(2 -> 1, no bias) with w = (2, -1) and two batches of (x, t)."""
    m = nn.Sequential(nn.Linear(2, 1, bias=False).double())
    with torch.no_grad():
        m[0].weight.copy_(f64([[2.0, -1.0]]))
    data = [
        (f64([[1.0, 0.0], [0.0, 1.0]]), f64([[1.0], [0.0]])),
        (f64([[1.0, 1.0], [2.0, -1.0], [0.0, 3.0]]), f64([[0.0], [1.0], [-1.0]])),
    ]
    return m, data


def by_hand_linear_grads(w: Tensor, data) -> list[Tensor]:
    """Per-batch ``∂L/∂w = mean_i (w·x_i − t_i) x_i`` of ``mean_i ½(w·x_i − t_i)²``."""
    out = []
    for x, t in data:
        g = torch.zeros(2, dtype=torch.float64)
        for xi, ti in zip(x, t, strict=True):
            g += (float(w @ xi) - float(ti)) * xi
        out.append(g / len(x))
    return out


def test_gradient_taylor_and_obd_by_hand() -> None:
    m, data = linear_data()
    w = m[0].weight.detach()[0].clone()
    gs = by_hand_linear_grads(w, data)
    mean_g = (gs[0] + gs[1]) / 2
    fisher = (gs[0] ** 2 + gs[1] ** 2) / 2
    assert_close(gradient(m, half_sq, data)["0.weight"][0], mean_g.abs(), what="|ḡ|")
    assert_close(taylor(m, half_sq, data)["0.weight"][0], (w * mean_g).abs(), what="first-order Taylor |w·ḡ|")
    t2 = taylor(m, half_sq, data, order=2)["0.weight"][0]
    assert_close(t2, 0.5 * fisher * w**2, what="OBD ½·F·w²")
    assert_close(obd(m, half_sq, data)["0.weight"][0], t2, what="obd alias")
    assert_close(taylor(m, half_sq, data, max_batches=1)["0.weight"][0], (w * gs[0]).abs(), what="max_batches")
    assert m[0].weight.grad is None  # autograd.grad only: no .grad written


def test_snip_by_hand_and_abs_after_batch_sum() -> None:
    w1, w2 = f64([[1.0, -1.0], [0.5, 2.0], [-1.0, 1.0]]), f64([[1.0, -2.0, 0.5]])
    m = mlp2(w1, w2, nn.ReLU())
    x, t = f64([[1.0, 2.0], [-1.0, 0.5], [2.0, -1.0]]), f64([[1.0], [0.0], [-1.0]])
    # manual back-prop of mean_i ½(y_i − t_i)²
    g1, g2 = torch.zeros_like(w1), torch.zeros_like(w2)
    for xi, ti in zip(x, t, strict=True):
        pre = w1 @ xi
        h = pre.clamp(min=0)
        r = (w2 @ h - ti) / len(x)
        g2 += r[:, None] * h[None, :]
        g1 += ((w2.T @ r) * (pre > 0))[:, None] * xi[None, :]
    raw1, raw2 = (w1 * g1).abs(), (w2 * g2).abs()
    total = raw1.sum() + raw2.sum()
    s = snip(m, half_sq, (x, t))
    assert_close(s["0.weight"], raw1 / total, what="snip layer 0")
    assert_close(s["2.weight"], raw2 / total, what="snip layer 2")
    assert_close(sum(v.sum() for v in s.values()), 1.0, what="normalised")

    # feature 0 gets per-example gradients +1 and -1: the batch gradient is 0, so its score is 0 (abs after summing)
    lin = nn.Sequential(nn.Linear(2, 1, bias=False).double())
    with torch.no_grad():
        lin[0].weight.copy_(f64([[1.0, 1.0]]))
    xb, tb = f64([[1.0, 0.0], [1.0, 1.0]]), f64([[0.0], [3.0]])  # residuals +1, -1
    assert_close(snip(lin, half_sq, (xb, tb))["0.weight"], [[0.0, 1.0]], what="abs after the batch sum")


def test_grasp_matches_explicit_hessian_and_sign_convention() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    temp = 3.0
    names = ["0.weight", "2.weight"]
    shapes = [m.get_parameter(n).shape for n in names]
    flat0 = torch.cat([m.get_parameter(n).detach().flatten() for n in names])

    def loss_of(flat: Tensor) -> Tensor:
        w0 = flat[: shapes[0].numel()].view(shapes[0])
        w2 = flat[shapes[0].numel() :].view(shapes[1])
        out = F.linear(torch.tanh(F.linear(x, w0, m[0].bias.detach())), w2, m[2].bias.detach())
        return F.cross_entropy(out / temp, y)

    hess = torch.autograd.functional.hessian(loss_of, flat0)
    g = torch.autograd.functional.jacobian(loss_of, flat0)
    s_paper = -flat0 * (hess @ g)  # GraSP's S(−θ) = −θ ⊙ Hg; the paper removes its LARGEST entries
    out = grasp(m, F.cross_entropy, (x, y), temperature=temp)
    got = torch.cat([out[n].flatten() for n in names])
    assert_close(got, -s_paper, rtol=1e-6, what="grasp returns −S = θ⊙Hg")

    # keeping the highest returned score == removing the largest S
    k = 10
    masks = unstructured_masks(out, k / got.numel())
    removed = ~torch.cat([masks[n].flatten() for n in names])
    assert set(removed.nonzero().flatten().tolist()) == set(torch.topk(s_paper, k).indices.tolist())


def test_grasp_and_synflow_leave_the_model_unchanged() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(64, 3)
    ).double()
    m.train()
    m[1].eval()  # a mixed pattern of flags must come back as it was
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flags = [mod.training for mod in m.modules()]
    x, y = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    grasp(m, F.cross_entropy, (x, y))
    synflow(m, (3, 4, 4), sparsity=0.5, iterations=3)
    gradient(m, F.cross_entropy, [(x, y)], train=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [mod.training for mod in m.modules()] == flags
    assert all(p.grad is None for p in m.parameters())
    assert no_hooks(m)


def test_synflow_closed_form_of_a_linear_chain() -> None:
    w1, w2 = f64([[1.0, -2.0, 0.5], [-1.0, 3.0, 1.0]]), f64([[2.0, -1.0], [0.5, 4.0], [-3.0, 1.0], [1.0, 1.0]])
    m = mlp2(w1, w2).float()  # float32 model: scored in float64 on a copy
    s = synflow(m, (3,))
    a1, a2 = w1.abs(), w2.abs()
    # R = 1ᵀ|W2||W1|1: ∂R/∂|W1|_jk = (1ᵀ|W2|)_j, ∂R/∂|W2|_ij = (|W1|1)_j
    assert_close(s["0.weight"], a1 * a2.sum(0)[:, None], rtol=1e-6, what="layer 1")
    assert_close(s["2.weight"], a2 * a1.sum(1)[None, :], rtol=1e-6, what="layer 2")
    assert s["0.weight"].dtype == torch.float64
    assert torch.equal(m[0].weight, w1.float()) and m[0].weight.dtype == torch.float32  # signs and dtype kept


def test_synflow_keeps_gates_as_they_are() -> None:
    torch.manual_seed(0)
    mlp = GatedMlp(3, 4, 2, gate="hard_concrete").double()
    with torch.no_grad():
        mlp.norm.gate.log_alpha[1] = -10.0  # closed in eval; |log α| would open it
    s = synflow(nn.Sequential(mlp), (3,))
    assert not s["0.fc1.weight"][1].any() and s["0.fc1.weight"][0].all()
    assert not s["0.fc2.weight"][:, 1].any()
    assert float(mlp.norm.gate.log_alpha.detach()[1]) == -10.0


def test_synflow_iterative_schedule() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    n_total = sum(mod.weight.numel() for mod in m if isinstance(mod, nn.Linear))
    rounds, sparsity = 6, 0.9
    s = synflow(m, (6,), sparsity=sparsity, iterations=rounds)
    masks = unstructured_masks(s, sparsity)
    kept = sum(int(v.sum()) for v in masks.values())
    assert kept == n_total - math.floor(sparsity * n_total + 0.5)
    assert all(int(v.sum()) > 0 for v in masks.values())  # no layer collapse
    dead_before_last = math.floor((1 - (1 - sparsity) ** ((rounds - 1) / rounds)) * n_total + 0.5)
    assert sum(int((v == 0).sum()) for v in s.values()) >= dead_before_last
    with pytest.raises(ConfigError, match="sparsity"):
        synflow(m, (6,), sparsity=1.0)


def test_wanda_by_hand_linear_and_grouped_conv() -> None:
    lin = nn.Linear(3, 2).double()
    with torch.no_grad():
        lin.weight.copy_(f64([[1.0, -2.0, 3.0], [-0.5, 0.0, 1.0]]))
    model = nn.Sequential(lin)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 4, 3, generator=g, dtype=torch.float64) for _ in range(2)]  # (B, tokens, C_in)
    norms = torch.zeros(3, dtype=torch.float64)
    for xb in data:
        for row in xb.reshape(-1, 3):
            norms += row**2
    norms = norms.sqrt()
    assert_close(wanda(model, data)["0.weight"], lin.weight.detach().abs() * norms[None, :], what="Wanda linear")
    assert no_hooks(model)

    conv = nn.Conv2d(4, 4, 1, groups=2, bias=False).double()
    cm = nn.Sequential(conv)
    xs = [torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)]
    cn = xs[0].pow(2).sum((0, 2, 3)).sqrt()
    expected = torch.zeros_like(conv.weight)
    for o in range(4):
        for j in range(2):
            expected[o, j] = conv.weight[o, j].abs() * cn[(o // 2) * 2 + j]
    assert_close(wanda(cm, xs)["0.weight"], expected, what="Wanda grouped conv")
    with pytest.raises(ConfigError, match="iterable of batches"):
        wanda(model, data[0])


def test_movement_and_tracker() -> None:
    m, data = linear_data()
    x, t = data[0]
    half_sq(m(x), t).backward()
    w0, g0 = m[0].weight.detach().clone(), m[0].weight.grad.clone()
    assert_close(movement(m)["0.weight"], -w0 * g0, what="one-step movement")

    tracker = MovementTracker(m)
    tracker.step()
    with torch.no_grad():
        m[0].weight -= 0.1 * m[0].weight.grad
    m[0].weight.grad = None
    x, t = data[1]
    half_sq(m(x), t).backward()
    w1, g1 = m[0].weight.detach().clone(), m[0].weight.grad.clone()
    tracker.step()
    assert tracker.steps == 2
    assert_close(tracker.scores()["0.weight"], -(w0 * g0) - (w1 * g1), what="accumulated −w·g")
    tracker.reset()
    assert tracker.steps == 0 and not tracker.scores()["0.weight"].any()
    m[0].weight.grad = None
    with pytest.raises(ConfigError, match="backward"):
        movement(m)


# ------------------------------------------------------------------------------------------------------------------
# Unstructured masks
# ------------------------------------------------------------------------------------------------------------------


def test_unstructured_masks_exact_counts_ties_and_prune_agreement() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    scores = {"0.weight": torch.ones(7, 5), "2.weight": torch.randint(0, 3, (3, 7)).float()}  # many ties
    n = 35 + 21
    for sp in (0.0, 0.3, 0.5, 0.77, 1.0):
        g = unstructured_masks(scores, sp)
        assert sum(int((~v).sum()) for v in g.values()) == math.floor(sp * n + 0.5)
        lay = unstructured_masks(scores, sp, scope="layer")
        for v in lay.values():
            assert int((~v).sum()) == math.floor(sp * v.numel() + 0.5)
        row = unstructured_masks(scores, sp, scope="row")
        for v in row.values():
            assert all(int((~r).sum()) == math.floor(sp * v.shape[1] + 0.5) for r in v)
        # same masks as dynsparse.prune.unstructured_ with the same scores (same tie rule)
        pruned = ds.prune.unstructured_(copy.deepcopy(model), sp, importance=scores)
        for k, v in ds.prune.masks(pruned).items():
            assert torch.equal(v, g[k]), (sp, k)
    ex = unstructured_masks(scores, 0.5, exclude="2.*")
    assert list(ex) == ["0.weight"]
    assert unstructured_masks({"w": f64([[3.0, 1.0], [2.0, 4.0]])}, 0.5)["w"].tolist() == [[True, False], [False, True]]
    with pytest.raises(ConfigError, match="Did you mean 'layer'"):
        unstructured_masks(scores, 0.5, scope="layers")
    with pytest.raises(ConfigError, match="NaN"):
        unstructured_masks({"w": f64([1.0, float("nan")])}, 0.5)


# ------------------------------------------------------------------------------------------------------------------
# keep_masks
# ------------------------------------------------------------------------------------------------------------------


def test_keep_masks_global_vs_layer_and_constraints() -> None:
    s = {"a.gate": f64([1.0, 2.0, 3.0, 4.0]), "b.gate": f64([10.0, 20.0, 30.0, 40.0])}
    glob, lay = keep_masks(s, 0.5), keep_masks(s, 0.5, scope="layer")
    assert glob["a.gate"].tolist() == [False, False, False, True]  # min_keep=1 stops the global ranking
    assert glob["b.gate"].tolist() == [False, True, True, True]
    assert lay["a.gate"].tolist() == lay["b.gate"].tolist() == [False, False, True, True]
    # per-gate normalisation makes both gates equal: global then matches layer-wise
    assert {k: v.tolist() for k, v in keep_masks(s, 0.5, normalize="l2").items()} == {
        k: v.tolist() for k, v in lay.items()
    }
    # max_sparsity caps each gate; the total is then short and the rest is kept
    capped = keep_masks(s, 0.5, max_sparsity=0.25)
    assert [int((~v).sum()) for v in capped.values()] == [1, 1]
    # min_keep
    mk = keep_masks(s, 1.0, min_keep=2)
    assert [int(v.sum()) for v in mk.values()] == [2, 2]
    # num_pruned (global and per gate)
    assert sum(int((~v).sum()) for v in keep_masks(s, num_pruned=3).values()) == 3
    assert [int((~v).sum()) for v in keep_masks(s, num_pruned=1, scope="layer").values()] == [1, 1]
    # single-unit (branch) gates are exempt from min_keep and can close
    br = keep_masks({"x.gate": f64([0.1]), "y.gate": f64([0.5]), "z.gate": f64([0.9])}, num_pruned=2)
    assert [v.tolist() for v in br.values()] == [[False], [False], [True]]
    # ties: the lower unit index is kept
    assert keep_masks({"t.gate": torch.ones(4)}, 0.5)["t.gate"].tolist() == [True, True, False, False]


def test_keep_masks_round_to() -> None:
    torch.manual_seed(0)
    s = {"a.gate": torch.rand(20), "b.gate": torch.rand(13), "c.gate": torch.rand(7)}
    for sp in (0.1, 0.3, 0.5, 0.9):
        for scope in ("global", "layer"):
            m = keep_masks(s, sp, scope=scope, round_to=4)
            for k, v in m.items():
                kept = int(v.sum())
                assert kept % 4 == 0 or kept == v.numel(), (sp, scope, k, kept)
                assert kept >= 1
            if scope == "layer":
                for v in m.values():  # nearest allowed count to the exact per-gate target
                    n = v.numel()
                    target = n - math.floor(sp * n + 0.5)
                    allowed = [c for c in range(4, n + 1, 4)] + [n]
                    assert int(v.sum()) == min(allowed, key=lambda c: (abs(c - target), -c))
            # the kept units are the highest-scored of their gate
            for k, v in m.items():
                if (~v).any() and v.any():
                    assert s[k][v].min() >= s[k][~v].max()


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    scope=st.sampled_from(["global", "layer"]),
    normalize=st.sampled_from(["none", "l2", "mean"]),
)
def test_keep_masks_exact_counts(sizes, sparsity, seed, scope, normalize) -> None:
    g = torch.Generator().manual_seed(seed)
    s = {f"g{i}.gate": torch.randint(0, 4, (n,), generator=g).float() for i, n in enumerate(sizes)}  # with ties
    m = keep_masks(s, sparsity, scope=scope, normalize=normalize, min_keep=0)
    assert list(m) == list(s) and all(v.dtype == torch.bool and v.shape == s[k].shape for k, v in m.items())
    if scope == "global":
        assert sum(int((~v).sum()) for v in m.values()) == math.floor(sparsity * sum(sizes) + 0.5)
    else:
        assert all(int((~v).sum()) == math.floor(sparsity * v.numel() + 0.5) for v in m.values())
    # with min_keep=1 every multi-unit gate keeps one
    m1 = keep_masks(s, sparsity, scope=scope, normalize=normalize)
    assert all(int(v.sum()) >= 1 for v in m1.values() if v.numel() > 1)


def test_keep_masks_rejects_bad_arguments() -> None:
    s = {"a.gate": torch.rand(4)}
    with pytest.raises(ConfigError, match="exactly one"):
        keep_masks(s)
    with pytest.raises(ConfigError, match="exactly one"):
        keep_masks(s, 0.5, num_pruned=1)
    with pytest.raises(ConfigError, match="Did you mean 'global'"):
        keep_masks(s, 0.5, scope="globl")
    with pytest.raises(ConfigError, match="1-D"):
        keep_masks({"a.gate": torch.rand(2, 2)}, 0.5)
    with pytest.raises(ConfigError, match="round_to"):
        keep_masks(s, 0.5, round_to=0)
    with pytest.raises(ConfigError, match="sparsity"):
        keep_masks(s, 1.5)


# ------------------------------------------------------------------------------------------------------------------
# Structured importances, by hand
# ------------------------------------------------------------------------------------------------------------------


def gated_mlp(act=nn.GELU, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    mlp = GatedMlp(3, 4, 2, act_layer=act, gate="fixed").double()
    return nn.Sequential(mlp)


def test_magnitude_importance_by_hand() -> None:
    model = gated_mlp()
    fc1 = model[0].fc1
    s1 = MagnitudeImportance()(model)
    assert list(s1) == ["0.norm.gate"]
    assert_close(s1["0.norm.gate"], fc1.weight.abs().sum(1), rtol=1e-6, what="L1 of fc1 rows")
    s2 = MagnitudeImportance(p=2, bias=True)(model)
    assert_close(
        s2["0.norm.gate"], (fc1.weight.pow(2).sum(1) + fc1.bias.pow(2)).sqrt(), rtol=1e-6, what="L2 rows + bias"
    )

    vit = tiny_vit()
    sv = MagnitudeImportance(p=2)(vit)
    a = vit.blocks[1].attn
    h, hd, c = a.num_heads, a.head_dim, a.qkv.in_features
    assert_close(
        sv["blocks.1.attn.norm.gate"],
        a.qkv.weight.view(3, h, hd, c).pow(2).sum((0, 2, 3)).sqrt(),
        rtol=1e-6,
        what="heads",
    )
    assert not any(k.endswith("drop_path1.gate") for k in sv)  # layers gates have no producer weights

    rn = tiny_resnet()
    sr = MagnitudeImportance()(rn)
    assert set(sr) == set(RESNET_GATES)
    for fqn, (blk, conv, _) in RESNET_GATES.items():
        w = rn.get_submodule(f"{blk}.{conv}").weight
        assert_close(sr[fqn], w.abs().sum((1, 2, 3)), rtol=1e-6, what=fqn)
    with pytest.raises(ConfigError, match="not supported"):
        MagnitudeImportance(dimensions=("layers",))


def mlp_gate_grad(model: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    """Manual ``∂L/∂z`` of ``L = mean_i ½‖fc2(a_i ⊙ z) − t_i‖²`` at ``z = 1``: ``Σ_i (r_i/B)ᵀ W2[:, j] a_ij``."""
    mlp = model[0]
    a = F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)).detach()
    y = F.linear(a, mlp.fc2.weight, mlp.fc2.bias).detach()
    r = (y - t) / len(x)
    return ((r @ mlp.fc2.weight.detach()) * a).sum(0)


def test_taylor_importance_first_order_by_hand() -> None:
    model = gated_mlp()
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64))
        for _ in range(3)
    ]
    expected = sum(mlp_gate_grad(model, x, t) ** 2 for x, t in data) / 3
    s = TaylorImportance(half_sq)(model, data)
    assert_close(s["0.norm.gate"], expected, rtol=1e-5, atol=1e-9, what="(∂L/∂z)² averaged")
    assert no_hooks(model) and all(p.grad is None for p in model.parameters())

    # a closed unit scores 0 (z = 0)
    ds.fix_gates_(model, {"0.norm.gate": torch.tensor([True, False, True, True])})
    assert float(TaylorImportance(half_sq)(model, data)["0.norm.gate"][1]) == 0.0


def test_taylor_importance_second_order_matches_explicit_hessian() -> None:
    model = gated_mlp()
    mlp = model[0]
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    a = F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)).detach()

    def loss_of(z: Tensor) -> Tensor:
        return half_sq(F.linear(a * z, mlp.fc2.weight.detach(), mlp.fc2.bias.detach()), t)

    z = torch.ones(4, dtype=torch.float64)
    grad = torch.autograd.functional.jacobian(loss_of, z)
    hess = torch.autograd.functional.hessian(loss_of, z)
    expected = (z * grad - 0.5 * z * (hess @ z)) ** 2
    s = TaylorImportance(half_sq, order=2)(model, [(x, t)])
    assert_close(s["0.norm.gate"], expected, rtol=1e-5, atol=1e-10, what="second order")
    assert not torch.allclose(s["0.norm.gate"].double(), (z * grad) ** 2)  # the Hessian term matters here


def test_activation_importance_mean_and_apoz_by_hand() -> None:
    model = gated_mlp(act=nn.ReLU)
    mlp = model[0]
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(4, 5, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    acts = torch.cat([F.relu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)).reshape(-1, 4) for x in data]).detach()
    mean = ActivationImportance("mean")(model, data)["0.norm.gate"]
    apoz = ActivationImportance("apoz")(model, data)["0.norm.gate"]
    assert_close(mean, acts.abs().mean(0), rtol=1e-6, what="mean activation")
    assert_close(apoz, 1.0 - (acts == 0).double().mean(0), rtol=1e-6, what="1 − APoZ")
    assert no_hooks(model)

    # ResNet: the act1 slot holds the ReLU; the statistic is taken after it, before the gate
    rn = tiny_resnet(dims=("channels",))
    blk = rn.layer1[0]
    seen = []
    h = blk.bn1.register_forward_hook(lambda m, a, out: seen.append(F.relu(out).detach()))
    xs = image_batches(1)
    rn(xs[0][0])
    h.remove()
    s = ActivationImportance("apoz")(rn, xs)["layer1.0.act1.gate"]
    assert_close(s, 1.0 - (seen[0] == 0).double().mean((0, 2, 3)), rtol=1e-6, what="resnet APoZ after ReLU")
    assert float(s.min()) < 1.0
    assert no_hooks(rn)


def test_layer_importance_is_the_loss_increase_of_a_closed_branch() -> None:
    vit = tiny_vit(dims=("layers",))
    data = image_batches(2)
    s = LayerImportance()(vit, data)
    assert len(s) == 12 and all(v.shape == (1,) for v in s.values())
    for fqn in ("blocks.0.drop_path1.gate", "blocks.3.drop_path2.gate"):
        closed = ds.fix_gates_(copy.deepcopy(vit), {fqn: torch.tensor([False])})
        with torch.no_grad():
            diff = sum(float(F.cross_entropy(closed(x), y) - F.cross_entropy(vit(x), y)) for x, y in data) / 2
        assert_close(s[fqn], [diff], rtol=1e-5, atol=1e-7, what=fqn)
    assert no_hooks(vit)


def test_structured_scores_leave_the_model_unchanged() -> None:
    rn = tiny_resnet()
    rn.train()
    before = {k: v.clone() for k, v in rn.state_dict().items()}
    data = image_batches(1)
    for imp in (TaylorImportance(train=True), ActivationImportance(), LayerImportance(), RandomImportance(seed=1)):
        out = imp(rn, data)
        assert all(v.device.type == "cpu" and v.dim() == 1 for v in out.values())
    assert all(m.training for m in rn.modules())
    assert all(torch.equal(v, before[k]) for k, v in rn.state_dict().items())
    assert all(p.grad is None for p in rn.parameters()) and no_hooks(rn)


def test_importance_errors_and_registry() -> None:
    plain = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="sparsify_"):
        MagnitudeImportance()(plain)
    with pytest.raises(ConfigError, match="needs data"):
        TaylorImportance()(gated_mlp())
    with pytest.raises(ConfigError, match="order"):
        TaylorImportance(order=3)
    with pytest.raises(ConfigError, match="kind"):
        ActivationImportance(kind="median")
    assert {"magnitude", "random", "taylor", "activation", "apoz", "layer"} <= set(IMPORTANCES.names())
    assert IMPORTANCES.get("apoz")().kind == "apoz"
    assert {"snip", "grasp", "synflow", "wanda", "movement", "obd"} <= set(WEIGHT_IMPORTANCES.names())
    with pytest.raises(ConfigError, match="Did you mean 'taylor'"):
        IMPORTANCES.get("taylr")
    assert isinstance(make_importance({"name": "magnitude", "p": 2}), MagnitudeImportance)
    assert make_importance("random").seed == 0
    with pytest.raises(ConfigError, match="unexpected keyword"):
        make_importance({"name": "magnitude", "q": 2})
    r1, r2 = RandomImportance(seed=4)(gated_mlp()), RandomImportance(seed=4)(gated_mlp())
    assert torch.equal(r1["0.norm.gate"], r2["0.norm.gate"])


# ------------------------------------------------------------------------------------------------------------------
# Integration: scores -> keep masks -> fix_gates_ -> convert
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vit", "resnet"])
@pytest.mark.parametrize("name", ["magnitude", "taylor", "activation", "random"])
def test_scores_to_smaller_timm_model(arch: str, name: str) -> None:
    model = tiny_vit(dims=("neurons", "heads")) if arch == "vit" else tiny_resnet(dims=("channels",))
    data = image_batches(1)
    imp: Importance = IMPORTANCES.get(name)()
    scores = imp(model, data)
    masks = keep_masks(scores, 0.5, scope="layer", round_to=2)
    ds.fix_gates_(model, masks)
    small = ds.convert(model, verify_inputs=data[0][0], atol=1e-8, rtol=1e-8)
    if arch == "vit":
        widths = [b.mlp.fc1.out_features for b in small.blocks]
        assert all(w == 96 for w in widths), widths
    else:
        for fqn, (blk, conv, _) in RESNET_GATES.items():
            n = model.get_submodule(fqn).num_units
            width = small.get_submodule(f"{blk}.{conv}").out_channels
            assert width < n and width % 2 == 0, (fqn, width, n)


def test_layer_gates_close_branches_in_convert() -> None:
    vit = tiny_vit()
    data = image_batches(1)
    scores = {**TaylorImportance()(vit, data), **LayerImportance()(vit, data)}
    masks = keep_masks(scores, 0.25, scope="layer")
    assert sum(int(~masks[k]) for k in masks if "drop_path" in k) == 0  # 0.25 of one unit rounds to 0
    layer_scores = {k: v for k, v in scores.items() if "drop_path" in k}
    masks.update(keep_masks(layer_scores, num_pruned=2))
    ds.fix_gates_(vit, masks)
    small = ds.convert(vit, verify_inputs=data[0][0], atol=1e-8, rtol=1e-8)
    n_params = sum(p.numel() for p in small.parameters())
    assert n_params < sum(p.numel() for p in vit.parameters())
