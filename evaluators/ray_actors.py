"""The Ray actor classes of RayPool, kept apart so that importing them never imports Ray (RayPool wraps them
with `ray.remote` itself, and the GPU test machine has no Ray)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from squeezer.evaluators.data import DataBundle
from squeezer.evaluators.evaluate import EvalSettings, worker_evaluator
from squeezer.evaluators.latency import LatencyMeter, LatencyResult
from squeezer.evaluators.measurement import EvalFailure, Outcome
from squeezer.evaluators.settings import LatencyConfig
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import Policy
from squeezer.spaces.space import SearchSpace


class EvalActor:
    """One Evaluator per actor; latency goes to `latency_service` (a LatencyService actor) when one is given."""

    def __init__(self, model: torch.nn.Module, data: DataBundle, settings: EvalSettings, *,
                 space: SearchSpace | None = None, cache_dir: str | Path | None = None, threads: int = 1,
                 latency_service: Any = None) -> None:
        import ray

        torch.set_num_threads(threads)
        latency_fn: Callable[[bytes], LatencyResult] | None = None
        hardware = None
        if latency_service is not None:
            latency_fn = lambda onnx: ray.get(latency_service.measure.remote(onnx))  # noqa: E731
            hardware = ray.get(latency_service.hardware.remote())
        self.evaluator = worker_evaluator(model, data, settings, space=space, cache_dir=cache_dir,
                                          latency_fn=latency_fn, hardware=hardware)

    def evaluate(self, policy: Policy) -> Outcome:
        if isinstance(self.evaluator, EvalFailure):
            return self.evaluator
        return self.evaluator.evaluate(policy)

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        """The Ray node this actor runs on (where its evaluations run)."""
        import ray

        return ray.get_runtime_context().get_node_id()


class LatencyService:
    """Times ONNX models against the base model's, on whichever node carries the pool's latency resource."""

    def __init__(self, model: torch.nn.Module, data: DataBundle, latency: LatencyConfig) -> None:
        import ray

        example = data.example_inputs(1)
        self.meter = LatencyMeter(export_onnx(model.eval(), example), tuple(example.shape), batch=latency.batch,
                                  threads=latency.threads, warmup=latency.warmup, runs=latency.runs,
                                  reps=latency.reps)
        self.node = ray.get_runtime_context().get_node_id()
        self.calls = 0

    def measure(self, onnx: bytes) -> LatencyResult:
        self.calls += 1
        return self.meter.measure(onnx)

    def hardware(self) -> dict[str, Any]:
        return {**self.meter.hardware(), "ray_node": self.node}

    def count(self) -> int:
        return self.calls
