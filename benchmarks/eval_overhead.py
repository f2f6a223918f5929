"""Overhead of one BN-recalibrated evaluation of ResNet-20 over the bare forward passes it needs.

The bare passes: `bn_batches` train batches (BN re-estimation) + the validation split. Target: <= 1.2x.
Each policy's evaluation (the uncached path: compress, then measure) and its bare passes are timed `--times` times,
alternating, after one warm-up evaluation; the ratio is of their medians. The evaluation's phases are timed too
(apply, recovery, MAC count, scoring), to show where the time beyond the forward passes goes.

Run: python benchmarks/eval_overhead.py [--data digits|mnist] [--repeats 5] [--times 3]
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

import squeezer.evaluators.evaluate as evaluate_module
from squeezer.evaluators.evaluate import EvalSettings, Evaluator
from squeezer.evaluators.settings import LatencyConfig
from squeezer.policies.apply import apply_policy
from squeezer.policies.policy import Policy
from squeezer.models import load_workload

from _timing import time_calls  # benchmarks/_timing.py

PHASES = {"apply_policy": "apply", "recover": "recovery", "measure_cost": "MAC count", "score": "scoring"}
SPENT: dict[str, list[float]] = collections.defaultdict(list)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="digits")
    ap.add_argument("--repeats", type=int, default=5, help="policies (uniform prune ratios 0.125 to 0.625)")
    ap.add_argument("--times", type=int, default=3, help="timings of each policy's evaluation and bare passes")
    args = ap.parse_args()
    torch.set_num_threads(2)
    settings = EvalSettings(latency=LatencyConfig(mode="none"))
    ev = Evaluator(*load_workload(model="resnet20", data=args.data), settings)
    policies = [Policy.uniform(ev.space, prune=r) for r in (0.125, 0.25, 0.375, 0.5, 0.625)][:args.repeats]
    ev.measure(ev.compress(policies[0]), policies[0])  # warm-up: first-call costs are not per-policy costs
    for name, label in PHASES.items():
        time_calls(evaluate_module, name, SPENT[label])

    def bare(model: torch.nn.Module) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.train()
            for x, _ in ev.data.train.batches(settings.recovery.batch_size, shuffle=True,
                                                limit=settings.recovery.bn_batches):
                model(x)
            model.eval()
            for x, _ in ev.data.val.batches(256):
                model(x)
        return time.perf_counter() - start

    rows = []
    for policy in policies:
        model = apply_policy(ev.base_model, policy, ev.calibration, example_inputs=ev.example, space=ev.space)
        full, forward = [], []
        for _ in range(args.times):
            start = time.perf_counter()
            ev.measure(ev.compress(policy), policy)  # what evaluate() does for a policy not in its cache
            full.append(time.perf_counter() - start)
            forward.append(bare(model))
        rows.append((policy.meta.get("prune"), statistics.median(full), statistics.median(forward)))
    print(f"{'prune':>6} {'eval s':>8} {'bare fwd s':>10} {'ratio':>6}")
    for prune, full, forward in rows:
        print(f"{prune:>6} {full:8.3f} {forward:10.3f} {full / forward:6.2f}")
    print("phases of an evaluation (median ms): "
          + ", ".join(f"{label} {1000 * statistics.median(SPENT[label]):.0f}" for label in PHASES.values()))
    print(f"median ratio {statistics.median(r[1] / r[2] for r in rows):.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
