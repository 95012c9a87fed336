"""Tests of the gates: a contract every registered gate meets, then the math of each gate.

The hard-concrete equations are re-implemented here from Louizos, Welling & Kingma (ICLR 2018, section 4
and eq. 13) and methods.md section 2.17, independently of ``dynsparse.gates.functional``, so the two
implementations must agree.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from dynsparse.errors import ConfigError, DynsparseError, GateError
from dynsparse.gates import (
    GATES,
    FixedGate,
    Gate,
    HardConcreteGate,
    InputDependentGate,
    SigmoidGate,
    TopKGate,
    make_gate,
)
from dynsparse.gates import functional as F

GATE_NAMES = GATES.names()
N = 6

# Paper / reference-code constants (AMLab l0_layers.py), written out here rather than imported.
PAPER_BETA = 2.0 / 3.0
PAPER_GAMMA = -0.1
PAPER_ZETA = 1.1
PAPER_EPS = 1e-6


def assert_close(actual: Tensor, expected: Tensor, atol: float = 1e-12, rtol: float = 1e-10, what: str = "") -> None:
    """``torch.testing.assert_close`` with the max-abs difference in the message."""
    if not isinstance(expected, Tensor):
        expected = torch.tensor(expected, dtype=actual.dtype)
    diff = (actual.detach() - expected).abs().max().item() if actual.numel() else 0.0
    torch.testing.assert_close(
        actual.detach(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: max abs diff {diff:.3g}\n{m}"
    )


def _kw_id(kwargs: dict) -> str:
    """Readable test ids for keyword-argument tables (tensors as dtype and shape)."""

    def show(v: object) -> str:
        return f"{v.dtype}{tuple(v.shape)}".replace("torch.", "") if isinstance(v, Tensor) else repr(v)

    return ",".join(f"{k}={show(v)}" for k, v in kwargs.items())


# --------------------------------------------------------------------------------------------------------------
# Contract, parametrized over every registered gate
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=GATE_NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_registry_holds_the_builtin_gates() -> None:
    assert {"hard_concrete", "sigmoid", "topk", "fixed"} <= set(GATE_NAMES)


def test_make_gate_builds_a_gate_of_num_units(name: str) -> None:
    gate = make_gate(name, N)
    assert isinstance(gate, Gate)
    assert gate.num_units == N
    factory = GATES.get(name)
    if isinstance(factory, type):
        assert type(gate) is factory


def test_default_gate_is_open(name: str) -> None:
    gate = make_gate(name, N).eval()
    assert_close(gate(), torch.ones(N), what=f"{name} eval output")
    assert_close(gate.eval_values(), torch.ones(N), what=f"{name} eval_values")
    assert gate.keep_mask().all(), f"{name}: default keep_mask {gate.keep_mask()}"


def test_forward_shape_and_range(name: str) -> None:
    gate = make_gate(name, N)
    for training in (True, False):
        gate.train(training)
        out = gate()
        assert out.shape == (N,), f"{name} training={training}: shape {tuple(out.shape)}"
        assert out.is_floating_point()
        assert torch.isfinite(out).all()
        lo, hi = type(gate).train_range if training else (0.0, 1.0)
        assert ((out >= lo) & (out <= hi)).all(), f"{name} training={training}: {out}"


def test_eval_is_deterministic(name: str) -> None:
    torch.manual_seed(0)
    gate = make_gate(name, N).eval()
    _perturb_(gate)
    first, second = gate(), gate()
    assert torch.equal(first, second), f"{name}: {first} != {second}"
    assert torch.equal(first, gate.eval_values())


def test_keep_mask_is_bool_of_num_units(name: str) -> None:
    gate = make_gate(name, N)
    _perturb_(gate)
    for training in (True, False):
        mask = gate.train(training).keep_mask()
        assert mask.dtype == torch.bool
        assert mask.shape == (N,)
        assert not mask.requires_grad
    # keep_mask does not depend on the mode.
    assert torch.equal(gate.train().keep_mask(), gate.eval().keep_mask())


def test_penalty_is_finite_scalar(name: str) -> None:
    gate = make_gate(name, N)
    for training in (True, False):
        p = gate.train(training).penalty()
        assert isinstance(p, Tensor)
        assert p.dim() == 0, f"{name}: penalty shape {tuple(p.shape)}"
        assert torch.isfinite(p), f"{name}: penalty {p}"
        assert p >= 0


def test_expected_keep_is_a_probability_per_unit(name: str) -> None:
    gate = make_gate(name, N)
    q = gate.expected_keep()
    assert q.shape == (N,)
    assert q.is_floating_point()
    assert ((q >= 0) & (q <= 1)).all(), f"{name}: expected_keep {q}"


def test_every_parameter_gets_finite_gradient(name: str) -> None:
    torch.manual_seed(0)
    gate = make_gate(name, N).train()
    params = dict(gate.named_parameters())
    if not params:
        pytest.skip(f"{name} has no parameters")
    (gate().sum() + gate.penalty()).backward()
    for pname, p in params.items():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert p.grad.shape == p.shape
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} gradient {p.grad}"


def test_dtype_is_kept(name: str) -> None:
    gate = make_gate(name, N, dtype=torch.float64)
    for pname, t in [*gate.named_parameters(), *gate.named_buffers()]:
        if t.is_floating_point():
            assert t.dtype == torch.float64, f"{name}.{pname} is {t.dtype}"
    for training in (True, False):
        gate.train(training)
        assert gate().dtype == torch.float64, f"{name} training={training}"
        assert gate.penalty().dtype == torch.float64
        assert gate.expected_keep().dtype == torch.float64
    assert gate.eval_values().dtype == torch.float64


def test_device_is_kept(name: str) -> None:
    gate = make_gate(name, N, device="meta")
    tensors = [*gate.parameters(), *gate.buffers()]
    assert all(t.device.type == "meta" for t in tensors), f"{name}: {[t.device for t in tensors]}"


def test_state_dict_round_trip(name: str) -> None:
    torch.manual_seed(0)
    src = make_gate(name, N)
    _perturb_(src)
    dst = make_gate(name, N)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.eval().eval_values(), src.eval().eval_values())
    assert torch.equal(dst.keep_mask(), src.keep_mask())
    assert torch.equal(dst.penalty(), src.penalty())


def test_extra_repr_mentions_num_units(name: str) -> None:
    gate = make_gate(name, N)
    assert f"num_units={N}" in gate.extra_repr()
    assert f"num_units={N}" in repr(gate)


@pytest.mark.parametrize("num_units", [0, -1, 2.5, True, None, "4"])
def test_bad_num_units_raise(name: str, num_units: object) -> None:
    with pytest.raises((GateError, ConfigError)):
        make_gate(name, num_units)  # type: ignore[arg-type]


def _perturb_(gate: nn.Module) -> None:
    """Give a gate non-default state: random parameters, and a random mask for mask buffers."""
    with torch.no_grad():
        for p in gate.parameters():
            p.copy_(torch.randn_like(p) * 3)
        for bname, b in gate.named_buffers():
            if b.dtype == torch.bool:
                b.copy_(torch.rand(b.shape) < 0.5)
            elif b.is_floating_point():
                b.copy_(torch.rand_like(b))
            else:  # pragma: no cover - no such buffer today
                raise AssertionError(f"unexpected buffer {bname}")


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
    ],
    ids=_kw_id,
)
def test_hard_concrete_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(GateError, match="HardConcreteGate"):
        HardConcreteGate(3, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Sigmoid gate (straight-through)
# --------------------------------------------------------------------------------------------------------------


def test_sigmoid_train_forward_is_hard_decision() -> None:
    gate = SigmoidGate(6, temperature=2.0, dtype=torch.float64).train()
    logits = torch.tensor([-3.0, -0.2, 0.0, 0.2, 1.0, 5.0], dtype=torch.float64)
    with torch.no_grad():
        gate.logits.copy_(logits)
    hard = (torch.sigmoid(logits / 2.0) > 0.5).double()
    out = gate()
    assert torch.equal(out.detach(), hard), f"{out} != {hard}"
    assert out.requires_grad
    assert torch.equal(gate.eval()(), hard)
    assert gate.keep_mask().tolist() == [False, False, False, True, True, True]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_sigmoid_straight_through_gradient(temperature: float) -> None:
    gate = SigmoidGate(7, temperature=temperature, dtype=torch.float64).train()
    logits = torch.linspace(-3, 3, 7, dtype=torch.float64)
    with torch.no_grad():
        gate.logits.copy_(logits)
    w = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (gate() * w).sum().backward()
    s = torch.sigmoid(logits / temperature)
    assert_close(gate.logits.grad, w * s * (1 - s) / temperature, what="analytic sigmoid'(l/T)/T")
    h = 1e-6
    numeric = (torch.sigmoid((logits + h) / temperature) - torch.sigmoid((logits - h) / temperature)) / (2 * h)
    assert_close(gate.logits.grad, w * numeric, atol=1e-8, rtol=1e-6, what="finite differences")


def test_sigmoid_threshold_and_init_logit() -> None:
    assert SigmoidGate(3, init_logit=2.0, threshold=0.9).keep_mask().tolist() == [False] * 3  # sigmoid(2) = 0.88
    assert SigmoidGate(3, init_logit=2.0, threshold=0.85).keep_mask().tolist() == [True] * 3
    assert SigmoidGate(3, init_logit=-3.0).eval()().tolist() == [0.0] * 3


def test_sigmoid_penalty_is_sum_of_soft() -> None:
    gate = SigmoidGate(4, temperature=2.0, dtype=torch.float64)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([-2.0, 0.0, 1.0, 4.0]))
    soft = torch.sigmoid(gate.logits.detach() / 2.0)
    assert_close(gate.expected_keep(), soft, what="expected_keep")
    assert_close(gate.penalty(), soft.sum(), what="penalty")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"threshold": 0.0},
        {"threshold": 1.0},
        {"threshold": -0.5},
        {"threshold": 1.5},
        {"threshold": float("nan")},
    ],
    ids=_kw_id,
)
def test_sigmoid_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(GateError, match="SigmoidGate"):
        SigmoidGate(3, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Top-k gate
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", range(8))
def test_topk_keeps_exactly_k(k: int) -> None:
    gate = TopKGate(7, k=k)
    scores = torch.randperm(7, generator=torch.Generator().manual_seed(k)).float()
    with torch.no_grad():
        gate.scores.copy_(scores)
    mask = gate.keep_mask()
    assert int(mask.sum()) == k
    if 0 < k < 7:
        assert scores[mask].min() > scores[~mask].max()
    for training in (True, False):
        assert torch.equal(gate.train(training)().detach(), mask.float())


@pytest.mark.parametrize(
    ("n", "keep", "k"),
    [
        (10, 1.0, 10),
        (10, 0.0, 0),
        (10, 0.5, 5),
        (10, 0.24, 2),
        (10, 0.25, 3),  # 2.5 rounds half up
        (5, 0.5, 3),  # 2.5 rounds half up
        (4, 0.625, 3),  # 2.5 rounds half up
        (7, 0.5, 4),  # 3.5
        (10, 0.01, 1),  # at least one when keep > 0
        (3, 1e-9, 1),
        (1, 0.4, 1),
    ],
)
def test_topk_keep_ratio_rounding(n: int, keep: float, k: int) -> None:
    gate = TopKGate(n, keep=keep)
    assert gate.k == k
    assert int(gate.keep_mask().sum()) == k


def test_topk_ties_go_to_lower_index() -> None:
    assert TopKGate(5, k=3).keep_mask().tolist() == [True, True, True, False, False]
    gate = TopKGate(5, k=2)
    with torch.no_grad():
        gate.scores.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))
    assert gate.keep_mask().tolist() == [True, False, True, False, False]
    gate.set_k_(k=4)
    assert gate.keep_mask().tolist() == [True, True, True, False, True]


@settings(max_examples=60, deadline=None)
@given(scores=st.lists(st.integers(-2, 2), min_size=1, max_size=12), data=st.data())
def test_topk_mask_property(scores: list[int], data: st.DataObject) -> None:
    k = data.draw(st.integers(0, len(scores)))
    mask = F.topk_mask(torch.tensor(scores, dtype=torch.float64), k).tolist()
    assert sum(mask) == k
    for j, kept in enumerate(mask):
        for i, dropped in enumerate(mask):
            if kept and not dropped:
                assert scores[j] > scores[i] or (scores[j] == scores[i] and j < i), (scores, k, mask)


def test_topk_straight_through_gradient_reaches_scores() -> None:
    gate = TopKGate(5, k=2, dtype=torch.float64).train()
    scores = torch.tensor([0.3, -1.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        gate.scores.copy_(scores)
    out = gate()
    assert out.detach().tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]
    w = torch.arange(1.0, 6.0, dtype=torch.float64)
    (out * w).sum().backward()
    s = torch.sigmoid(scores)
    assert_close(gate.scores.grad, w * s * (1 - s), what="d topk / d scores")
    assert (gate.scores.grad != 0).all()


def test_topk_set_k_() -> None:
    gate = TopKGate(6)
    assert gate.k == 6
    assert gate.set_k_(k=2) is gate
    assert gate.k == 2 and int(gate.keep_mask().sum()) == 2
    assert gate.set_k_(keep=0.5).k == 3
    assert gate.set_k_(k=0).keep_mask().tolist() == [False] * 6
    assert gate.set_k_().k == 6  # neither: back to open
    with pytest.raises(GateError):
        gate.set_k_(k=7)
    with pytest.raises(GateError):
        gate.set_k_(k=1, keep=0.5)
    assert gate.k == 6, "a failed set_k_ must not change k"
    assert "k=6" in repr(gate)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": 2, "keep": 0.5},
        {"k": -1},
        {"k": 7},
        {"k": 2.0},
        {"k": True},  # a bool is not a count, as for num_units
        {"keep": -0.1},
        {"keep": 1.1},
        {"keep": float("nan")},
    ],
    ids=_kw_id,
)
def test_topk_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(GateError, match="TopKGate"):
        TopKGate(6, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Fixed gate
# --------------------------------------------------------------------------------------------------------------


def test_fixed_gate_respects_mask_and_values() -> None:
    mask = torch.tensor([True, False, True, False])
    values = torch.tensor([0.5, 2.0, 3.0, 4.0])
    gate = FixedGate(4, mask=mask, values=values)
    expected = torch.tensor([0.5, 0.0, 3.0, 0.0])
    for training in (True, False):
        assert torch.equal(gate.train(training)(), expected)
    assert torch.equal(gate.keep_mask(), mask)
    gate.keep_mask()[0] = False
    assert gate.keep_mask()[0], "keep_mask must return a copy"
    assert list(gate.parameters()) == []
    assert gate.penalty().item() == 0.0
    assert "kept=2" in repr(gate)


def test_fixed_gate_mask_only_and_list_mask() -> None:
    gate = FixedGate(3, mask=[True, False, True])
    assert gate().tolist() == [1.0, 0.0, 1.0]
    assert gate.expected_keep().tolist() == [1.0, 0.0, 1.0]


def test_fixed_gate_state_dict() -> None:
    gate = FixedGate(3, mask=torch.tensor([False, True, True]), values=torch.tensor([1.0, 0.5, 0.25]))
    sd = gate.state_dict()
    assert set(sd) == {"mask", "values"}
    fresh = FixedGate(3)
    fresh.load_state_dict(sd)
    assert fresh.keep_mask().tolist() == [False, True, True]
    assert fresh().tolist() == [0.0, 0.5, 0.25]


def test_fixed_gate_values_dtype() -> None:
    gate = FixedGate(2, values=torch.tensor([0.5, 1.0]), dtype=torch.float64)
    assert gate.values.dtype == torch.float64
    assert gate().dtype == torch.float64
    assert gate.mask.dtype == torch.bool


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask": torch.ones(4, dtype=torch.bool)},
        {"mask": torch.ones(3, 1, dtype=torch.bool)},
        {"mask": torch.tensor(True)},
        {"mask": torch.tensor([1, 0, 1])},
        {"mask": torch.tensor([1.0, 0.0, 1.0])},
        {"values": torch.ones(4)},
        {"values": torch.tensor([1, 2, 3])},
    ],
    ids=_kw_id,
)
def test_fixed_gate_bad_mask_or_values_raise(kwargs: dict) -> None:
    with pytest.raises(GateError, match="FixedGate"):
        FixedGate(3, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# make_gate specs
# --------------------------------------------------------------------------------------------------------------


def test_make_gate_mapping_spec() -> None:
    spec = {"gate": "sigmoid", "temperature": 2.0}
    gate = make_gate(spec, 4, dtype=torch.float64)
    assert isinstance(gate, SigmoidGate)
    assert gate.temperature == 2.0
    assert gate.logits.dtype == torch.float64
    assert spec == {"gate": "sigmoid", "temperature": 2.0}, "make_gate must not mutate the spec"


def test_make_gate_callable_factory() -> None:
    calls = []

    def factory(num_units: int, device=None, dtype=None) -> Gate:
        calls.append((num_units, device, dtype))
        return FixedGate(num_units, mask=torch.arange(num_units) % 2 == 0, device=device, dtype=dtype)

    gate = make_gate(factory, 4, dtype=torch.float64)
    assert calls == [(4, None, torch.float64)]
    assert gate.keep_mask().tolist() == [True, False, True, False]
    partial = make_gate(functools.partial(SigmoidGate, temperature=3.0), 2)
    assert isinstance(partial, SigmoidGate) and partial.temperature == 3.0
    assert isinstance(make_gate(TopKGate, 3, k=1), TopKGate)


def test_make_gate_forwards_kwargs() -> None:
    assert make_gate("topk", 8, keep=0.25).k == 2
    assert make_gate("hard_concrete", 3, init_drop_rate=0.5).log_alpha.abs().max().item() == 0.0


def test_make_gate_bad_kwargs_name_the_gate() -> None:
    with pytest.raises(ConfigError, match="sigmoid") as info:
        make_gate({"gate": "sigmoid", "temprature": 2.0}, 4)
    assert "temprature" in str(info.value)
    with pytest.raises(ConfigError, match="topk"):
        make_gate("topk", 4, bogus=1)


def test_make_gate_mapping_without_gate_raises() -> None:
    with pytest.raises(ConfigError, match="gate"):
        make_gate({"temperature": 2.0}, 4)


def test_make_gate_unknown_name_suggests() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'hard_concrete'"):
        make_gate("hard_concret", 4)
    with pytest.raises(ConfigError, match="Did you mean 'sigmoid'"):
        make_gate({"gate": "sigmod"}, 4)


def test_make_gate_bad_spec_types_raise() -> None:
    with pytest.raises(ConfigError):
        make_gate(3, 4)  # type: ignore[arg-type]
    with pytest.raises(GateError, match="not a Gate"):
        make_gate(lambda n, device=None, dtype=None: nn.Identity(), 4)
    with pytest.raises(GateError, match="input-dependent"):
        make_gate(lambda n, device=None, dtype=None: LinearTopKGate(3, n), 4)


def test_make_gate_conflicting_kwargs_raise_config_error() -> None:
    """A mapping spec and a keyword both setting ``temperature``: a DynsparseError, not a raw TypeError."""
    with pytest.raises(ConfigError, match="temperature"):
        make_gate({"gate": "sigmoid", "temperature": 2.0}, 4, temperature=3.0)


# --------------------------------------------------------------------------------------------------------------
# Input-dependent gate base
# --------------------------------------------------------------------------------------------------------------


class LinearTopKGate(InputDependentGate):
    """Keeps, per sample, the ``num_kept()`` units with the highest linear score (straight-through)."""

    def __init__(self, in_features: int, num_units: int, keep: float = 1.0) -> None:
        super().__init__(num_units, keep)
        self.score = nn.Linear(in_features, num_units)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.score(x)  # (B, num_units)
        idx = scores.topk(self.num_kept(), dim=-1).indices
        hard = torch.zeros_like(scores).scatter(-1, idx, 1.0)
        return F.straight_through(hard, torch.sigmoid(scores))


def test_input_dependent_gate_forward_and_budget() -> None:
    torch.manual_seed(0)
    gate = LinearTopKGate(5, 8, keep=0.5)
    x = torch.randn(3, 5)
    out = gate(x)
    assert out.shape == (3, 8)
    assert out.sum(-1).tolist() == [4.0, 4.0, 4.0]
    out.sum().backward()
    assert gate.score.weight.grad is not None and torch.isfinite(gate.score.weight.grad).all()
    assert gate.set_budget_(0.25) is gate
    assert gate.keep == 0.25
    assert gate(x).sum(-1).tolist() == [2.0, 2.0, 2.0]
    assert not isinstance(gate, Gate)
    assert not hasattr(gate, "keep_mask")


@pytest.mark.parametrize("keep", [0, 0.0, -0.5, 1.5, float("nan"), "0.5", None])
def test_input_dependent_set_budget_validation(keep: object) -> None:
    gate = LinearTopKGate(2, 4, keep=0.5)
    with pytest.raises(GateError, match="LinearTopKGate"):
        gate.set_budget_(keep)  # type: ignore[arg-type]
    assert gate.keep == 0.5, "a failed set_budget_ must not change the budget"
    with pytest.raises(GateError):
        LinearTopKGate(2, 4, keep=keep)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_units", [0, -1, 2.5, True])
def test_input_dependent_bad_num_units(num_units: object) -> None:
    with pytest.raises(GateError):
        LinearTopKGate(2, num_units)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "keep", "kept"),
    [(10, 1.0, 10), (10, 0.3, 3), (10, 0.34, 3), (10, 0.36, 4), (10, 0.01, 1), (3, 0.1, 1), (1, 0.5, 1), (7, 0.5, 4)],
)
def test_input_dependent_num_kept(n: int, keep: float, kept: int) -> None:
    assert LinearTopKGate(2, n, keep=keep).num_kept() == kept


def test_input_dependent_num_kept_rounds_like_topk_gate() -> None:
    """The same keep fraction keeps the same number of units in a dynamic and a static top-k gate (half up)."""
    cases = [(5, 0.5), (10, 0.25), (4, 0.625), (6, 0.75), (10, 0.45), (7, 0.5), (10, 0.3)]
    mismatches = [
        (n, keep, LinearTopKGate(2, n, keep=keep).num_kept(), TopKGate(n, keep=keep).k)
        for n, keep in cases
        if LinearTopKGate(2, n, keep=keep).num_kept() != TopKGate(n, keep=keep).k
    ]
    assert not mismatches, "(num_units, keep, InputDependentGate.num_kept(), TopKGate.k): " + repr(mismatches)


def test_input_dependent_penalty_and_repr() -> None:
    gate = LinearTopKGate(2, 4, keep=0.5)
    p = gate.penalty()
    assert p.dim() == 0 and p.item() == 0.0
    assert "num_units=4" in repr(gate) and "keep=0.5" in repr(gate)


def test_errors_are_dynsparse_errors() -> None:
    assert issubclass(GateError, DynsparseError) and issubclass(GateError, ValueError)
    assert issubclass(ConfigError, DynsparseError) and issubclass(ConfigError, ValueError)
