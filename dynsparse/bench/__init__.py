"""Measurement helpers: interleaved latency comparisons and FLOPs counts."""

from .latency import LatencyResult, compare_latency

__all__ = ["LatencyResult", "compare_latency"]
