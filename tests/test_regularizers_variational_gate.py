"""Tests of the variational gate: registry, gate contract, the eq. 14 KL penalty of Molchanov et al. (2017),
its noise moments, and conversion of a model gated with it.
"""

from __future__ import annotations

import pytest
import torch
from _regularizer_helpers import LOG_ALPHAS, _moments_ok, assert_close, f64, paper_kl, tiny_vit

import dynsparse as ds
from dynsparse.errors import GateError
from dynsparse.gates import GATES, make_gate
from dynsparse.regularizers import VariationalGate

# ----------------------------------------------------------------------------------------------------------------
# Variational gate
# ----------------------------------------------------------------------------------------------------------------


def test_variational_gate_is_registered() -> None:
    assert GATES.get("variational") is VariationalGate
    gate = make_gate("variational", 5, dtype=torch.float64)
    assert type(gate) is VariationalGate and gate.num_units == 5
    assert make_gate({"gate": "variational", "threshold": 2.0}, 3).threshold == 2.0


def test_variational_gate_contract() -> None:
    gate = make_gate("variational", 6).eval()
    assert torch.equal(gate(), torch.ones(6)) and gate.keep_mask().all()
    assert (gate.log_alpha == -8).all()
    for training in (True, False):
        gate.train(training)
        out = gate()
        assert out.shape == (6,) and torch.isfinite(out).all()
        p = gate.penalty()
        assert p.dim() == 0 and torch.isfinite(p) and p >= 0
        q = gate.expected_keep()
        assert q.shape == (6,) and ((q >= 0) & (q <= 1)).all()
        assert gate.keep_mask().dtype == torch.bool and not gate.keep_mask().requires_grad
    gate.train()
    (gate().sum() + gate.penalty()).backward()
    assert torch.isfinite(gate.log_alpha.grad).all() and (gate.log_alpha.grad != 0).all()
    g64 = VariationalGate(3, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in (g64(), g64.eval()(), g64.penalty(), g64.expected_keep()))
    assert VariationalGate(3, device="meta").log_alpha.device.type == "meta"
    src = VariationalGate(4)
    with torch.no_grad():
        src.log_alpha.copy_(torch.tensor([-5.0, 4.0, 0.0, 9.0]))
    dst = VariationalGate(4)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.eval()(), src.eval()()) and torch.equal(dst.penalty(), src.penalty())
    assert "num_units=4" in repr(dst)
    for bad in ({"threshold": float("nan")}, {"init_log_alpha": "x"}, {"log_alpha_range": (1.0, -1.0)}):
        with pytest.raises(GateError, match="VariationalGate"):
            VariationalGate(3, **bad)
    with pytest.raises(GateError):
        make_gate("variational", 0)


def test_variational_gate_equations() -> None:
    la = torch.tensor([*LOG_ALPHAS, 3.0 + 1e-6], dtype=torch.float64)
    gate = VariationalGate(la.numel(), dtype=torch.float64)
    with torch.no_grad():
        gate.log_alpha.copy_(la)
    assert_close(gate.penalty(), f64(sum(paper_kl(v) for v in la.tolist())), what="penalty = Σ KL")
    keep = [v <= 3.0 for v in la.tolist()]
    assert gate.keep_mask().tolist() == keep
    assert gate.eval()().tolist() == [float(k) for k in keep]
    assert_close(gate.expected_keep(), 1 / (1 + la.exp()), what="expected_keep = 1/(1+α)")
    assert gate.constrain_() is gate and gate.log_alpha.max() == 8.0


def test_variational_gate_noise_moments() -> None:
    """Training multiplier z = 1 + sqrt(α)·ε: mean 1, variance α, one draw per unit per forward."""
    la = torch.tensor([-2.0, 0.0, 1.0], dtype=torch.float64)
    gate = VariationalGate(3, dtype=torch.float64).train()
    with torch.no_grad():
        gate.log_alpha.copy_(la)
    torch.manual_seed(0)
    with torch.no_grad():
        z = torch.stack([gate() for _ in range(20_000)])
    _moments_ok(z, torch.ones(3, dtype=torch.float64), la.exp(), "variational gate")


def test_variational_gate_in_a_model_converts() -> None:
    model = tiny_vit(dims=("neurons",), gate="variational", dtype=torch.float32)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    (model(x).sum() + ds.penalty(model)).backward()
    gate = model.blocks[0].mlp.norm.gate
    assert isinstance(gate, VariationalGate) and torch.isfinite(gate.log_alpha.grad).all()
    with torch.no_grad():
        gate.log_alpha[:50] = 5.0
    ds.fix_gates_(model)
    small = ds.convert(model, verify_inputs=x)
    assert small.blocks[0].mlp.fc1.out_features == model.blocks[0].mlp.fc1.out_features - 50
    assert small.blocks[1].mlp.fc1.out_features == model.blocks[1].mlp.fc1.out_features


