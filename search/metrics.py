"""The budget metrics: which Measurement field measures each, and which Cost field predicts it from shapes.

One map, read by the budget, repair's cheapest policy and the DDPG agent, so they agree on what a metric is.
"""
from __future__ import annotations

__all__ = ["METRICS", "cost_field"]

# metric -> (Measurement field, Cost field or None when only an evaluator can tell)
METRICS: dict[str, tuple[str, str | None]] = {
    "macs": ("macs", "macs"),
    "params": ("params", "params"),
    "bops": ("bops", "bops"),
    "size": ("size_mb", "size_bytes"),
    "latency": ("latency_ms", None),
}


def cost_field(metric: str) -> str:
    """The `Cost` field that predicts `metric` from shapes: its own, or MACs, latency's proxy."""
    return METRICS[metric][1] or "macs"
