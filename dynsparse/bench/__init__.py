"""Measurement helpers: interleaved latency comparisons and FLOPs counts."""

from .knob import KnobCurve, KnobPoint, knob_curve
from .latency import LatencyResult, compare_latency

__all__ = ["KnobCurve", "KnobPoint", "LatencyResult", "compare_latency", "knob_curve"]
