"""Tests of the hard-concrete (L0) gate.

The hard-concrete equations are re-implemented here from Louizos, Welling & Kingma (ICLR 2018, section 4
and eq. 13) and methods.md section 2.17, independently of ``dynsparse.gates.functional``, so the two
implementations must agree.
"""

from __future__ import annotations

import math

import pytest
import torch
from _gate_helpers import _kw_id, assert_close
from torch import Tensor

from dynsparse.errors import GateError
from dynsparse.gates import HardConcreteGate
from dynsparse.gates import functional as F

# Paper / reference-code constants (AMLab l0_layers.py), written out here rather than imported.
PAPER_BETA = 2.0 / 3.0
PAPER_GAMMA = -0.1
PAPER_ZETA = 1.1
PAPER_EPS = 1e-6


# --------------------------------------------------------------------------------------------------------------
# Hard-concrete (L0) gate: the paper's equations, re-implemented
# --------------------------------------------------------------------------------------------------------------


def ref_hc_sample(u: Tensor, log_alpha: Tensor, beta: float, gamma: float, zeta: float) -> Tensor:
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / beta)
    return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)


def ref_hc_prob_nonzero(log_alpha: Tensor, beta: float, gamma: float, zeta: float) -> Tensor:
    """P(z > 0) derived from the logistic CDF: z > 0 iff s > -gamma/(zeta-gamma) iff L > beta*logit(...) - log_alpha."""
    t = -gamma / (zeta - gamma)
    return 1.0 - torch.sigmoid(beta * math.log(t / (1 - t)) - log_alpha)


def ref_hc_prob_one(log_alpha: Tensor, beta: float, gamma: float, zeta: float) -> Tensor:
    """P(z == 1): z == 1 iff s >= (1-gamma)/(zeta-gamma)."""
    t = (1 - gamma) / (zeta - gamma)
    return 1.0 - torch.sigmoid(beta * math.log(t / (1 - t)) - log_alpha)


def ref_hc_eval(log_alpha: Tensor, gamma: float, zeta: float) -> Tensor:
    return torch.clamp(torch.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def _uniform_like(x: Tensor, seed: int, eps: float = PAPER_EPS) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.empty_like(x).uniform_(eps, 1.0 - eps, generator=gen)


def test_hard_concrete_constants_match_paper() -> None:
    assert math.isclose(F.BETA, PAPER_BETA)
    assert math.isclose(F.GAMMA, PAPER_GAMMA)
    assert math.isclose(F.ZETA, PAPER_ZETA)
    assert math.isclose(F.EPS, PAPER_EPS)
    assert F.BETA * math.log(-F.GAMMA / F.ZETA) == pytest.approx(-1.599, abs=1e-3)
    gate = HardConcreteGate(3)
    assert (gate.beta, gate.gamma, gate.zeta, gate.eps) == pytest.approx(
        (PAPER_BETA, PAPER_GAMMA, PAPER_ZETA, PAPER_EPS)
    )
    assert gate.log_alpha_range == pytest.approx((math.log(1e-2), math.log(1e2)))


STRETCHES = pytest.mark.parametrize(
    ("beta", "gamma", "zeta"),
    [(PAPER_BETA, PAPER_GAMMA, PAPER_ZETA), (0.5, -0.2, 1.3), (1.0, -0.05, 1.05)],
    ids=["paper", "wide", "narrow"],
)


@STRETCHES
def test_hard_concrete_sample_matches_paper(beta: float, gamma: float, zeta: float) -> None:
    log_alpha = torch.linspace(-5, 5, 41, dtype=torch.float64).repeat(50, 1)
    z = F.hard_concrete_sample(log_alpha, beta, gamma, zeta, generator=torch.Generator().manual_seed(7))
    expected = ref_hc_sample(_uniform_like(log_alpha, 7), log_alpha, beta, gamma, zeta)
    assert_close(z, expected, what="hard_concrete_sample")


def test_hard_concrete_sample_gradient_matches_paper() -> None:
    log_alpha = torch.linspace(-3, 3, 25, dtype=torch.float64).requires_grad_()
    w = torch.randn(25, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (F.hard_concrete_sample(log_alpha, generator=torch.Generator().manual_seed(3)) * w).sum().backward()
    ref_alpha = log_alpha.detach().clone().requires_grad_()
    u = _uniform_like(ref_alpha, 3)
    (ref_hc_sample(u, ref_alpha, PAPER_BETA, PAPER_GAMMA, PAPER_ZETA) * w).sum().backward()
    assert_close(log_alpha.grad, ref_alpha.grad, what="d sample / d log_alpha")
    assert log_alpha.grad.abs().sum() > 0


def test_hard_concrete_module_sample_matches_functional() -> None:
    gate = HardConcreteGate(9, beta=0.5, gamma=-0.2, zeta=1.3, dtype=torch.float64).train()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-3, 3, 9))
    torch.manual_seed(11)
    z = gate()
    torch.manual_seed(11)
    u = torch.empty_like(gate.log_alpha).uniform_(PAPER_EPS, 1 - PAPER_EPS)
    assert_close(z, ref_hc_sample(u, gate.log_alpha.detach(), 0.5, -0.2, 1.3), what="module train sample")


