"""Evaluations per minute: 1 worker x 2 threads vs 2 workers x 1 thread, LocalPool and RayPool.

Run: python benchmarks/eval_scaling.py [--n 12] [--latency none|measure]
"""
from __future__ import annotations

import argparse
import random
import time

from squeezer.evaluators.evaluate import EvalSettings, Evaluator
from squeezer.evaluators.pool import make_pool
from squeezer.policies.policy import Policy


def policies(n: int, seed: int = 0) -> list[Policy]:
    space = Evaluator("resnet20", "digits", EvalSettings(latency="none")).space
    rng = random.Random(seed)
    prune_units = [u for u, k in space.param_names() if k == "prune"]
    return [Policy.from_params({f"{u}/prune": rng.choice((0.0, 0.25, 0.5)) for u in prune_units}, space)
            for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--latency", default="none")
    args = ap.parse_args()
    todo = policies(args.n)
    settings = EvalSettings(latency=args.latency)
    print(f"{'backend':>8} {'workers':>7} {'start s':>8} {'eval s':>7} {'evals/min':>9}")
    for backend, workers in (("local", 1), ("local", 2), ("ray", 1), ("ray", 2)):
        t = time.perf_counter()
        pool = make_pool("resnet20", "digits", settings, workers=workers, backend=backend)
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
        print(f"{backend:>8} {workers:>7} {start:8.1f} {secs:7.1f} {60 * done / secs:9.1f}")


if __name__ == "__main__":
    main()
