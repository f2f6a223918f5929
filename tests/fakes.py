"""A deterministic stand-in evaluator and two small pools, for tests and benchmarks of the search alone.

`FakeEvaluator` scores a policy by a smooth function of what it removes (per-unit sensitivity x damage), with its
cost from `SearchSpace.predict`, so a search's behaviour can be checked in milliseconds and exactly repeated.
"""
from __future__ import annotations

import hashlib
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable

import torch
from torch import nn

from squeezer.evaluators.measurement import EvalFailure, Measurement, Outcome
from squeezer.policies.policy import Policy
from squeezer.spaces.space import SearchSpace

__all__ = ["FakeEvaluator", "InlinePool", "ThreadPool"]


def _sensitivity(name: str) -> float:
    digest = hashlib.sha256(name.encode()).digest()
    return 0.3 + 1.4 * digest[0] / 255.0


class FakeEvaluator:
    """policy -> Measurement: accuracy falls smoothly with pruning, low bits, low rank and block swaps."""

    def __init__(self, space: SearchSpace, *, accuracy: float = 0.98, latency_ms: float = 2.0, delay: float = 0.0,
                 fail_unit: str | None = None) -> None:
        self.space = space
        self.accuracy = accuracy
        self.latency_ms = latency_ms
        self.delay = delay
        self.fail_unit = fail_unit  # policies that prune this unit fail, to exercise EvalFailure
        self.base_cost = space.baseline()

    def __call__(self, policy: Policy) -> Outcome:
        if self.delay:
            time.sleep(self.delay)
        if self.fail_unit and policy.layers.get(self.fail_unit) and policy.layers[self.fail_unit].prune > 0:
            return EvalFailure(f"unit {self.fail_unit} cannot be pruned (fake failure)")
        damage = 0.0
        for name, choice in policy.layers.items():
            d = 1.2 * choice.prune ** 2 + (0.5 if choice.block != "keep" else 0.0) + 0.6 * (1.0 - choice.rank) ** 2
            d += (0.4 * max(0.0, (8 - min(choice.w_bits, 8)) / 6.0) ** 2
                  + 0.3 * max(0.0, (8 - min(choice.a_bits, 8)) / 4))
            damage += _sensitivity(name) * d
        n = max(1, len(self.space.units))
        accuracy = 0.1 + (self.accuracy - 0.1) / (1.0 + 4.0 * damage / n) ** 2
        return self.measure(policy, accuracy)

    def measure(self, policy: Policy, accuracy: float) -> Measurement:
        cost = self.space.predict(policy.layers)
        frac = cost.macs / max(1, self.base_cost.macs)
        return Measurement(accuracy=accuracy, loss=1.0 - accuracy, macs=cost.macs, params=cost.params,
                           bops=cost.bops, size_mb=cost.size_bytes / 1e6,
                           latency_ms=self.latency_ms * (0.25 + 0.75 * frac), latency_source="predicted",
                           recovery="none", fingerprint=self.space.fingerprint, hardware={"machine": "fake"})

    def base(self) -> Measurement:
        return self.measure(Policy(fingerprint=self.space.fingerprint), self.accuracy)


class InlinePool:
    """Evaluates in the calling process, one submission per `wait` (first in, first out)."""

    in_process = True  # the search keeps no more policies in flight than it has workers

    def __init__(self, evaluate: Callable[[Policy], Outcome]) -> None:
        self.evaluate = evaluate
        self.queue: deque[tuple[int, Policy]] = deque()

    def submit(self, key: int, policy: Policy) -> None:
        self.queue.append((key, policy))

    def wait(self, timeout: float | None = None) -> list[tuple[int, Outcome]]:
        if not self.queue:
            return []
        key, policy = self.queue.popleft()
        try:
            return [(key, self.evaluate(policy))]
        except Exception as exc:  # an evaluator bug becomes a recorded failure, as a real pool does
            return [(key, EvalFailure(f"{type(exc).__name__}: {exc}"))]

    def pending(self) -> int:
        return len(self.queue)

    def close(self) -> None:
        self.queue.clear()


