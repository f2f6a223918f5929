"""Overhead of one BN-recalibrated evaluation of ResNet-20 over the bare forward passes it needs.

The bare passes: `bn_batches` train batches (BN re-estimation) + the validation split. Target: <= 1.2x.
Run: python benchmarks/eval_overhead.py [--data digits|mnist] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from squeezer.evaluators.evaluate import EvalSettings, Evaluator
from squeezer.policies.apply import apply_policy
from squeezer.policies.policy import Policy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="digits")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    settings = EvalSettings(recovery="bn", latency="none")
    ev = Evaluator("resnet20", args.data, settings)
    policies = [Policy.uniform(ev.space, prune=r) for r in (0.125, 0.25, 0.375, 0.5, 0.625)][:args.repeats]
    rows = []
    for policy in policies:
        t = time.perf_counter()
        ev.evaluate(policy)
        full = time.perf_counter() - t
        model = apply_policy(ev.base_model, policy, ev.calibration, example_inputs=ev.example, space=ev.space)
        t = time.perf_counter()
        with torch.no_grad():
            model.train()
            for x, _ in ev.data.train.batches(settings.batch_size, shuffle=True, limit=settings.bn_batches):
                model(x)
            model.eval()
            for x, _ in ev.data.val.batches(256):
                model(x)
        bare = time.perf_counter() - t
        t = time.perf_counter()
        apply_policy(ev.base_model, policy, ev.calibration, example_inputs=ev.example, space=ev.space)
        applying = time.perf_counter() - t
        rows.append((policy.meta.get("prune"), full, bare, applying))
    print(f"{'prune':>6} {'eval s':>8} {'bare fwd s':>10} {'apply s':>8} {'ratio':>6} {'ratio excl. apply':>18}")
    for prune, full, bare, applying in rows:
        print(f"{prune:>6} {full:8.3f} {bare:10.3f} {applying:8.3f} {full / bare:6.2f} "
              f"{(full - applying) / bare:18.2f}")
    print(f"median ratio {statistics.median(r[1] / r[2] for r in rows):.2f}, excluding apply_policy "
          f"{statistics.median((r[1] - r[3]) / r[2] for r in rows):.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
