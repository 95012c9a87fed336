"""Bad arguments to the measurement helpers raise a `ConfigError` naming the argument, before anything runs."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import dynsparse as ds
from dynsparse.bench import compare_latency, knob_curve
from dynsparse.errors import ConfigError
from dynsparse.flops import CostModel, mean_flops

torch.set_num_threads(1)


def _pair():
    m = ds.sparsify_(timm.create_model("test_vit", pretrained=False, img_size=32), {"tokens": {"blocks": [0]}})
    return m.eval(), timm.create_model("test_vit", pretrained=False, img_size=32).eval()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"batch_sizes": []}, "batch_sizes must be a non-empty sequence"),
        ({"batch_sizes": [0]}, "batch_sizes must be ints >= 1, got 0"),
        ({"batch_sizes": [-1]}, "batch_sizes must be ints >= 1, got -1"),  # was x[:-1], reported as batch -1
        ({"batch_sizes": [2.5]}, "batch_sizes must be ints >= 1, got 2.5"),
        ({"batch_sizes": [True]}, "batch_sizes must be ints >= 1, got True"),
        ({"batch_sizes": [1, 1]}, "batch_sizes repeats"),
        ({"keeps": []}, "keeps must be a non-empty sequence"),
        ({"keeps": "0.5"}, "keeps must be a non-empty sequence"),
        ({"rounds": 0}, "rounds must be an int >= 1"),
        ({"threads": 0}, "threads must be an int >= 1"),
        ({"flops_images": 0}, "flops_images must be an int >= 1"),  # was silently 1
        ({"flops_images": -3}, "flops_images must be an int >= 1"),
        ({"x": torch.zeros(0, 3, 32, 32)}, "x has 0 inputs"),
        ({"x": torch.tensor(1.0)}, "x must be a batch"),
        ({"batch_sizes": [8]}, "x has 4 inputs, fewer than the largest batch size 8"),
    ],
)
def test_knob_curve_refuses_bad_arguments_and_names_them(kw, match):
    model, dense = _pair()
    before = ds.get_budget(model)
    calls = []
    args = {"keeps": [0.5], "batch_sizes": [1], "rounds": 1, "x": torch.randn(4, 3, 32, 32), **kw}
    x = args.pop("x")
    with pytest.raises(ConfigError, match=f"knob_curve: {match}"):
        knob_curve(model, dense, lambda m: calls.append(m) or 0.0, x, **args)
    assert not calls, "nothing may run before the arguments are checked"
    assert ds.get_budget(model) == before


def test_knob_curve_refuses_a_dense_model_without_flops():
    model, _ = _pair()
    with pytest.raises(ConfigError, match="knob_curve: the dense Identity counts 0 FLOPs"):
        knob_curve(model, nn.Identity(), lambda m: 0.0, torch.randn(2, 3, 32, 32), keeps=[0.5], batch_sizes=[1])


def test_knob_curve_table_and_plot_show_a_learned_threshold_budget(tmp_path):
    # keep=None runs threshold gates on their learned thresholds (set_budget_); the table used to crash on it
    m = ds.sparsify_(
        timm.create_model("test_vit", pretrained=False, img_size=32), {"tokens": {"gate": "threshold", "blocks": [1]}}
    )
    dense = timm.create_model("test_vit", pretrained=False, img_size=32)
    curve = knob_curve(
        m.eval(), dense.eval(), lambda m: 0.0, torch.randn(2, 3, 32, 32), keeps=[None, 1.0], batch_sizes=[1], rounds=1
    )
    rows = curve.table().splitlines()
    assert rows[3].startswith("| learned |") and rows[4].startswith("| 1 |")
    pytest.importorskip("matplotlib", reason="the knob plot needs matplotlib (missing in a stripped install)")
    assert curve.plot(tmp_path / "knob.png").stat().st_size > 0


@pytest.mark.parametrize("images", [torch.zeros(0, 4), torch.tensor(1.0), [torch.zeros(4)]])
def test_mean_flops_refuses_an_empty_or_unbatched_input(images):
    with pytest.raises(ConfigError, match="mean_flops: images must be a non-empty batch"):
        mean_flops(nn.Linear(4, 3), images)


@pytest.mark.parametrize("x", [torch.zeros(0, 2), torch.tensor(1.0)])
def test_compare_latency_refuses_an_empty_batch(x):
    with pytest.raises(ConfigError, match="compare_latency: x must be a non-empty batch"):
        compare_latency({"m": nn.Identity()}, x, rounds=1)


def test_cost_model_refuses_a_model_with_no_cost():
    # an empty example batch counts 0 FLOPs: fraction() used to report 0.0, "everything removed"
    with pytest.raises(ConfigError, match=r"CostModel: Linear counts 0 FLOPs on example_input \(an empty batch\?\)"):
        CostModel(nn.Linear(4, 3), torch.zeros(0, 4))
    with pytest.raises(ConfigError, match="CostModel: ReLU counts 0 parameters"):
        CostModel(nn.ReLU(), kind="params")
    assert CostModel(nn.Linear(4, 3), torch.zeros(1, 4)).fraction() == 1.0


def test_compare_latency_keeps_the_garbage_collector_out_of_timed_forwards():
    import gc

    seen: list[bool] = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(gc.isenabled())
            return x

    assert gc.isenabled()
    compare_latency({"a": Probe(), "b": Probe()}, torch.zeros(1, 2), rounds=3, warmup=1)
    assert seen[:2] == [True, True] and seen[2:] == [False] * 6, "warm-up with gc on, timed forwards with gc off"
    assert gc.isenabled(), "the collector is restored"