@STRETCHES
def test_hard_concrete_prob_nonzero_matches_paper(beta: float, gamma: float, zeta: float) -> None:
    log_alpha = torch.linspace(-8, 8, 33, dtype=torch.float64)
    p = F.hard_concrete_prob_nonzero(log_alpha, beta, gamma, zeta)
    assert_close(p, ref_hc_prob_nonzero(log_alpha, beta, gamma, zeta), what="P(z != 0)")
    # The closed form of methods.md 2.17: sigmoid(log_alpha - beta * log(-gamma / zeta)).
    assert_close(p, torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta)), what="closed form")


def test_hard_concrete_eval_has_no_beta() -> None:
    log_alpha = torch.tensor([-4.0, -2.5, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    expected = ref_hc_eval(log_alpha, PAPER_GAMMA, PAPER_ZETA)
    assert_close(F.hard_concrete_eval(log_alpha), expected, what="hard_concrete_eval")
    gate = HardConcreteGate(8, dtype=torch.float64).eval()
    with torch.no_grad():
        gate.log_alpha.copy_(log_alpha)
    assert_close(gate(), expected, what="module eval")
    with_beta = ref_hc_eval(log_alpha / PAPER_BETA, PAPER_GAMMA, PAPER_ZETA)
    assert (gate()[4:7] - with_beta[4:7]).abs().min() > 1e-2, "eval value looks divided by beta"


def test_hard_concrete_keep_mask_is_eval_positive() -> None:
    # eval > 0 iff sigmoid(log_alpha) > -gamma / (zeta - gamma) = 1/12 iff log_alpha > -log(11).
    edge = -math.log(11.0)
    gate = HardConcreteGate(4, dtype=torch.float64)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([edge - 0.5, edge - 1e-6, edge + 1e-6, 0.0], dtype=torch.float64))
    assert gate.keep_mask().tolist() == [False, False, True, True]


def test_hard_concrete_samples_are_rectified() -> None:
    log_alpha = torch.zeros(20_000, dtype=torch.float64)
    z = F.hard_concrete_sample(log_alpha, generator=torch.Generator().manual_seed(0))
    assert ((z >= 0) & (z <= 1)).all()
    assert (z == 0).any(), "no exact zeros: the stretch/clamp is missing"
    assert (z == 1).any(), "no exact ones: the stretch/clamp is missing"
    assert ((z > 0) & (z < 1)).any()


def test_hard_concrete_nonzero_rate_matches_expected_l0() -> None:
    """Empirical P(z != 0) and P(z == 1) over 20000 draws lie within 5 binomial standard errors."""
    draws = 20_000
    levels = torch.arange(-3.0, 3.5, 1.0, dtype=torch.float64)  # -3 .. 3
    log_alpha = levels.repeat(draws, 1)
    z = F.hard_concrete_sample(log_alpha, generator=torch.Generator().manual_seed(1234))
    for observed, p in [
        ((z != 0).double().mean(0), F.hard_concrete_prob_nonzero(levels)),
        ((z == 1).double().mean(0), ref_hc_prob_one(levels, PAPER_BETA, PAPER_GAMMA, PAPER_ZETA)),
    ]:
        se = torch.sqrt(p * (1 - p) / draws)
        assert ((observed - p).abs() <= 5 * se).all(), f"observed {observed}, expected {p}, 5 SE {5 * se}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_hard_concrete_half_precision_rates_match_expected_l0(dtype: torch.dtype) -> None:
    """With a half-precision ``log_alpha`` the draws still follow the distribution whose L0 the penalty computes: the
    uniform noise drawn in bfloat16 (256 values per octave) cut the logistic tails, so at log_alpha = +-3 about 25 %
    too many gates were closed / too few fully open."""
    draws = 200_000
    levels = torch.tensor([-3.0, 3.0], dtype=torch.float64)
    z = F.hard_concrete_sample(levels.to(dtype).repeat(draws, 1), generator=torch.Generator().manual_seed(5))
    assert z.dtype == dtype
    for what, observed, p in [
        ("P(z != 0)", (z != 0).double().mean(0), F.hard_concrete_prob_nonzero(levels)),
        ("P(z == 1)", (z == 1).double().mean(0), ref_hc_prob_one(levels, PAPER_BETA, PAPER_GAMMA, PAPER_ZETA)),
    ]:
        se = torch.sqrt(p * (1 - p) / draws)
        assert ((observed - p).abs() <= 5 * se).all(), f"{what}: observed {observed}, expected {p}, 5 SE {5 * se}"


def test_hard_concrete_gate_open_count_matches_penalty() -> None:
    """The mean number of open gates of HardConcreteGate in training equals penalty() (the expected L0)."""
    gate = HardConcreteGate(7, dtype=torch.float64).train()
    levels = torch.arange(-3.0, 3.5, 1.0, dtype=torch.float64)
    with torch.no_grad():
        gate.log_alpha.copy_(levels)
    p = ref_hc_prob_nonzero(levels, PAPER_BETA, PAPER_GAMMA, PAPER_ZETA)
    assert_close(gate.penalty(), p.sum(), what="penalty vs sum P(z != 0)")
    assert_close(gate.expected_keep(), p, what="expected_keep")

    draws = 20_000
    torch.manual_seed(2024)
    with torch.no_grad():
        open_counts = torch.stack([(gate() != 0).sum() for _ in range(draws)]).double()
    se = math.sqrt(float((p * (1 - p)).sum()) / draws)
    assert abs(open_counts.mean().item() - gate.penalty().item()) <= 5 * se, (
        f"mean open {open_counts.mean().item():.4f}, penalty {gate.penalty().item():.4f}, 5 SE {5 * se:.4f}"
    )


def test_hard_concrete_train_is_stochastic() -> None:
    gate = HardConcreteGate(64, init_drop_rate=0.5).train()
    torch.manual_seed(0)
    assert not torch.equal(gate(), gate())


def test_hard_concrete_penalty_gradient_is_p_one_minus_p() -> None:
    gate = HardConcreteGate(9, dtype=torch.float64)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-4, 4, 9))
    gate.penalty().backward()
    p = ref_hc_prob_nonzero(gate.log_alpha.detach(), PAPER_BETA, PAPER_GAMMA, PAPER_ZETA)
    assert_close(gate.log_alpha.grad, p * (1 - p), what="d penalty / d log_alpha")


