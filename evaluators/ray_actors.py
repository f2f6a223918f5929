"""The Ray actor classes of RayPool, kept apart so that importing them never imports Ray (RayPool wraps them
with `ray.remote` itself, and the GPU test machine has no Ray)."""
from __future__ import annotations

import os
from typing import Any

import torch

from squeezer.evaluators.data import DataBundle
from squeezer.evaluators.evaluate import EvalSettings, worker_evaluator
from squeezer.evaluators.latency import LatencyMeter, LatencyResult
from squeezer.evaluators.measurement import EvalFailure, Outcome
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import Policy


class EvalActor:
    """One Evaluator per actor; latency goes to `latency_actor` (a LatencyService) when one is given."""

    def __init__(self, model: torch.nn.Module, data: DataBundle, settings: EvalSettings, threads: int,
                 options: dict[str, Any]) -> None:
        import ray

        torch.set_num_threads(threads)
        options = dict(options)
        service = options.pop("latency_actor", None)
        if service is not None:
            options["latency_fn"] = lambda onnx: ray.get(service.measure.remote(onnx))
            options["hardware"] = ray.get(service.hardware.remote())
        self.evaluator = worker_evaluator(model, data, settings, options)

    def evaluate(self, policy: Policy) -> Outcome:
        if isinstance(self.evaluator, EvalFailure):
            return self.evaluator
        return self.evaluator.evaluate(policy)

    def pid(self) -> int:
        return os.getpid()


class LatencyService:
    """Times ONNX models against the base model's, on whichever node carries the pool's latency resource."""

    def __init__(self, model: torch.nn.Module, data: DataBundle, settings: EvalSettings) -> None:
        import ray

        example = data.example_inputs(1)
        self.meter = LatencyMeter(export_onnx(model.eval(), example), tuple(example.shape),
                                  batch=settings.latency_batch,
                                  threads=settings.latency_threads, warmup=settings.latency_warmup,
                                  runs=settings.latency_runs, reps=settings.latency_reps)
        self.node = ray.get_runtime_context().get_node_id()
        self.calls = 0

    def measure(self, onnx: bytes) -> LatencyResult:
        self.calls += 1
        return self.meter.measure(onnx)

    def hardware(self) -> dict[str, Any]:
        return {**self.meter.hardware(), "ray_node": self.node}

    def count(self) -> int:
        return self.calls
