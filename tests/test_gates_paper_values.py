"""Gates and their penalties against numbers worked out by hand from the papers' equations (methods.md 2.15, 2.17),
and the gate contract at extreme parameters (log α = ±1e4) in every floating dtype.

Hand values (defaults β = 2/3, γ = -0.1, ζ = 1.1):

* P(z ≠ 0) at log α = 0 is σ(-β·log(-γ/ζ)) = σ((2/3)·ln 11) = σ(1.59859) = 0.831822;
* the test-time gate σ(log α)·1.2 - 0.1 is 0.5 at log α = 0, 0.8 at ln 3, 0 at -ln 11 and 1 at ln 19 (1.04 clamped);
* with u = 1/2 the training sample is σ(log α / β)·1.2 - 0.1: 0.5 at log α = 0, 0.8 at (2/3)·ln 3 (the 1/β that eval
  does not have);
* the sparse-VD KL k1 - k1·σ(k2 + k3·log α) + ½·log(1 + 1/α) is 0.431239 at log α = 0, 0.025420 at 3, 1.540533 at -2.
"""

from __future__ import annotations

import math

import pytest
import torch
from _gate_helpers import assert_close

from dynsparse.gates import HardConcreteGate, SigmoidGate, TopKGate, make_gate
from dynsparse.gates import functional as F
from dynsparse.regularizers import VariationalGate, kl_approx


def f64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_hard_concrete_hand_values() -> None:
    assert_close(F.hard_concrete_prob_nonzero(f64([0.0])), f64([0.831822]), atol=1e-6, what="P(z != 0) at 0")
    la = f64([0.0, math.log(3.0), -math.log(11.0), math.log(19.0), -1e4, 1e4])
    assert_close(F.hard_concrete_eval(la), f64([0.5, 0.8, 0.0, 1.0, 0.0, 1.0]), atol=1e-12, what="test-time gate")
    gate = HardConcreteGate(3, dtype=torch.float64)  # default init_drop_rate 0.05: log α = ln 19, open
    assert_close(gate.log_alpha, f64([math.log(19.0)] * 3), what="init log α")
    assert gate.eval()().tolist() == [1.0, 1.0, 1.0]


def test_hard_concrete_sample_at_u_one_half_divides_by_beta() -> None:
    """``eps`` just under 1/2 pins ``u`` to 1/2, so the logistic noise is 0 and the sample is deterministic."""
    la = f64([0.0, (2.0 / 3.0) * math.log(3.0), 1e4, -1e4])
    z = F.hard_concrete_sample(la, eps=0.5 - 1e-12)
    assert_close(z, f64([0.5, 0.8, 1.0, 0.0]), atol=1e-9, what="sample at u = 1/2")


def test_sparse_vd_kl_hand_values() -> None:
    assert_close(kl_approx(f64([0.0, 3.0, -2.0])), f64([0.431239, 0.025420, 1.540533]), atol=1e-6, what="KL")
    gate = VariationalGate(3, dtype=torch.float64)
    with torch.no_grad():
        gate.log_alpha.copy_(f64([0.0, 3.0, 3.0 + 1e-9]))
    assert_close(gate.penalty(), f64(0.431239 + 2 * 0.025420), atol=1e-5, what="penalty")
    assert_close(gate.expected_keep(), f64([0.5, 1 / (1 + math.exp(3.0)), 1 / (1 + math.exp(3.0))]), atol=1e-9)
    assert gate.keep_mask().tolist() == [True, True, False], "pruned where log α > 3, kept at 3"


def test_sigmoid_and_topk_hand_values() -> None:
    gate = SigmoidGate(3, temperature=2.0, dtype=torch.float64)
    with torch.no_grad():
        gate.logits.copy_(f64([0.0, 0.1, -0.1]))
    assert gate.eval()().tolist() == [0.0, 1.0, 0.0], "kept where σ(logit/T) > 1/2 strictly"
    gate.train()().sum().backward()
    assert_close(gate.logits.grad[0], f64(0.125), what="straight-through d/dlogit = σ(1-σ)/T = 0.25/2")
    topk = TopKGate(4, k=2)
    with torch.no_grad():
        topk.scores.copy_(torch.tensor([1.0, 3.0, 3.0, 2.0]))
    assert topk.keep_mask().tolist() == [False, True, True, False]
    assert topk.set_k_(1).keep_mask().tolist() == [False, True, False, False], "a tie goes to the lower index"


PARAM = {"hard_concrete": "log_alpha", "sigmoid": "logits", "topk": "scores", "variational": "log_alpha"}


@pytest.mark.parametrize("value", [-1e4, 1e4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", sorted(PARAM))
def test_extreme_parameters_stay_finite_and_consistent(name: str, dtype: torch.dtype, value: float) -> None:
    gate = make_gate(name, 4, dtype=dtype)
    p = getattr(gate, PARAM[name])
    with torch.no_grad():
        p.fill_(value)
    torch.manual_seed(0)
    z = gate.train()()
    (z.sum() + gate.penalty() + gate.expected_keep().sum()).backward()
    assert z.dtype == dtype and torch.isfinite(z).all(), z
    assert torch.isfinite(gate.penalty()) and torch.isfinite(gate.expected_keep()).all()
    assert p.grad is not None and torch.isfinite(p.grad).all(), p.grad
    ev = gate.eval()()
    assert torch.equal(ev, gate.eval()()), "eval is deterministic"
    assert torch.equal(ev > 0, gate.keep_mask()), (ev, gate.keep_mask())