@pytest.mark.parametrize("p0", [0.05, 0.2, 0.5, 0.9])
def test_hard_concrete_init_drop_rate(p0: float) -> None:
    gate = HardConcreteGate(5, init_drop_rate=p0, dtype=torch.float64)
    assert_close(
        gate.log_alpha, torch.full((5,), math.log(1 - p0) - math.log(p0), dtype=torch.float64), what="log_alpha init"
    )
    # The drop probability at init is sigmoid(-log_alpha) = p0 (before stretching).
    assert_close(torch.sigmoid(-gate.log_alpha), torch.full((5,), p0, dtype=torch.float64), what="sigmoid(-log_alpha)")


def test_hard_concrete_init_std() -> None:
    torch.manual_seed(0)
    gate = HardConcreteGate(20_000, init_drop_rate=0.5, init_std=0.01, dtype=torch.float64)
    assert abs(gate.log_alpha.mean().item()) < 5 * 0.01 / math.sqrt(20_000)
    assert gate.log_alpha.std().item() == pytest.approx(0.01, rel=0.05)
    gate.reset_parameters()  # re-draws, same distribution
    assert gate.log_alpha.std().item() == pytest.approx(0.01, rel=0.05)


def test_hard_concrete_constrain_clamps_log_alpha() -> None:
    lo, hi = math.log(1e-2), math.log(1e2)
    gate = HardConcreteGate(6, dtype=torch.float64)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-10.0, lo - 1e-3, lo + 1e-3, 0.0, hi + 1e-3, 10.0], dtype=torch.float64))
    assert gate.constrain_() is gate
    assert_close(gate.log_alpha, torch.tensor([lo, lo, lo + 1e-3, 0.0, hi, hi], dtype=torch.float64), what="constrain_")
    custom = HardConcreteGate(2, log_alpha_range=(-1.0, 1.0))
    with torch.no_grad():
        custom.log_alpha.copy_(torch.tensor([-3.0, 3.0]))
    assert custom.constrain_().log_alpha.tolist() == [-1.0, 1.0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"init_drop_rate": 0.0},
        {"init_drop_rate": 1.0},
        {"init_drop_rate": -0.1},
        {"init_drop_rate": 1.5},
        {"init_drop_rate": float("nan")},
        {"gamma": 0.1},
        {"zeta": 0.9},
        {"beta": 0.0},
        {"beta": -1.0},
        {"beta": float("nan")},
        {"eps": 0.5},
        {"eps": -1e-6},
        {"eps": float("nan")},
        {"log_alpha_range": (3.0, -3.0)},
        {"log_alpha_range": (float("nan"), 1.0)},
        {"log_alpha_range": (0.0, 0.0)},
        {"init_std": float("inf")},
    ],
    ids=_kw_id,
)
def test_hard_concrete_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(GateError, match="HardConcreteGate"):
        HardConcreteGate(3, **kwargs)
