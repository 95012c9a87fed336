"""What a recipe training step computes: the regularizer schedules, the distillation term, the learning rate."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from dynsparse.recipes.objective import regularizer_loss
from dynsparse.recipes.schema import RegularizerSpec


@pytest.mark.parametrize(
    ("kl_start", "kl_end", "want"),
    [
        (0.0, 0.0, [1.0, 1.0, 1.0, 1.0]),  # no warm-up
        (0.0, 2.0, [0.0, 0.75, 1.0, 1.0]),
        (2.0, 0.0, [0.0, 0.0, 1.0, 1.0]),  # only kl_start: a step there (it was 1 from epoch 0)
        (1.0, 3.0, [0.0, 0.25, 0.5, 1.0]),
    ],
)
def test_sparse_vd_kl_weight_follows_kl_start_and_kl_end(kl_start, kl_end, want):
    from dynsparse.regularizers.variational import sparse_vd_, svd_kl

    model = sparse_vd_(nn.Sequential(nn.Linear(4, 4)))
    spec = RegularizerSpec("sparse_vd", weight=0.5, kl_start=kl_start, kl_end=kl_end)
    got = []
    for epoch in (0.0, 1.5, 2.0, 3.0):
        total, info = regularizer_loss(model, [(spec, None)], epoch, 0, 100, torch.device("cpu"))
        got.append(info["kl_weight"])
        torch.testing.assert_close(total, 0.5 * info["kl_weight"] * svd_kl(model) / 100)
    assert got == want


def _stages(*stages: dict) -> dict:
    return {"name": "t", "model": {"name": "test_vit"}, "data": {"dataset": "digits"}, "stages": list(stages)}


def test_prune_vd_needs_sparse_vd_layers_by_its_stage():
    from dynsparse.recipes import RecipeError, parse_recipe

    vd = {"name": "vd", "epochs": 1, "regularizers": [{"name": "sparse_vd"}]}
    parse_recipe(_stages(vd, {"name": "end", "epochs": 0, "prune_vd": True}))  # layers of an earlier stage
    parse_recipe(_stages({**vd, "prune_vd": True}))
    with pytest.raises(RecipeError, match=r"stages\[1\]\.prune_vd: needs sparse-VD layers"):
        parse_recipe(_stages({**vd, "prune_vd": True}, {"name": "again", "epochs": 1, "prune_vd": True}))


def test_distill_loss_is_kl_teacher_to_student_times_t_squared():
    from dynsparse.recipes.objective import distill_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    T = 3.0
    p_t, log_p_s = (t / T).softmax(-1), (s / T).log_softmax(-1)
    want = T * T * (p_t * (p_t.log() - log_p_s)).sum(-1).mean()  # KL(teacher || student), mean over the batch
    torch.testing.assert_close(distill_loss(s, t, T), want)
    assert float(distill_loss(t, t, T)) == pytest.approx(0.0, abs=1e-12)


def test_lr_factor_warms_up_in_steps_then_decays_over_the_stage():
    from dynsparse.recipes.optimizers import lr_factor
    from dynsparse.recipes.schema import ScheduleSpec

    spec = ScheduleSpec("cosine", warmup_epochs=0.5, min_lr_ratio=0.1)
    f = [lr_factor(spec, step, 40, 10) for step in range(40)]  # 4 epochs of 10 steps: warm-up over 5 steps
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f[5] == 1.0 and all(a >= b for a, b in itertools.pairwise(f[5:]))
    assert 0.1 < f[-1] < 0.11
    lin = ScheduleSpec("linear", min_lr_ratio=0.0)
    assert [lr_factor(lin, s, 4, 2) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
