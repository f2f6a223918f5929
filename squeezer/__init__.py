"""Squeezer: search per-layer compression policies for a PyTorch model under a hardware budget.

The public API, re-exported from the modules that implement it (loaded on first use, so `squeezer --help` stays
instant):

    import squeezer
    result = squeezer.search_policies(model="runs/resnet20.pt", data="digits", budget="macs<=50%", out="runs/r20",
                                      trials=40)
    squeezer.search_policies(model="runs/resnet20.pt", data="digits", out="runs/r20k",
                             search=squeezer.SearchConfig(budget="latency<=60%", trials=40, repair=True),
                             recovery=squeezer.RecoveryConfig(mode="kd", finetune_steps=30), latency="hybrid")
    squeezer.front("runs/r20", x="latency_ms")
    applied = squeezer.apply("runs/r20", trial=result.front[0].number, out="small.pt", onnx="small.onnx")
    small = applied.model  # the compressed nn.Module; applied.measured holds its numbers
    small = squeezer.load("small.pt")  # the same, rebuilt from the base architecture, the policy and saved weights

The search job is `search_policies`, not `search`: `squeezer.search` is the package of searchers, and one name
means one thing. Settings are frozen configs: `SearchConfig`, `RecoveryConfig`, `LatencyConfig`, `PoolConfig`
(and `EvalSettings`, recovery and latency with device and seed). Lower-level pieces: `SearchSpace.from_model`,
`Policy`, `apply_policy`, `Evaluator`, `make_pool`, `Budget`, `run_search`, `StudyResult`.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # jobs (what the CLI runs)
    "train": "squeezer.training", "space": "squeezer.inspection", "search_policies": "squeezer.search_job",
    "front": "squeezer.inspection", "apply": "squeezer.apply_job", "report": "squeezer.inspection",
    "demo": "squeezer.demo_job",
    # building blocks
    "SearchSpace": "squeezer.spaces.space", "SpaceConfig": "squeezer.spaces.knobs",
    "Policy": "squeezer.policies.policy", "apply_policy": "squeezer.policies.apply",
    "export_onnx": "squeezer.policies.export",
    "Evaluator": "squeezer.evaluators.evaluate", "EvalSettings": "squeezer.evaluators.evaluate",
    "RecoveryConfig": "squeezer.evaluators.settings", "LatencyConfig": "squeezer.evaluators.settings",
    "make_pool": "squeezer.evaluators.pool", "PoolConfig": "squeezer.evaluators.pool",
    "Measurement": "squeezer.evaluators.measurement",
    "load_data": "squeezer.datasets", "save_data": "squeezer.datasets",
    "load_model": "squeezer.models", "load": "squeezer.models",
    "Budget": "squeezer.search.budget", "SearchConfig": "squeezer.search.config",
    "run_search": "squeezer.search.study", "StudyResult": "squeezer.search.pareto",
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
