"""How far one latency timing moves when it is repeated: by the same meter, by a new meter, with more runs.

Takes `--entries` random lookup-table entries of ResNet-20 (one unit changed each) and times each `--passes` times
relative to the reference (`LatencyMeter.measure`, as the table does), in three ways: one meter for every pass (what
one worker sees), a new meter for each pass (what another worker, or the next search, sees), and a new meter with
five times the runs. Prints, for each, the standard deviation of an entry's relative latency over the passes
(median over entries), how far the passes' means lie apart, and the milliseconds one timing takes.

How fast an onnxruntime session runs is settled when it is made: sessions of one model differed by up to 11% here
(8x8 digits; within a session, 0.6%). A meter that times every repetition in new sessions of both models averages
that out; one whose reference session lives as long as it does carries that session's speed into everything it
times (see benchmarks/RESULTS.md, 2026-11-30 (7)).

Run: python benchmarks/latency_noise.py [--data digits|mnist] [--entries 16] [--passes 4] [--threads 1]
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from squeezer.evaluators.evaluate import EvalSettings, Evaluator
from squeezer.evaluators.settings import LatencyConfig
from squeezer.evaluators.latency import LatencyMeter, table_entries
from squeezer.policies.policy import Policy
from squeezer.spaces.knobs import KNOBS, SpaceConfig
from squeezer.spaces.space import SearchSpace
from squeezer.models import load_workload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="digits", help="digits (8x8) or mnist (28x28): the input timed")
    ap.add_argument("--entries", type=int, default=16)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.passes < 2:
        ap.error("--passes must be at least 2: the spread is over passes")
    torch.set_num_threads(args.threads)
    ev = Evaluator(*load_workload(model="resnet20", data=args.data), EvalSettings(latency=LatencyConfig(mode="none")))
    space = SearchSpace.from_model(ev.base, ev.example, SpaceConfig(knobs=tuple(KNOBS)))
    entries = random.Random(0).sample(table_entries(space), args.entries)
    models = [ev._onnx_of(Policy(layers={u: p}, fingerprint=space.fingerprint)) for u, p in entries]
    reference = ev._onnx_of(Policy(fingerprint=space.fingerprint))
    shape = tuple(ev.example.shape)
    print(f"{args.data}: {args.entries} table entries, each timed {args.passes} times, {args.threads} thread(s)")
    print(f"{'timing':<36} {'sd of rel':>9} {'passes apart':>13} {'ms a timing':>12}")
    for name, runs, fresh in (("one meter, 200 runs x 3", 200, False), ("a new meter each pass", 200, True),
                              ("a new meter each pass, 1000 runs x 3", 1000, True)):
        meter = LatencyMeter(reference, shape, threads=args.threads, runs=runs)
        start = time.perf_counter()
        rel = []
        for _ in range(args.passes):
            if fresh:
                meter = LatencyMeter(reference, shape, threads=args.threads, runs=runs)
            rel.append([meter.measure(m).rel for m in models])
        per = (time.perf_counter() - start) / (args.passes * len(models))
        r = np.array(rel)
        means = r.mean(1)
        print(f"{name:<36} {float(np.median(r.std(0, ddof=1))):>9.4f} "
              f"{float((means.max() - means.min()) / means.mean()):>13.4f} {1000 * per:>12.0f}")


if __name__ == "__main__":
    main()
