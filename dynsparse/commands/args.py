"""Argument types and shared options of the ``dynsparse`` command line (no torch import: ``--help`` stays fast)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

__all__ = [
    "add_input_options",
    "fraction_removed",
    "input_shape_arg",
    "int_at_least",
    "nonnegative_float",
    "nonnegative_int",
    "path_arg",
    "positive_int",
]


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``low`` (a bad value is one line naming the option)."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        return n

    parse.__name__ = "positive_int" if low == 1 else f"int_at_least_{low}"
    return parse


#: ``--threads 0`` was silently ignored, ``-1`` a traceback, before every count went through this type.
positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def fraction_removed(text: str) -> float:
    """An argparse type: the fraction of weights or units removed, in [0, 1)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1) (the part removed), got {v}")
    return v


def nonnegative_float(text: str) -> float:
    """An argparse type: a finite number of at least 0 (a tolerance)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {v}")
    return v


def input_shape_arg(text: str) -> tuple[int, int, int]:
    """An argparse type: ``C,H,W`` (or ``CxHxW``), three positive integers."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,32,32), got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers C,H,W (e.g. 3,32,32), got {text!r}")
    return shape  # type: ignore[return-value]


def path_arg(text: str) -> str:
    """An argparse type: a file or directory, a leading ``~`` read as the home directory.

    The shell leaves ``--out=~/x`` (and a quoted ``"~/x"``) as it is; the recipe's ``output_dir`` and
    ``dynsparse train --out`` read ``~`` as the home directory, and so do the file commands.
    """
    return os.path.expanduser(text)


def add_input_options(p: argparse.ArgumentParser, input_help: str, json_help: str) -> None:
    """``--input C,H,W``, ``--flops-inputs N`` and ``--json PATH``, as `bench` and `analyse` take them."""
    p.add_argument("--input", type=input_shape_arg, default=None, metavar="C,H,W", help=input_help)
    p.add_argument(
        "--flops-inputs",
        type=positive_int,
        default=16,
        metavar="N",
        help="distinct random inputs whose FLOPs are averaged for per-input (dynamic) models (default: 16)",
    )
    p.add_argument("--json", type=path_arg, default=None, metavar="PATH", help=json_help)
