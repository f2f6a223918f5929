"""Hard limits a compressed model must meet, parsed from one short string.

`Budget.parse("macs<=50%,latency<=2.5ms")`: a relative limit (%) is a fraction of the base model's measurement, an
absolute one is in the metric's unit. `constraint_values` follows Optuna's convention (<= 0 when feasible) so a
sampler's `constraints_func` is one line. Predicted checks (`predicted_constraints`) use `SearchSpace.predict`
scaled to the base measurement, so repair, the RL agent's action wall and the reachability check agree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from squeezer.evaluators.measurement import Measurement
from squeezer.search.metrics import METRICS, cost_field
from squeezer.spaces.space import Cost, SearchSpace

__all__ = ["Budget", "Limit", "BudgetError", "METRICS", "metric_value", "predicted_fraction"]

FORMS = ("budget must look like 'macs<=50%,latency<=2.5ms,size<=1.2MB': metrics macs, params, bops "
         "(N, NK, NM, NG or N%), size (NMB, NKB or N%), latency (Nms or N%)")

_COUNT = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_UNITS: dict[str, dict[str, float]] = {
    "macs": _COUNT, "params": _COUNT, "bops": _COUNT,
    "size": {"mb": 1.0, "kb": 1e-3, "gb": 1e3, "b": 1e-6},
    "latency": {"ms": 1.0, "s": 1e3, "us": 1e-3},
}
_ITEM = re.compile(r"^\s*([a-z_]+)\s*(<=|<)\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z%]*)\s*$")


class BudgetError(ValueError):
    """A budget that cannot be parsed or met; the message is one line naming the fix."""


@dataclass(frozen=True)
class Limit:
    """One limit: `metric` <= `value` (a fraction of the base when `relative`, else in the metric's unit)."""

    metric: str
    value: float
    relative: bool
    text: str

    def limit_for(self, base: Measurement | None) -> float:
        """The limit in the metric's absolute unit (needs the base measurement for a relative limit)."""
        if not self.relative:
            return self.value
        if base is None:
            raise BudgetError(f"budget {self.text} is relative: a base measurement is needed")
        ref = metric_value(base, self.metric)
        if ref is None:
            raise BudgetError(f"budget {self.text} is relative but the base model has no {self.metric} measured: "
                              "measure it or give an absolute limit")
        return self.value * ref


@dataclass(frozen=True)
class Budget:
    """Limits that must all hold; an empty budget accepts everything."""

    limits: tuple[Limit, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> "Budget":
        """Parse 'metric<=value[unit],...'; raises BudgetError (one line) on anything else."""
        if text is None or not str(text).strip():
            return cls(())
        if not isinstance(text, str):
            raise BudgetError(FORMS)
        limits, seen = [], set()
        for part in text.split(","):
            m = _ITEM.match(part.lower())
            if not m:
                raise BudgetError(f"cannot read {part.strip()!r}: {FORMS}")
            metric, _, number, unit = m.groups()
            if metric not in METRICS:
                raise BudgetError(f"unknown metric {metric!r}: {FORMS}")
            if metric in seen:
                raise BudgetError(f"metric {metric!r} is limited twice: keep one limit per metric")
            seen.add(metric)
            value = float(number)
            if unit == "%":
                if not 0 < value <= 1000:
                    raise BudgetError(f"{part.strip()!r}: a relative limit must be above 0%: {FORMS}")
                limits.append(Limit(metric, value / 100.0, True, f"{metric}<={number}%"))
                continue
            scale = _UNITS[metric].get(unit)
            if scale is None or value <= 0:
                raise BudgetError(f"cannot read {part.strip()!r}: {FORMS}")
            shown = unit if metric == "latency" else unit.upper()
            limits.append(Limit(metric, value * scale, False, f"{metric}<={number}{shown}"))
        return cls(tuple(limits))

    def __str__(self) -> str:
        return ",".join(lim.text for lim in self.limits)

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(lim.metric for lim in self.limits)

    # ---- measured --------------------------------------------------------------------------------------------
    def constraint_values(self, measurement: Measurement, base: Measurement | None = None) -> list[float]:
        """Per limit, (value - limit) / limit: <= 0 when met (Optuna's convention), scale-free across metrics.

        A relative latency limit reads `latency_rel`: the candidate timed interleaved with the base model itself,
        which machine drift does not move, where medians taken minutes apart do (on this 2-core VM a policy measured
        0.883 of the base that way and 0.905 by the medians). A latency limit on a measurement without latency falls
        back to the MACs ratio against the base (the same proxy repair uses), so a run without latency timing still
        has a defined constraint.
        """
        out = []
        for lim in self.limits:
            timed = _timed_rel(measurement, lim.metric)
            if lim.relative and timed is not None:
                out.append((timed - lim.value) / lim.value)
                continue
            value = metric_value(measurement, lim.metric)
            if value is None:
                value = _latency_proxy(measurement, base)
            if value is None:
                out.append(1.0)  # cannot tell: treat as violated rather than silently feasible
                continue
            limit = lim.limit_for(base)
            out.append((float(value) - limit) / limit)
        return out

    def is_feasible(self, measurement: Measurement, base: Measurement | None = None) -> bool:
        return all(v <= 0 for v in self.constraint_values(measurement, base))

    # ---- predicted from shapes -------------------------------------------------------------------------------
    def predicted_constraints(self, space: SearchSpace, base: Measurement, cost: Cost,
                              *, baseline: Cost | None = None, latency_rel: float | None = None) -> list[float]:
        """Constraint values predicted from `space.predict`, scaled to `base`. Latency is `latency_rel` (a prediction
        relative to the base, e.g. from the latency lookup table) when given, else its MACs proxy."""
        baseline = baseline or space.baseline()
        out = []
        for lim in self.limits:
            if lim.metric == "latency" and latency_rel is not None:
                frac = float(latency_rel)
            else:
                frac = predicted_fraction(lim.metric, cost, baseline)
            if lim.relative:
                out.append((frac - lim.value) / lim.value)
                continue
            ref = metric_value(base, lim.metric)
            if ref is None:  # absolute latency with no base latency: MACs cannot say; let the evaluator judge
                out.append(-1.0)
                continue
            out.append((frac * ref - lim.value) / lim.value)
        return out

    def check_reachable(self, space: SearchSpace, base: Measurement, *,
                        measure: Callable[[Any], Measurement | Any] | None = None) -> None:
        """Raise BudgetError if even the cheapest policy of `space` misses a limit.

        The cheapest policy is computed per metric (all prune at max, rank/block/bits at their cheapest). Latency
        is judged by `measure(policy)` when given (an evaluator), else by the MACs proxy.
        """
        from squeezer.search.shrink import cheapest_policy

        baseline = space.baseline()
        for lim in self.limits:
            policy = cheapest_policy(space, "macs" if lim.metric == "latency" else lim.metric)
            cost = space.predict(policy.layers)
            frac = predicted_fraction(lim.metric, cost, baseline)
            ref = metric_value(base, lim.metric)
            reached = frac * ref if ref is not None else None
            if lim.metric == "latency" and measure is not None:
                got = measure(policy)
                if isinstance(got, Measurement) and got.latency_ms is not None:
                    reached = got.latency_ms
                    frac = reached / ref if ref else frac
            ok = frac <= lim.value if lim.relative else (reached is None or reached <= lim.value)
            if not ok:
                shown = f"{100 * frac:.3g}%" + (f" ({_fmt(lim.metric, reached)})" if reached is not None else "")
                raise BudgetError(f"budget {lim.text} is unreachable: the cheapest policy in this space reaches "
                                  f"{shown}; loosen the limit or widen the space (more knobs, or a smaller "
                                  f"--channel-round than {space.config.round_to})")


def metric_value(m: Measurement, metric: str) -> float | None:
    """The measured value of a budget metric (None when it was not measured)."""
    value = getattr(m, METRICS[metric][0])
    return None if value is None else float(value)


def predicted_fraction(metric: str, cost: Cost, baseline: Cost) -> float:
    """Predicted value / unchanged model's for `metric`; latency uses MACs as its proxy."""
    field = cost_field(metric)
    ref = float(getattr(baseline, field)) or 1.0
    return float(getattr(cost, field)) / ref


def cost_fraction(measurement: Measurement, base: Measurement, metric: str) -> float:
    """Measured metric / base's. Latency is `latency_rel` where timed (against the base itself, see
    `constraint_values`), and falls back to the MACs ratio when either side lacks latency."""
    timed = _timed_rel(measurement, metric)
    if timed is not None:
        return timed
    value, ref = metric_value(measurement, metric), metric_value(base, metric)
    if metric == "latency" and (value is None or not ref):
        value, ref = float(measurement.macs), float(base.macs)
    if value is None or not ref:
        return 1.0
    return value / ref


def _timed_rel(m: Measurement, metric: str) -> float | None:
    """Latency as timed interleaved with the base model itself (`latency_rel`), where there is one: machine drift
    does not move it, where it moves medians taken minutes apart."""
    return float(m.latency_rel) if metric == "latency" and m.latency_rel is not None else None


def _latency_proxy(m: Measurement, base: Measurement | None) -> float | None:
    if base is None or base.latency_ms is None or not base.macs:
        return None
    return base.latency_ms * m.macs / base.macs


def _fmt(metric: str, value: float) -> str:
    if metric == "latency":
        return f"{value:.3g} ms"
    if metric == "size":
        return f"{value:.3g} MB"
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{suffix} {metric.upper() if metric != 'params' else 'params'}"
    return f"{value:.3g} {metric}"
