"""What the search machinery (sampler, storage, pool) adds to a search's wall time over its evaluations.

Runs a real search (ResNet-20 on digits by default, BN recalibration, no latency timing so evaluations are short
and the overhead shows) and compares its wall time with the sum of the evaluations' own seconds. Target: <= 5%.
`--data mnist` gives evaluations about three times as long. With several workers the evaluations' seconds are
divided among them: what wall time is left over is time the workers waited on the driver (or on each other's CPU).

`--phases` also times where a trial's orchestration goes (the searcher's ask, and the working copy writing the
trial to storage when asked and when told), by wrapping those methods with timers.

Run: python benchmarks/search_orchestration.py [--trials 30] [--sampler tpe] [--storage sqlite|journal]
     [--workers 1] [--backend local|ray] [--knobs prune,w_bits] [--data digits|mnist] [--recovery bn|kd] [--phases]
"""
from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import torch

from squeezer.training import train_baseline
from squeezer.evaluators.evaluate import EvalSettings
from squeezer.evaluators.pool import PoolConfig, make_pool
from squeezer.evaluators.settings import LatencyConfig, RecoveryConfig
from squeezer.search_job import _base_measurement
from squeezer.search.config import SearchConfig
from squeezer.search.study import preload_storage, run_search
from squeezer.search.working_copy import WorkingCopy
from squeezer.spaces.space import SearchSpace
from squeezer.models import load_workload

from _timing import time_calls  # benchmarks/_timing.py

PHASES: dict[str, list[float]] = collections.defaultdict(list)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--storage", default="sqlite")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--backend", default="local", help="local (processes; one worker evaluates in this process) "
                    "or ray (what `squeezer search` uses when Ray is installed)")
    ap.add_argument("--knobs", default="prune,w_bits")
    ap.add_argument("--recovery", default="bn")
    ap.add_argument("--data", default="digits", help="digits (the shortest real evaluations) or mnist")
    ap.add_argument("--phases", action="store_true", help="time the searcher's ask and the storage writes")
    ap.add_argument("--no-preload", action="store_true", help="import the storage's modules when it is opened")
    args = ap.parse_args()
    if args.phases:
        from squeezer.search.optuna_searcher import OptunaSearcher

        time_calls(OptunaSearcher, "ask", PHASES["sampler ask"])
        time_calls(WorkingCopy, "begin", PHASES["storage when asked"])
        time_calls(WorkingCopy, "finish", PHASES["storage when told"])
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    if not args.no_preload:
        preload_storage(args.storage)  # as `squeezer search` does before loading data, model and evaluators
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "r20.pt"
        train_baseline("resnet20", args.data, out=ckpt)
        settings = EvalSettings(recovery=RecoveryConfig(mode=args.recovery), latency=LatencyConfig(mode="none"))
        pool = make_pool(*load_workload(model=str(ckpt), data=args.data), settings,
                         config=PoolConfig(workers=args.workers, backend=args.backend))
        try:
            from squeezer.models import resolve_model
            from squeezer.datasets import load_data

            data = load_data(args.data)
            space = SearchSpace.from_model(resolve_model(str(ckpt), data), data.example_inputs(),
                                           knobs=tuple(args.knobs.split(",")))
            base = _base_measurement(pool, space.fingerprint)
            seen: list[float] = []  # the search's own clock (starts once the study is open) at each trial's end
            start = time.perf_counter()
            config = SearchConfig(budget="macs<=50%", sampler=args.sampler, trials=args.trials,
                                  storage=args.storage, repair=True)
            result = run_search(space, pool, base, out=Path(tmp) / "run", config=config, workers=args.workers,
                                on_progress=lambda stats: seen.append(stats.elapsed))
            wall = time.perf_counter() - start
            everything = time.perf_counter() - t0
        finally:
            pool.close()
    evals = sum(r.seconds or 0.0 for r in result.completed())
    busy = evals / args.workers
    print(f"{args.data}: {args.trials} trials, sampler {args.sampler}, storage {args.storage}, "
          f"{args.workers} worker(s) ({args.backend}), {len(space.distributions())} params per policy")
    print(f"wall {wall:.1f} s, evaluations {evals:.1f} s ({evals / args.trials:.2f} s each), "
          f"orchestration overhead {100 * (wall - busy) / busy:.1f}% (target <= 5%)")
    fixed = wall - seen[-1]
    print(f"of which {fixed:.1f} s once (opening the storage, loading the study, reading the result) and "
          f"{1000 * (seen[-1] - busy) / args.trials:.0f} ms a trial (sampler, storage, pool): "
          f"{100 * (seen[-1] - busy) / busy:.1f}% without the one-time part")
    print(f"the whole script from before preloading: {everything:.1f} s")
    if PHASES:
        print("per trial: " + ", ".join(f"{k} {1000 * sum(v) / args.trials:.0f} ms" for k, v in PHASES.items()))


if __name__ == "__main__":
    main()
