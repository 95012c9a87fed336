"""Tests of the per-weight scores of `dynsparse.importance`, each against its paper's formula re-derived here.

Magnitude, gradient, Taylor / OBD (methods.md 2.13), SNIP (2.3), GraSP (2.4, against an explicit Hessian from
``torch.autograd.functional.hessian``), SynFlow (2.5, closed form of a linear chain), Wanda (2.23), movement (2.22).
Expected values come from explicit formulas (manual back-prop, reshapes, loops), not from ``dynsparse`` helpers.
Package convention under test: higher score = kept.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _importance_helpers import assert_close, f64, half_sq, no_hooks
from torch import Tensor, nn

from dynsparse.errors import ConfigError
from dynsparse.importance import (
    MovementTracker,
    gradient,
    grasp,
    magnitude,
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


def test_gradient_scores_under_no_grad_equal_the_scores_with_grad() -> None:
    """A pruning script under ``torch.no_grad()`` (or a caller's ``@torch.no_grad``) scored nothing: every gradient
    score raised "element 0 of tensors does not require grad"; TaylorImportance already enabled grad itself."""
    m, data = linear_data()
    x, t = data[0]
    calls = {
        "gradient": lambda: gradient(m, half_sq, data),
        "taylor": lambda: taylor(m, half_sq, data),
        "obd": lambda: obd(m, half_sq, data),
        "snip": lambda: snip(m, half_sq, (x, t)),
        "grasp": lambda: grasp(m, half_sq, (x, t), temperature=2.0),
        "synflow": lambda: synflow(m, (2,)),
    }
    for name, call in calls.items():
        expected = call()
        with torch.no_grad():
            got = call()
        assert_close(got["0.weight"], expected["0.weight"], what=f"{name} under no_grad")
    with torch.no_grad():
        gradient(m, half_sq, data)
        assert not torch.is_grad_enabled()  # the caller's mode is back after the call


def test_the_layers_of_gates_are_not_scored() -> None:
    """Scores -> unstructured_masks -> apply_masks_ on a model with Deja Vu predictors raised 'names no prunable
    weight' at the predictor (unstructured_ never prunes the layers of gates), and the predictor's weights took
    part in the global ranking of SNIP / GraSP / SynFlow."""
    import timm

    import dynsparse as ds
    from dynsparse import prune

    torch.manual_seed(0)
    m = timm.create_model(
        "vit_small_patch16_224", img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=3
    )
    ds.sparsify_(m, {"neurons": {"gate": "dejavu"}})
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    for scores in (magnitude(m), snip(m, F.cross_entropy, (x, y)), synflow(m, (3, 16, 16))):
        assert "blocks.0.mlp.fc1.weight" in scores
        assert not any(".predictor." in k for k in scores), list(scores)
    prune.apply_masks_(m, unstructured_masks(magnitude(m), 0.5))
    assert prune.sparsity(m).overall == pytest.approx(0.5, abs=1e-3)
