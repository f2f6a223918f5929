"""Evaluations per minute as workers are added: each worker gets cores // workers torch threads.

On 2 cores: 1 worker x 2 threads vs 2 workers x 1 thread (target: two lose nothing against one), LocalPool and
RayPool. On a 16-core machine: `--workers 1 8 --backends local` (target: 8 give >= 5x the evaluations of one;
benchmarks/device_check.sh runs it where there is no Ray).

Run: python benchmarks/eval_scaling.py [--n 12] [--workers 1 2] [--backends local ray] [--latency none|measure]
     [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import time

from squeezer.evaluators.evaluate import EvalSettings, Evaluator
from squeezer.evaluators.settings import LatencyConfig
from squeezer.evaluators.pool import PoolConfig, make_pool, threads_per_worker
from squeezer.policies.policy import Policy
from squeezer.spaces.knobs import PRUNE, param_key
from squeezer.models import load_workload


def policies(n: int, seed: int = 0) -> list[Policy]:
    space = Evaluator(*load_workload(model="resnet20", data="digits"),
                      EvalSettings(latency=LatencyConfig(mode="none"))).space
    rng = random.Random(seed)
    prune_units = [u for u, k in space.param_names() if k == PRUNE]
    return [Policy.from_params({param_key(u, PRUNE): rng.choice((0.0, 0.25, 0.5)) for u in prune_units}, space)
            for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--latency", default="none")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--backends", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    if "ray" in args.backends and importlib.util.find_spec("ray") is None:
        print("ray is not installed here: timing the local pool only")
        args.backends = [b for b in args.backends if b != "ray"]
    todo = policies(args.n)
    settings = EvalSettings(latency=LatencyConfig(mode=args.latency), device=args.device)
    print(f"{os.cpu_count()} cores, {args.n} policies, device {args.device}")
    print(f"{'backend':>8} {'workers':>7} {'threads':>7} {'start s':>8} {'eval s':>7} {'evals/min':>9}")
    rates: dict[tuple[str, int], float] = {}
    for backend, workers in [(b, w) for b in args.backends for w in args.workers]:
        t = time.perf_counter()
        pool = make_pool(*load_workload(model="resnet20", data="digits"), settings,
                         config=PoolConfig(workers=workers, backend=backend))
        # warm every worker (first evaluation pays imports / evaluator build) with a policy not in the set
        for i in range(workers):
            pool.submit(-1 - i, Policy(meta={"warm": i}) if i == 0 else todo[0].with_layer("conv1", w_bits=8))
        while pool.pending():
            pool.wait()
        start = time.perf_counter() - t
        t = time.perf_counter()
        for i, p in enumerate(todo):
            pool.submit(i, p)
        done = 0
        while pool.pending():
            done += len(pool.wait())
        secs = time.perf_counter() - t
        pool.close()
        rates[backend, workers] = 60 * done / secs
        print(f"{backend:>8} {workers:>7} {threads_per_worker(workers):>7} {start:8.1f} {secs:7.1f} "
              f"{rates[backend, workers]:9.1f}")
    for backend in args.backends:
        one = rates.get((backend, min(args.workers)))
        for workers in args.workers:
            if one and workers != min(args.workers):
                print(f"{backend}: {workers} workers give {rates[backend, workers] / one:.2f}x the evaluations per "
                      f"minute of {min(args.workers)}")


if __name__ == "__main__":
    main()
