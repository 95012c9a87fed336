"""The recipe report's latency inputs: distinct test images, so per-input gates see a real batch."""

from __future__ import annotations

import pytest
import torch

from dynsparse.recipes.run import _test_images


def test_latency_batch_is_made_of_distinct_test_images():
    data = [(torch.arange(4.0).view(4, 1, 1, 1) + 10 * i, torch.zeros(4)) for i in range(3)]
    example = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    x = _test_images(data, 10, example)
    assert x.shape == (10, 1, 1, 1) and x.dtype == torch.float64
    assert x.flatten().tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21]
    # fewer images than the batch: cycled, never a single image repeated
    y = _test_images(data[:1], 6, example)
    assert y.flatten().tolist() == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize(
    ("kw", "match"), [({"rounds": 0}, "rounds"), ({"threads": 0}, "threads"), ({"warmup": -1}, "warmup")]
)
def test_compare_latency_refuses_bad_counts(kw, match):
    from dynsparse.bench.latency import compare_latency
    from dynsparse.errors import ConfigError

    with pytest.raises(ConfigError, match=f"compare_latency: {match} must be an int"):
        compare_latency({"m": torch.nn.Identity()}, torch.zeros(1, 2), **kw)


def test_stages_that_share_a_name_are_all_reported():
    """prune / finetune / prune / finetune: four rows (the last record of each stage), in stage order."""
    from dynsparse.recipes.run import _stage_summary, format_report

    names = ["dense", "prune", "finetune", "prune", "finetune"]
    history = [
        {"stage": n, "stage_index": i, "epoch": e, "step": 10 * i + e, "test_acc": 0.5, "time_s": 1.0}
        for i, n in enumerate(names)
        for e in (1, 2)
    ]
    rows = _stage_summary(history)
    assert [(r["stage"], r["stage_index"], r["epoch"]) for r in rows] == [(n, i, 2) for i, n in enumerate(names)]
    assert all("time_s" not in r for r in rows)
    table = format_report(
        {
            "recipe": "r",
            "stages": rows,
            "dense_baseline_test_acc": None,
            "converted_test_acc": 0.5,
            "params": {"dense": 1, "converted": 1, "converted_nonzero": 1},
            "flops": {"dense": 1, "converted": 1},
            "latency": [],
        }
    )
    assert [line.split()[0] for line in table.splitlines()[3:8]] == names


def test_compare_latency_restores_training_flags():
    from dynsparse.bench.latency import compare_latency

    a, b = torch.nn.Linear(2, 2).train(), torch.nn.Linear(2, 2).eval()
    compare_latency({"a": a, "b": b}, torch.zeros(1, 2), rounds=1, warmup=0)
    assert a.training and not b.training


def test_sparsity_report_prints_small_flops_in_thousands():
    from dynsparse.report import _si

    assert _si(59_600_000) == "59.60M" and _si(12_345) == "12.35k"


def test_count_weights_leaves_out_the_layers_of_gates():
    """A token predictor's Linear layers are not the model's weights (pruning never touches them): after pruning
    half the model's weights, half of the counted weights are zero."""
    import timm

    import dynsparse as ds
    from dynsparse.report import count_weights

    model = timm.create_model("test_vit", pretrained=False)
    ds.sparsify_(model, {"tokens": {"gate": "predictor", "blocks": [1], "keep": 0.5}})
    ds.prune.remove_(ds.prune.unstructured_(model, sparsity=0.5, scope="global"))
    total, nonzero = count_weights(model)
    assert nonzero == total - round(0.5 * total)
