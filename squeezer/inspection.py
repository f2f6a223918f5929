"""The read-only jobs: a model's search space, a run's Pareto front and its HTML report."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squeezer.datasets import load_data
from squeezer.evaluators.measurement import Measurement
from squeezer.models import resolve_model
from squeezer.plots import write_front_files, write_report
from squeezer.run_folder import RUN_FILE
from squeezer.search.latency_margin import prediction_error
from squeezer.search.pareto import StudyResult
from squeezer.search.records import TrialRecord
from squeezer.search.study_check import holds_trials
from squeezer.search_job import closest_to_budget
from squeezer.spaces.knobs import SpaceConfig
from squeezer.spaces.space import SearchSpace

__all__ = ["FrontSummary", "X_METRICS", "front", "load_result", "report", "space"]


def space(*, model: str, data: str = "digits", knobs: tuple[str, ...] | None = None,
          include: tuple[str, ...] | None = None, exclude: tuple[str, ...] | None = None,
          weights: str | Path | None = None, trust_pickle: bool = False,
          channel_round: int | None = None) -> SearchSpace:
    """The search space of `model` (with `weights`, a state_dict for it) on inputs shaped like `data`'s, optionally
    restricted, with kept channels rounded to `channel_round` (None: the default); a pickled model file only with
    `trust_pickle`."""
    bundle = load_data(data)
    net = resolve_model(model, bundle, weights=weights, trust_pickle=trust_pickle)
    options: dict[str, Any] = {}
    if knobs:
        options["knobs"] = tuple(knobs)  # SpaceConfig names an unknown knob and the known ones
    if include:
        options["include"] = tuple(include)
    if exclude:
        options["exclude"] = tuple(exclude)
    if channel_round is not None:
        options["round_to"] = channel_round
    return SearchSpace.from_model(net, bundle.example_inputs(), SpaceConfig(**options))


X_METRICS = {"macs": "macs", "latency": "latency", "latency_ms": "latency", "size": "size", "size_mb": "size",
             "bops": "bops", "params": "params"}


@dataclass
class FrontSummary:
    out: Path
    base: Measurement | None
    budget: str
    metric_x: str
    front: list[TrialRecord]
    completed: int
    under: str | None = None
    best_under: TrialRecord | None = None
    files: list[Path] = field(default_factory=list)
    closest: dict[str, Any] | None = None  # with no feasible trial: the one nearest the budget (closest_to_budget)
    latency_check: dict[str, float] | None = None  # the latency table's predictions vs the candidates timed


def load_result(run: str | Path) -> Any:
    folder = Path(run)
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist: pass the --out folder of a `squeezer search`")
    if (folder / RUN_FILE).is_file() and not holds_trials(folder, None):
        raise FileNotFoundError(f"run folder {str(run)!r} holds no trial yet (its search stopped before the first): "
                                "run the search again to start it")
    return StudyResult.load(folder)


def front(run: str | Path, *, x: str | None = None, under: str | None = None) -> FrontSummary:
    """The run's Pareto front (accuracy vs `x` as a fraction of the base), written as csv/json/html/png."""
    result = load_result(run)
    if x is not None and x not in X_METRICS:
        raise ValueError(f"unknown cost axis {x!r}: choose from macs, latency_ms, size_mb, bops, params")
    metric_x = X_METRICS[x] if x else result.attrs.get("cost_metric", "macs")
    best = result.best_under(under) if under else None
    files = write_front_files(result, Path(run), metric_x)
    rows = result.front(metric_x)
    closest = None if rows else closest_to_budget(result.rows, result.budget,
                                                  repair=bool(result.attrs.get("settings", {}).get("repair")))
    return FrontSummary(out=Path(run), base=result.base, budget=str(result.budget), metric_x=metric_x,
                        front=rows, completed=len(result.completed()), under=under, best_under=best, files=files,
                        closest=closest, latency_check=prediction_error(result.rows))


def report(run: str | Path, *, trial: int | None = None, x: str | None = None) -> Path:
    """One HTML page about a run: settings, hardware, front, a trial's per-unit policy, accuracy by trial."""
    result = load_result(run)
    if trial is not None and not any(r.number == trial for r in result.completed()):
        raise LookupError(f"trial {trial} is not a finished trial of {str(run)!r}: pick one from "
                          f"`squeezer front {run}`")
    metric_x = X_METRICS.get(x or "", result.attrs.get("cost_metric", "macs"))
    return write_report(result, Path(run), metric_x=metric_x, trial=trial)
