"""Second review of the static gates and the regularizers: regressions of the bugs it found."""

from __future__ import annotations

import math

import timm
import torch
from torch import nn

import dynsparse as ds
from dynsparse.gates import CatsGate, HardConcreteGate
from dynsparse.gates import functional as F
from dynsparse.regularizers import BNScaleL1, ExpectedL0, VariationalGate, kl_approx
from dynsparse.regularizers.budget import TargetSparsity

torch.set_num_threads(1)


def test_input_dependent_gate_penalty_is_on_the_device_of_its_buffers() -> None:
    """A gate with buffers and no parameter (CATS) gave a CPU zero: ``ds.penalty`` of a model moved to another
    device then failed to stack it with the other gates' penalties."""
    model = nn.ModuleDict({"hc": HardConcreteGate(4), "cats": CatsGate(4, dim=8)}).to("meta")
    assert model["cats"].penalty().device.type == "meta"
    assert ds.penalty(model).device.type == "meta"


def test_budget_multipliers_keep_growing_on_a_bfloat16_model() -> None:
    """The multipliers took the gates' dtype: in bfloat16 an Adam step of 0.01 is lost once |λ| >= 4, so λ1 and λ2
    stalled at 4 and could no longer push the gates to the target."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, depth=1, embed_dim=16, num_heads=2, num_classes=2
    )
    ds.sparsify_(model, {"neurons": "hard_concrete"}).to(torch.bfloat16)
    budget = TargetSparsity(model, target=0.1, example_input=torch.zeros(1, 1, 8, 8, dtype=torch.bfloat16))
    assert budget.lambda1.dtype == budget.lambda2.dtype == torch.float32
    opt = torch.optim.Adam(budget.parameters(), lr=0.01, maximize=True)
    for _ in range(600):
        opt.zero_grad()
        budget(0).backward()
        opt.step()
    assert budget.lambda1.item() > 5.0 and budget.lambda2.item() > 5.0, (budget.lambda1, budget.lambda2)


def test_variational_gate_float16_penalty_does_not_overflow() -> None:
    """The KL is about 4.6 per unit at the default init: summed in float16 over 15,000 units it was inf."""
    gate = VariationalGate(15_000, dtype=torch.float16)
    p = gate.penalty()
    expected = 15_000 * kl_approx(torch.tensor(-8.0, dtype=torch.float64)).item()
    assert torch.isfinite(p) and abs(p.item() - expected) < 1e-3 * expected, (p, expected)
    p.backward()
    assert gate.log_alpha.grad is not None and torch.isfinite(gate.log_alpha.grad).all()


def test_expected_l0_of_float16_gates_does_not_overflow() -> None:
    """Each gate's expected L0 fits in float16, but their sum over 80,000 open units overflowed to inf."""
    gates = nn.ModuleList([HardConcreteGate(20_000, dtype=torch.float16) for _ in range(4)])
    p0 = F.hard_concrete_prob_nonzero(torch.tensor(math.log(19.0), dtype=torch.float64)).item()
    count = ExpectedL0(gates, normalize=False)()
    assert torch.isfinite(count) and abs(count.item() - 80_000 * p0) < 1e-3 * 80_000, (count, 80_000 * p0)
    fraction = ExpectedL0(gates)()
    assert torch.isfinite(fraction) and abs(fraction.item() - p0) < 1e-3, (fraction, p0)
    fraction.backward()
    assert all(torch.isfinite(g.log_alpha.grad).all() for g in gates)


def test_bn_l1_penalty_of_float16_norms_does_not_overflow() -> None:
    """``Σ |γ|`` over 80,000 float16 channels of scale 1 overflowed to inf."""
    model = nn.Sequential(*[nn.BatchNorm1d(20_000) for _ in range(4)]).half()
    reg = BNScaleL1(model, weight=1e-4, scope="all")
    penalty = reg()
    assert torch.isfinite(penalty) and abs(penalty.item() - 8.0) < 1e-4, penalty
    penalty.backward()
    assert all(torch.isfinite(m.weight.grad).all() for m in model)


def test_penalty_of_float16_gates_is_summed_without_overflow():
    """ds.penalty sums the gates' terms in float32 at least: four float16 gates of 20,000 open units each give an
    expected L0 of about 80,000, past float16's 65,504."""
    model = torch.nn.ModuleDict({f"g{i}": HardConcreteGate(20000, dtype=torch.float16) for i in range(4)})
    total = ds.penalty(model)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    want = sum(float(g.penalty().float()) for g in model.values())
    assert math.isclose(float(total), want, rel_tol=1e-3)
