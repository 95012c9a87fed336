"""Smoke tests: the two pruning reproduction scripts run end to end on a few synthetic batches.

The real runs (MNIST / Fashion-MNIST, several seeds) are in ``docs/prune_init.md`` and ``docs/prune_structured.md``;
here only the wiring is checked: every method runs, the result has one finite error per seed.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(errors: dict, keys: set) -> None:
    assert set(errors) == keys
    for key, errs in errors.items():
        assert len(errs) == 1, key
        assert all(math.isfinite(e) and 0.0 <= e <= 1.0 for e in errs), (key, errs)


def test_prune_at_init_runs(capsys):
    bench = _load("prune_at_init")
    threads = torch.get_num_threads()
    try:
        errors = bench.main(["--synthetic", "200", "--epochs", "1", "--seeds", "0", "--sparsities", "0.9"])
    finally:
        torch.set_num_threads(threads)
    _check(errors, {("dense", 0.0)} | {(m, 0.9) for m in bench.METHODS})
    out = capsys.readouterr().out
    assert "| synflow | 90% |" in out and "Kept fraction per layer" in out


def test_taylor_vs_l1_runs(capsys):
    bench = _load("taylor_vs_l1")
    args = ["--synthetic", "256", "--dense-epochs", "1", "--finetune", "1", "--seeds", "0", "--calib", "1"]
    args += ["--every", "1", "--steps", "2", "--iter-calib", "1", "--methods", "l1", "taylor", "taylor-iter"]
    threads = torch.get_num_threads()
    try:
        errors = bench.main(args)
    finally:
        torch.set_num_threads(threads)
    _check(errors, {"dense", "l1", "taylor", "taylor-iter"})
    out = capsys.readouterr().out
    assert "| taylor-iter |" in out and "MFLOPs" in out
