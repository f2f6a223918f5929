"""Squeezer: search per-layer compression policies for a PyTorch model under a hardware budget.

The public API, re-exported from the packages that implement it (loaded on first use, so `squeezer --help` stays
instant):

    import squeezer
    result = squeezer.search(model="runs/resnet20.pt", data="digits", budget="macs<=50%", out="runs/r20", trials=40)
    squeezer.front("runs/r20", x="latency_ms")
    squeezer.apply("runs/r20", trial=result.front[0]["number"], out="small.pt", onnx="small.onnx")

Lower-level pieces: `SearchSpace.from_model`, `Policy`, `apply_policy`, `Evaluator`, `make_pool`, `Budget`,
`run_search`, `StudyResult`.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # jobs (what the CLI runs)
    "train": "squeezer.search.jobs", "space": "squeezer.search.jobs", "search": "squeezer.search.jobs",
    "front": "squeezer.search.jobs", "apply": "squeezer.search.jobs", "report": "squeezer.search.jobs",
    "demo": "squeezer.search.jobs",
    # building blocks
    "SearchSpace": "squeezer.spaces.space", "SpaceConfig": "squeezer.spaces.knobs",
    "Policy": "squeezer.policies.policy", "apply_policy": "squeezer.policies.apply",
    "export_onnx": "squeezer.policies.export",
    "Evaluator": "squeezer.evaluators.evaluate", "EvalSettings": "squeezer.evaluators.evaluate",
    "make_pool": "squeezer.evaluators.pool", "Measurement": "squeezer.evaluators.measurement",
    "load_data": "squeezer.evaluators.data", "save_data": "squeezer.evaluators.data",
    "load_model": "squeezer.evaluators.zoo",
    "Budget": "squeezer.search.budget", "run_search": "squeezer.search.study", "StudyResult": "squeezer.search.pareto",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'squeezer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
