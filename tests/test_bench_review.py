"""Review findings in the measurement helpers and the benchmark scripts (no timings asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dynsparse.bench import compare_latency


def test_compare_latency_restores_each_submodules_training_flag():
    # a model fine-tuned with frozen BatchNorm: restoring only the top-level flag (train(True)) unfroze the norm
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    m[1].eval()
    compare_latency({"m": m, "eval": nn.Linear(4, 4).eval()}, torch.zeros(2, 4), rounds=1, warmup=0)
    assert m.training and m[0].training and not m[1].training, "the frozen BatchNorm must stay in eval mode"


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


class _Parsed(Exception):
    """Raised by the first ``torch.set_num_threads`` call: the script got past its argument parsing."""


def _parse_only(monkeypatch, script: str, argv: list[str]) -> pytest.ExceptionInfo:
    """Run ``benchmarks/<script>.py``'s ``main`` on ``argv`` up to its first ``torch.set_num_threads`` call."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"_bench_{script}", BENCHMARKS / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])

    def parsed(n):
        raise _Parsed

    monkeypatch.setattr(torch, "set_num_threads", parsed)
    with pytest.raises((SystemExit, _Parsed)) as exc:
        mod.main()
    return exc


@pytest.mark.parametrize(
    ("flag", "value"), [("--formats", "channels-last"), ("--formats", "NCHW"), ("--weights", "64x64x3")]
)
def test_conv_gather_refuses_an_unknown_format_or_weight(monkeypatch, capsys, flag, value):
    # "channels-last" (a hyphen) timed the contiguous weights and labelled the rows "channels-last"
    exc = _parse_only(monkeypatch, "conv_gather", [flag, value])
    assert exc.type is SystemExit and exc.value.code == 2
    assert f"argument {flag}: invalid choice: {value!r}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("dynamic", ["--rounds", "-1"]),  # was a ValueError from spread() after the first model was built
        ("dynamic", ["--batches", "0"]),
        ("dynamic", ["--threads", "0"]),  # was a RuntimeError traceback from torch
        ("dynamic", ["--warmup", "-1"]),
        ("dynamic_channels", ["--rounds", "-2"]),
        ("dynamic_channels", ["--batches", "1", "0"]),
        ("dynamic_channels", ["--threads", "0"]),
        ("dynamic_heads", ["--batches", "0"]),
        ("dynamic_heads", ["--rounds", "-1"]),
        ("dynamic_neurons", ["--vit-batches", "0"]),
        ("dynamic_neurons", ["--rounds", "-1"]),
        ("token_layouts", ["--rounds", "0"]),
        ("token_layouts", ["--batch", "0"]),
        ("conv_gather", ["--rounds", "0"]),
        ("conv_gather", ["--reps", "0"]),
        ("block_sparse", ["--rounds", "0"]),
        ("block_sparse", ["--tokens", "0"]),
        ("block_sparse", ["--threads", "0"]),
        ("convert_layers", ["--rounds", "0"]),  # was a StatisticsError after building and converting ResNet-50
        ("convert_layers", ["--batch", "0"]),
        ("knob_curve", ["recipe.yaml", "--run", "run", "--rounds", "0"]),
        ("knob_curve", ["recipe.yaml", "--run", "run", "--threads", "0"]),
        ("minilm_latency", ["plan.json", "--rounds", "0"]),
        ("minilm_latency", ["plan.json", "--threads", "0"]),
    ],
)
def test_timing_scripts_refuse_bad_counts_before_any_work(monkeypatch, capsys, script, argv):
    exc = _parse_only(monkeypatch, script, argv)
    assert exc.type is SystemExit and exc.value.code == 2, "the bad value got past the argument parser"
    flag = next(a for a in argv if a.startswith("--") and a != "--run")
    assert f"argument {flag}: must be at least" in capsys.readouterr().err


@pytest.mark.parametrize(
    "plans", [["runs/a/plan.json", "runs/b/plan.json"], ["dense.json"], ["x/magnitude (uniform).json"]]
)
def test_minilm_latency_refuses_plans_whose_rows_would_collide(monkeypatch, capsys, plans):
    # rows are named by the file's stem: a second plan.json replaced the first, a dense.json the dense reference
    exc = _parse_only(monkeypatch, "minilm_latency", plans)
    assert exc.type is SystemExit and exc.value.code == 2
    assert "the same row name" in capsys.readouterr().err


def test_compare_latency_waits_for_cuda_kernels(monkeypatch):
    """On a CUDA input each timed forward is bracketed by torch.cuda.synchronize (else only launches are timed)."""
    from dynsparse.bench.latency import compare_latency

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))

    class Cuda(torch.Tensor):  # a CPU tensor that reports a CUDA device, so the test runs without a GPU
        @property
        def device(self):
            return torch.device("cuda", 0)

    x = torch.zeros(2, 3).as_subclass(Cuda)
    compare_latency({"a": torch.nn.Identity(), "b": torch.nn.Identity()}, x, rounds=2, warmup=0)
    assert len(calls) == 2 * 2 * 2  # before and after each of 2 models x 2 rounds