def test_variational_gate_clips_log_alpha_like_the_reference() -> None:
    """Noise, penalty and expected_keep read clip(log α, -8, 8) (reference ``DenseVarDropOutARD.clip``)."""
    la = torch.tensor([-12.0, -8.0, 0.0, 8.0, 12.0, 30.0], dtype=torch.float64)
    gate = VariationalGate(la.numel(), dtype=torch.float64)
    with torch.no_grad():
        gate.log_alpha.copy_(la)
    clipped = la.clamp(-8.0, 8.0)
    assert_close(gate.penalty(), f64(sum(paper_kl(v) for v in clipped.tolist())), what="penalty = Σ KL(clip)")
    assert_close(gate.expected_keep(), 1 / (1 + clipped.exp()), what="expected_keep = 1/(1+clip(α))")
    gate.train()
    torch.manual_seed(0)
    eps = torch.randn(la.numel(), dtype=torch.float64)
    torch.manual_seed(0)
    assert_close(gate(), 1 + (0.5 * clipped).exp() * eps, what="z = 1 + sqrt(clip(α))·ε")
    (gate().sum() + gate.penalty()).backward()
    g = gate.log_alpha.grad
    # inside (bounds included: the default init -8, or after constrain_()) every gradient; outside, only those
    # that lead back in (a descent step moves log α by -grad)
    assert (g[(la >= -8) & (la <= 8)] != 0).all()
    assert (g[la < -8] <= 0).all() and (g[la > 8] >= 0).all()
    assert gate.eval()().tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], "eval thresholds log α at 3, as before"


def test_variational_gate_penalty_does_not_drive_log_alpha_up_without_bound() -> None:
    # unclipped, the KL gradient never vanishes and Adam (scale-free) moved log α up ~lr per step: 7.5 -> 13+
    gate = VariationalGate(2, dtype=torch.float64).train()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([7.5, 8.0], dtype=torch.float64))
    opt = torch.optim.Adam(gate.parameters(), lr=0.1)
    history = []
    for _ in range(600):
        opt.zero_grad()
        gate.penalty().backward()
        opt.step()
        history.append(gate.log_alpha.detach().clone())
    assert history[-1].max() < 10.0, f"log α drifted to {history[-1].tolist()}"
    assert (history[-1] - history[299]).abs().max() < 1e-3, "log α must settle once past the clip"


def test_bad_ranges_targets_and_epochs_raise_errors_naming_the_argument() -> None:
    from dynsparse.errors import ConfigError
    from dynsparse.regularizers.budget import TargetSparsity
    from dynsparse.regularizers.variational import kl_weight

    for bad in ((1.0, 2.0, 3.0), 8.0, ("a", 1.0)):  # used to raise a bare ValueError / TypeError
        with pytest.raises(GateError, match="VariationalGate: log_alpha_range must be"):
            VariationalGate(3, log_alpha_range=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="kl_weight: epoch must be a finite number"):
        kl_weight(float("nan"))  # gave a NaN KL weight
    model = tiny_vit(dims=("neurons",), gate="hard_concrete", dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"TargetSparsity: target .* got '0.5'"):
        TargetSparsity(model, "0.5", example_input=torch.randn(1, 3, 32, 32))  # type: ignore[arg-type]


def test_a_log_alpha_pushed_below_the_clip_is_not_frozen_there() -> None:
    # the data term alone (KL warm-up) pushed units from the default init -8 to just below it; with clamp's zero
    # gradient outside the range, the KL could never pull them back: open for good, never pruned
    gate = VariationalGate(3, dtype=torch.float64).train()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-8.05, -8.0, 8.05], dtype=torch.float64))
    gate.penalty().backward()
    g = gate.log_alpha.grad
    assert g[0] < 0 and g[1] < 0, f"the KL must pull log α up at and below the lower clip, got {g.tolist()}"
    assert g[2] == 0, "above the upper clip the KL (which pushes up) must not act"
    opt = torch.optim.Adam(gate.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        gate.penalty().backward()
        opt.step()
    assert gate.log_alpha[0] > -8.0, f"log α stayed at {gate.log_alpha[0].item():.3f}, below the clip"
