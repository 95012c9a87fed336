"""CostModel and the target-sparsity Lagrangian (CoFi): math, gradients, and the controller reaching a target."""

from __future__ import annotations

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse.flops import CostModel, count_flops
from dynsparse.regularizers.budget import TargetSparsity, linear_target

torch.set_num_threads(1)


@pytest.fixture
def vit():
    torch.manual_seed(0)
    m = timm.create_model(
        "vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, depth=2, embed_dim=32, num_heads=2, num_classes=4
    )
    ds.sparsify_(m, {"heads": "hard_concrete", "neurons": "hard_concrete", "layers": "hard_concrete"})
    return m


X = torch.zeros(1, 1, 8, 8)


def test_cost_model_matches_converted_flops(vit):
    masks = {}
    g = torch.Generator().manual_seed(0)
    for fqn, gate in ds.named_gates(vit):
        masks[fqn] = torch.rand(gate.num_units, generator=g) < 0.6 if gate.num_units > 1 else torch.tensor([True])
        masks[fqn][0] = True
    ds.fix_gates_(vit, masks)
    cost = CostModel(vit, X)
    converted = ds.convert(vit)
    assert cost.total == count_flops(vit, X)
    assert cost.fraction() * cost.total == pytest.approx(count_flops(converted, X), rel=1e-6)


def test_expected_fraction_is_the_product_formula(vit):
    cost = CostModel(vit, X)
    with torch.no_grad():
        for _, gate in ds.named_gates(vit):
            gate.log_alpha.uniform_(-2, 2, generator=torch.Generator().manual_seed(1))
    probs = [slot.gate.expected_keep().mean() for _, slot in cost.slots]
    manual = sum(c * torch.prod(torch.stack([probs[i] for i in key])) if key else c for key, c in cost.terms)
    torch.testing.assert_close(cost.expected_fraction(), manual / cost.total)
    # one term per combination of covering gates; the patch embedding and head are covered by none
    assert any(key == () for key, _ in cost.terms)


def test_params_kind_counts_parameters(vit):
    cost = CostModel(vit, kind="params")
    n = sum(p.numel() for name, p in vit.named_parameters() if ".gate." not in name)
    assert cost.total == n and cost.fraction() == pytest.approx(1.0)


def test_lagrangian_value_and_gradient_signs(vit):
    budget = TargetSparsity(vit, target=0.4, warmup_steps=10, example_input=X)
    with torch.no_grad():
        budget.lambda1.fill_(0.5)
        budget.lambda2.fill_(2.0)
    s = budget.expected()
    t = budget.target_at(5)
    assert t == pytest.approx(0.7)
    loss = budget(5)
    torch.testing.assert_close(loss, 0.5 * (s - t) + 2.0 * (s - t) ** 2)
    loss.backward()
    # s > t: the multipliers' gradient is positive (ascent raises them), the gates are pushed to close
    assert budget.lambda1.grad > 0 and budget.lambda2.grad > 0
    g = vit.blocks[0].mlp.norm.gate.log_alpha.grad
    assert torch.all(g > 0)


def test_linear_target_schedule():
    assert linear_target(0, 0.4, 100) == 1.0
    assert linear_target(50, 0.4, 100) == pytest.approx(0.7)
    assert linear_target(100, 0.4, 100) == 0.4 == linear_target(500, 0.4, 100)
    assert linear_target(0, 0.4, 0) == 0.4


def test_controller_reaches_the_target_and_enforce_meets_it(vit):
    budget = TargetSparsity(vit, target=0.4, warmup_steps=50, example_input=X)
    gates = [p for n, p in vit.named_parameters() if ".gate." in n]
    opt = torch.optim.Adam(gates, lr=0.05)
    opt_l = torch.optim.Adam(budget.parameters(), lr=0.05, maximize=True)
    for step in range(250):
        loss = budget(step)
        opt.zero_grad()
        opt_l.zero_grad()
        loss.backward()
        opt.step()
        opt_l.step()
    assert float(budget.expected().detach()) == pytest.approx(0.4, abs=0.03)
    reached = budget.enforce_()
    assert reached <= 0.4 + 1e-9 and reached > 0.3
    assert ds.sparsity_report(vit, X).flops_keep_ratio == pytest.approx(reached)
    assert all(int(g.keep_mask().sum()) >= 1 for _, g in ds.named_gates(vit) if g.num_units > 1)


def test_bad_targets():
    m = timm.create_model("test_vit")
    with pytest.raises(ds.ConfigError, match="no gates"):
        TargetSparsity(m, 0.5)
    ds.sparsify_(m, {"heads": "hard_concrete"})
    with pytest.raises(ds.ConfigError, match=r"\(0, 1\]"):
        TargetSparsity(m, 1.5)


def test_enforce_reopen_refills_what_a_costly_closure_overshot(vit):
    """A branch gate with a low keep probability but a large cost is closed first; ``reopen`` brings back the
    cheaper units closed after it that still fit, so the kept fraction ends closer to (never above) the target."""
    budget = TargetSparsity(vit, target=0.75, example_input=X)
    slots = [slot for _, slot in budget.cost.slots]
    with torch.no_grad():
        for i, slot in enumerate(slots):  # distinct probabilities: branch gates least likely, then unit gates
            la = slot.gate.log_alpha
            la.copy_(torch.linspace(1.0, 3.0, la.numel()) + (0.0 if slot.dimension == "layers" else 4.0) + 0.01 * i)
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    plain = budget.enforce_()
    vit.load_state_dict(state)
    refilled = budget.enforce_(reopen=True)
    assert plain <= 0.75 + 1e-9 and refilled <= 0.75 + 1e-9
    assert refilled > plain + 0.01, (plain, refilled)  # the closure of a branch overshot; reopening refilled
    assert budget.cost.fraction() == pytest.approx(refilled)


@pytest.mark.parametrize("steps", [-1, 2.5, True])
def test_warmup_steps_must_be_a_nonnegative_int(vit, steps):
    with pytest.raises(ds.ConfigError, match="warmup_steps"):
        TargetSparsity(vit, target=0.5, warmup_steps=steps, example_input=X)


@pytest.mark.parametrize(
    "spec",
    [
        "variational",  # dropped where log α > threshold: lowering log α (as for hard-concrete) opened units
        {"gate": "sigmoid", "temperature": 10.0, "threshold": 0.1},  # logit -20 left sigmoid(-2) > 0.1: still open
        {"gate": "hard_concrete", "gamma": -0.9, "zeta": 1.1},  # closed only below logit(0.45): -20 is enough
    ],
    ids=["variational", "sigmoid_t10", "hard_concrete_wide"],
)
def test_enforce_closes_units_of_every_gate_with_a_learned_parameter(spec):
    torch.manual_seed(0)
    m = timm.create_model(
        "vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, depth=2, embed_dim=32, num_heads=2, num_classes=4
    )
    ds.sparsify_(m, {"neurons": spec})
    budget = TargetSparsity(m, target=0.6, example_input=X)
    reached = budget.enforce_()
    assert reached <= 0.6 + 1e-9, reached
    assert budget.cost.fraction() == pytest.approx(reached)
    gates = [g for _, g in ds.named_gates(m)]
    assert all(1 <= int(g.keep_mask().sum()) < g.num_units for g in gates)
    m.eval()
    assert all(torch.equal(g() > 0, g.keep_mask()) for g in gates)
