"""Conversion: gates -> a physically smaller static model, its slice plan, save / load / export."""

from .convert import apply_plan, convert, make_plan
from .io import load, load_gated, save, save_gated
from .plan import SlicePlan
from .verify import verify
from .zero import ZeroBranch

__all__ = [
    "SlicePlan",
    "ZeroBranch",
    "apply_plan",
    "convert",
    "load",
    "load_gated",
    "make_plan",
    "save",
    "save_gated",
    "verify",
]