class ThreadPool:
    """Evaluates on `workers` threads: enough to exercise several trials in flight."""

    def __init__(self, evaluate: Callable[[Policy], Outcome], *, workers: int = 2) -> None:
        self.evaluate = evaluate
        self.executor = ThreadPoolExecutor(max_workers=workers)
        self.futures: dict[Future, int] = {}

    def submit(self, key: int, policy: Policy) -> None:
        self.futures[self.executor.submit(self.evaluate, policy)] = key

    def wait(self, timeout: float | None = None) -> list[tuple[int, Outcome]]:
        if not self.futures:
            return []
        done, _ = wait(list(self.futures), timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for fut in done:
            key = self.futures.pop(fut)
            exc = fut.exception()
            out.append((key, EvalFailure(f"{type(exc).__name__}: {exc}") if exc else fut.result()))
        return sorted(out, key=lambda kv: kv[0])

    def pending(self) -> int:
        return len(self.futures)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def fake_search(out: str, *, sampler: str = "tpe", trials: int = 12, workers: int = 2, delay: float = 0.0,
                budget: str = "macs<=45%", seed: int = 0, storage: str | None = None, study: str | None = None) -> None:
    """A whole search with the fake evaluator on resnet20/8x8 inputs (the resume test runs and kills this)."""
    import torch

    from squeezer.models import resnet20
    from squeezer.search.config import SearchConfig
    from squeezer.search.study import run_search

    torch.manual_seed(0)
    space = SearchSpace.from_model(resnet20(num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8),
                                   knobs=("prune", "w_bits", "rank"))
    ev = FakeEvaluator(space, delay=delay)
    pool = ThreadPool(ev, workers=workers)
    try:
        config = SearchConfig(budget=budget, sampler=sampler, trials=trials, seed=seed, repair=sampler != "ddpg",
                              storage=storage, study=study)
        run_search(space, pool, ev.base(), out=out, config=config, workers=workers)
    finally:
        pool.close()


class CheapEvaluator:
    """A real but cheap evaluation: apply the policy to a small trained model, recalibrate BN, score on val.

    By default resnet20 trained `steps` steps on the bundled digits (seconds); cost is the space's prediction,
    latency is not measured. Used by the slow end-to-end test and the hypervolume benchmark.
    """

    def __init__(self, *, model: str = "resnet20", data: str = "digits", steps: int = 150, seed: int = 0,
                 knobs: tuple[str, ...] = ("prune",), bn_batches: int = 10) -> None:
        import torch

        from squeezer.datasets import load_data
        from squeezer.evaluators.finetune import FitConfig, evaluate, fit
        from squeezer.models import load_model

        self.data = load_data(data)
        torch.manual_seed(seed)
        self.model = load_model(model, num_classes=self.data.num_classes, in_channels=self.data.in_channels)
        fit(self.model, self.data.train, FitConfig(steps=steps, seed=seed))
        self.model.eval()
        self.space = SearchSpace.from_model(self.model, self.data.example_inputs(), knobs=knobs)
        self.calibration = self.data.calibration(batches=2)
        self.bn_batches, self.seed = bn_batches, seed
        self._memo: dict[str, Any] = {}  # apply_policy's pruning plans for self.model, kept across policies
        self._evaluate = evaluate
        self.accuracy, _ = evaluate(self.model, self.data.val)

    def __call__(self, policy: Policy) -> Outcome:
        from squeezer.evaluators.accuracy import recalibrate_bn
        from squeezer.policies.apply import apply_policy

        start = time.perf_counter()
        try:
            net = apply_policy(self.model, policy, self.calibration, space=self.space, seed=self.seed,
                               memo=self._memo)
            recalibrate_bn(net, self.data.train, batches=self.bn_batches, seed=self.seed)
            accuracy, loss = self._evaluate(net, self.data.val)
        except Exception as exc:  # a policy that cannot be applied is a recorded failure, not a crash
            return EvalFailure(f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
        cost = self.space.predict(policy.layers)
        return Measurement(accuracy=accuracy, loss=loss, macs=cost.macs, params=cost.params, bops=cost.bops,
                           size_mb=cost.size_bytes / 1e6, seconds=time.perf_counter() - start, recovery="bn",
                           fingerprint=self.space.fingerprint, hardware={"machine": "local"})

    def base(self) -> Measurement:
        cost = self.space.baseline()
        return Measurement(accuracy=self.accuracy, loss=0.0, macs=cost.macs, params=cost.params, bops=cost.bops,
                           size_mb=cost.size_bytes / 1e6, recovery="none", fingerprint=self.space.fingerprint,
                           hardware={"machine": "local"})


class BrokenModel(nn.Module):
    """A model whose forward pass always fails: workers cannot build an evaluator for it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("broken on purpose")
