"""What the commands share: load any model file, its input shape, random inputs, FLOPs and parameter counts."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..report import count_params, count_weights

__all__ = [
    "ModelFile",
    "check_not_input",
    "check_output_file",
    "count_params",
    "count_weights",
    "flops_per_input",
    "is_dynamic",
    "load_model_file",
    "random_inputs",
    "resolve_input_shape",
    "shape_text",
    "with_input_dtype",
    "write_json",
]


@dataclass
class ModelFile:
    """A loaded model file: the model (eval mode) and what its header says.

    Attributes:
        path: The file as the user named it.
        model: ``ds.load`` of a converted file, ``ds.load_gated`` of a gated checkpoint.
        kind: ``"converted"`` or ``"gated"``.
        arch: The architecture spec (``{"library", "name", "kwargs"}``).
        data: The stored input description (``dataset``, ``input_shape``, ...), or None.
    """

    path: str
    model: nn.Module
    kind: str
    arch: dict[str, Any]
    data: dict[str, Any] | None = None


def load_model_file(path: str | os.PathLike) -> ModelFile:
    """Load a converted model or a gated checkpoint, whichever the file's metadata says it holds."""
    from ..convert.io import load, load_gated, read_info

    info = read_info(path)
    model = load_gated(path)[0].eval() if info["kind"] == "gated" else load(path)
    return ModelFile(str(path), model, info["kind"], info["arch"], info["data"])


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def resolve_input_shape(files: Sequence[ModelFile], flag: Sequence[int] | None) -> tuple[tuple[int, ...], str]:
    """The ``(C, H, W)`` to feed, and where it came from: ``--input``, else the files' stored ``input_shape``.

    Raises:
        ConfigError: no file stores one and ``--input`` is not given (a text encoder stores none: its inputs are
            tokens), or two files store different ones.
    """
    if flag is not None:
        return tuple(flag), "--input"
    found: tuple[tuple[int, ...], str] | None = None
    for f in files:
        stored = (f.data or {}).get("input_shape")
        if stored is None:
            continue
        if found is None:
            found = (tuple(stored), f.path)
        elif tuple(stored) != found[0]:
            raise ConfigError(
                f"{f.path}: stores input shape {shape_text(stored)}, {found[1]} stores {shape_text(found[0])}; "
                "pass --input C,H,W"
            )
    text = next((f for f in files if {"distill", "tokenizer"} & set(f.data or {})), None)
    if found is None and text is not None:  # convert.metadata.TEXT_DATA_FIELDS: token inputs, not C,H,W
        raise ConfigError(
            f"{text.path}: a text encoder (tokenizer {text.data.get('tokenizer', '?')}): the command feeds images "
            "(C,H,W); the sentence-embedding run's report.json has its FLOPs and latency"
        )
    if found is None:
        raise ConfigError(
            f"{files[0].path}: no input shape stored in the file (saved without data=..., e.g. by an older "
            "dynsparse); pass --input C,H,W"
        )
    return found[0], f"stored in {found[1]}"


def random_inputs(shape: Sequence[int], n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(n, *shape)`` standard-normal inputs, a different one per row (per-input models decide per row)."""
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def is_dynamic(model: nn.Module) -> bool:
    """Whether the model decides per input (token, channel, neuron or layer gates kept as run-time modules)."""
    from ..gates import InputDependentGate

    plan = getattr(model, "slice_plan", None)
    return bool(getattr(plan, "dynamic", None)) or any(isinstance(m, InputDependentGate) for m in model.modules())


def model_dtype(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


class _CastInput(nn.Module):
    """``model`` run on its input cast to ``dtype``."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.to(self.dtype))


def with_input_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` itself when its dtype is ``dtype``; else ``model`` behind a cast of its input to the model's dtype.

    ``bench`` times models of several dtypes (a bfloat16 file against a float32 one) on one input of ``dtype``.
    """
    own = model_dtype(model)
    return model if own == dtype else _CastInput(model, own).train(model.training)  # restoring keeps its mode


def check_runs(f: ModelFile | tuple[str, nn.Module], x: Tensor, source: str) -> None:
    """Run ``x`` through the model once; a misfit is one error naming the file and where the shape came from."""
    path, model = (f.path, f.model) if isinstance(f, ModelFile) else f
    try:
        with torch.inference_mode():
            model(x)
    except (RuntimeError, AssertionError, ValueError, TypeError, IndexError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"{path}: an input of shape {shape_text(x.shape[1:])} ({source}) does not run through the model "
            f"({first}); pass --input C,H,W"
        ) from None


def flops_per_input(model: nn.Module, inputs: Tensor) -> float:
    """FLOPs of one input: counted once for a static model, the mean over ``inputs`` (each alone) for a dynamic one."""
    from ..flops import count_flops, mean_flops

    return mean_flops(model, inputs) if is_dynamic(model) else float(count_flops(model, inputs[:1]))


def check_output_file(path: str | None, flag: str, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse, before the work is done, an output file that names a directory (the write would fail after it) or
    one of the ``inputs`` (the write would replace a model file read)."""
    if path is not None and os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a directory; name a file (e.g. {os.path.join(path, 'out.json')})")
    if path is not None:
        check_not_input(flag, path, [path], inputs)


def check_not_input(
    flag: str, value: str | os.PathLike, outputs: Sequence[str | os.PathLike], inputs: Sequence[str | os.PathLike]
) -> None:
    """Refuse, before any work, output files that are input files: the write would replace the model read.

    Args:
        flag: The option that names the outputs (``--json``, ``--out``), and ``value`` its value, for the error.
        outputs: The files the command writes.
        inputs: The model files it reads.
    """
    for out in outputs:
        for src in inputs:
            if os.path.exists(out) and os.path.exists(src) and os.path.samefile(out, src):
                what = "is" if Path(out) == Path(value) else "would replace"
                raise ConfigError(f"{flag} {value}: {what} the input file {src}; write the output elsewhere")


def write_json(path: str | None, result: dict[str, Any]) -> None:
    """Write a command's ``result`` to ``path`` (``--json``; nothing when None), atomically, and say so."""
    if path is None:
        return
    from ..atomic import atomic_write

    text = json.dumps(result, indent=1) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {path}")


def build_dense(arch: dict[str, Any], path: str) -> nn.Module:
    """The dense host ``arch`` describes, with random weights (seeded), in eval mode."""
    from ..convert.io import build_host

    torch.manual_seed(0)
    return build_host(arch, source=f"{path}: arch").eval()


def si(n: float) -> str:
    """A count with a k / M / G suffix."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:.0f}"
