"""Fourth review of classic pruning and importance: regressions for the bugs it found."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynsparse import ConfigError
from dynsparse.prune import LotteryTicket, imp

torch.set_num_threads(1)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 4))


def test_lottery_ticket_refuses_row_scope():
    # scope="row" (added to unstructured_) passed the check and prune_ then pruned nothing at all
    with pytest.raises(ConfigError, match="scope 'row'"):
        LotteryTicket(_mlp(), rate=0.5, scope="row")
    with pytest.raises(ConfigError, match="scope 'row'"):
        imp(_mlp(), lambda model, ticket: None, rounds=1, scope="row")


def test_row_scope_is_exact_with_minus_inf_scores_of_live_weights():
    # a live weight scored -inf tied with the pruned ones and was sorted before a pruned one of a higher index:
    # the pruned one then counted as 'not yet pruned', and the row lost one weight more than asked
    from dynsparse.prune import apply_masks_, sparsity, unstructured_

    m = nn.Sequential(nn.Linear(4, 2))
    apply_masks_(m, {"0.weight": torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0]]).bool()})
    inf = float("inf")
    scores = {"0.weight": torch.tensor([[-inf, 1.0, 2.0, 3.0], [-inf, -inf, 1.0, 2.0]])}
    unstructured_(m, 0.5, scope="row", importance=scores)
    assert (~m[0].weight_mask).sum(1).tolist() == [2, 2]
    assert m[0].weight_mask.tolist() == [[False, False, True, True], [False, True, True, False]]
    assert sparsity(m).overall == 0.5


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_keep_masks_never_reopens_a_closed_unit_with_minus_inf_scores(scope):
    # a closed unit ranked by a -inf score tied with an open unit scored -inf; the open one (higher index) went
    # first, so the closed unit came back open in the result
    from dynsparse.importance import keep_masks

    inf = float("inf")
    scores = {"a.gate": torch.tensor([1.0, 2.0, 3.0, -inf]), "b.gate": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    current = {"a.gate": torch.tensor([False, True, True, True])}
    masks = keep_masks(scores, num_pruned=1, scope=scope, current=current)
    assert masks["a.gate"].tolist() == [False, True, True, True]
    assert masks["b.gate"].tolist() == ([True] * 4 if scope == "global" else [False, True, True, True])
    masks = keep_masks(scores, num_pruned=2, scope=scope, current=current)
    assert masks["a.gate"].tolist() == [False, True, True, False]


def test_keep_masks_global_count_exact_with_minus_inf_scores():
    # gate a's open -inf unit ranked before gate b's closed units: it was chosen and a closed unit of b counted
    # on top, one unit more than asked
    from dynsparse.importance import keep_masks

    inf = float("inf")
    scores = {"a.gate": torch.tensor([1.0, -inf, 3.0]), "b.gate": torch.tensor([5.0, 6.0, 7.0])}
    current = {"b.gate": torch.tensor([False, True, True])}
    masks = keep_masks(scores, num_pruned=1, scope="global", current=current)
    assert masks["a.gate"].all() and masks["b.gate"].tolist() == [False, True, True]


def test_magnitude_importance_reads_the_masked_weight_of_a_pruned_producer():
    # an optimizer with state moves a masked layer's raw weight under its mask (the forward ignores it); the
    # structured MagnitudeImportance read the raw weight, so the drift changed the unit ranking
    import timm

    import dynsparse as ds
    from dynsparse.importance import MagnitudeImportance

    torch.manual_seed(0)
    model = ds.sparsify_(timm.create_model("test_vit", pretrained=False), {"neurons": "fixed"})
    ds.prune.unstructured_(model, 0.5, include="blocks.*.mlp.fc1")
    fc1 = model.blocks[0].mlp.fc1
    before = MagnitudeImportance(p=2)(model)
    with torch.no_grad():
        fc1.weight.add_(torch.where(fc1.weight_mask, 0.0, 5.0))  # what momentum / Adam do under the mask
    after = MagnitudeImportance(p=2)(model)
    assert torch.equal(after["blocks.0.mlp.norm.gate"], before["blocks.0.mlp.norm.gate"])
    expected = fc1.masked_weight().detach().double().pow(2).sum(1).sqrt().float()
    assert torch.allclose(after["blocks.0.mlp.norm.gate"], expected)


def test_gradient_scores_of_a_half_model_do_not_underflow():
    # the scores, computed in float64, were cast back to the weight's dtype: OBD's ½·F·w² of a float16 model
    # underflowed to 0 for most weights, and the pruning then followed the weight order
    import torch.nn.functional as F

    from dynsparse.importance import obd, snip

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).half()
    x, y = torch.randn(32, 256).half(), torch.randint(0, 10, (32,))

    def loss(out, t):
        return F.cross_entropy(out.float(), t)

    s = obd(m, loss, [(x, y)])["0.weight"]
    assert s.dtype == torch.float32
    assert int((s == 0).sum()) == 0
    s = snip(m, loss, (x, y))["0.weight"]  # normalised to sum 1: about 1e-5 each, float16 kept only a few bits
    assert s.dtype == torch.float32 and int((s == 0).sum()) < s.numel() // 100


def test_wanda_scores_of_a_half_model_are_computed_in_float32():
    # |W|·‖X‖ was computed in float16 (the norm cast down to the weight's dtype): rounding ties within a row and
    # an overflow to inf (then NaN at a zero weight) for large activation norms; the reference computes in float32
    from dynsparse.importance import wanda

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 4)).half()
    with torch.no_grad():
        m[0].weight[0, 0] = 0
    x = torch.randn(256, 8).half() * 6000
    s = wanda(m, [x])["0.weight"]
    norm = x.double().pow(2).sum(0).sqrt().float()
    assert s.dtype == torch.float32
    assert torch.equal(s, m[0].weight.detach().float().abs() * norm[None, :])
    assert bool(torch.isfinite(s).all())


def test_movement_scores_of_a_half_model_are_float32():
    # -w ⊙ g was multiplied (and accumulated by the tracker) in float16: small products underflowed to 0
    from dynsparse.importance import MovementTracker, movement

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 8)).half()
    with torch.no_grad():
        m[0].weight.mul_(1e-2)
    tracker = MovementTracker(m)
    (m(torch.randn(4, 64).half()).float().sum() * 1e-4).backward()
    tracker.step()
    w, g = m[0].weight.detach().float(), m[0].weight.grad.float()
    expected = -w * g
    assert bool((expected != 0).all())
    for s in (movement(m)["0.weight"], tracker.scores()["0.weight"]):
        assert s.dtype == torch.float32
        assert torch.equal(s, expected)


@pytest.mark.parametrize("scope", [None, "layer"])
@pytest.mark.parametrize(("fraction", "closed"), [(0.25, 3), (0.5, 6)])
def test_structured_layers_fraction_closes_that_fraction_of_the_branches(scope, fraction, closed):
    # with scope 'layer' (the default) each one-unit branch gate was pruned on its own: {"layers": 0.25} closed
    # no branch and {"layers": 0.5} closed every branch of the model
    import timm

    import dynsparse as ds

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    ds.prune.structured_(model, {"layers": fraction}, importance="random", scope=scope)
    kept = [bool(g.keep_mask().all()) for _, g in ds.named_gates(model)]
    assert len(kept) == 12 and kept.count(False) == closed
