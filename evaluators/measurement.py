"""What an evaluation returns: measured numbers, or a failure with its reason (a value, never an exception).

The searcher sees only these records, so everything a search decides on must be in them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Union


@dataclass(frozen=True)
class Measurement:
    """Measured quality and cost of one policy applied to one model.

    macs/bops are per sample; size_mb counts weights at their chosen bit widths; latency is the onnxruntime median
    in ms at the evaluator's batch size (None when latency was not asked for); `latency_rel` is latency divided by
    the interleaved reference model's, which survives machine-speed drift.
    """

    accuracy: float
    loss: float
    macs: int
    params: int
    bops: float
    size_mb: float
    latency_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_spread: float | None = None  # relative spread of the median across repetitions
    latency_rel: float | None = None
    latency_source: str = "none"  # "measured", "predicted" or "none"
    latency_predicted: float | None = None  # a timed candidate's latency_rel as the lookup table said before timing
    seconds: float = 0.0
    recovery: str = "bn"  # how accuracy was recovered: none, bn, finetune, kd
    fingerprint: str = ""
    hardware: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        """Flat numbers for storage (Optuna user attrs) and tables. No `latency_predicted` when the evaluator made
        none: merged over a searcher's record, it would hide the searcher's own prediction (a repaired search's)."""
        out = asdict(self)
        out.pop("hardware")
        if out["latency_predicted"] is None:
            out.pop("latency_predicted")
        return out

    @classmethod
    def from_metrics(cls, data: dict[str, Any]) -> "Measurement":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class EvalFailure:
    """A policy that could not be evaluated (cannot be applied, NaN accuracy, worker died twice)."""

    reason: str
    seconds: float = 0.0


Outcome = Union[Measurement, EvalFailure]
