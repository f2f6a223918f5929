"""Latency measurement quality: the same model measured twice, and the lookup table's prediction error.

Run: python benchmarks/eval_latency.py [--policies 20] [--batch 8]
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile

import torch

from squeezer.evaluators.evaluate import EvalSettings, Evaluator
from squeezer.evaluators.latency import LatencyTable
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import LayerChoice, Policy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policies", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--units", type=int, default=6, help="prunable units a random policy draws from")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ev = Evaluator("resnet20", "digits", EvalSettings(latency="measure", latency_batch=args.batch))
    meter = ev.meter
    assert meter is not None
    print("same model twice (reference = itself)")
    print(f"{'run':>4} {'median ms':>10} {'p90 ms':>8} {'spread':>7} {'rel':>6}")
    runs = [meter.measure(ev.reference) for _ in range(2)]
    for i, r in enumerate(runs):
        print(f"{i:>4} {r.median_ms:10.4f} {r.p90_ms:8.4f} {r.spread:7.3f} {r.rel:6.3f}")
    diff = abs(runs[0].median_ms - runs[1].median_ms) / min(r.median_ms for r in runs)
    print(f"medians differ by {100 * diff:.1f}% (target <= 3%); rel differs by "
          f"{100 * abs(runs[0].rel - runs[1].rel):.1f} points")

    rng = random.Random(0)
    units = [u for u, k in ev.space.param_names() if k == "prune"][:args.units]
    with tempfile.TemporaryDirectory() as lut_dir:
        table = LatencyTable(meter, ev._onnx_of, key=ev.space.fingerprint, fingerprint=ev.space.fingerprint,
                             cache_dir=lut_dir)
        errors = []
        print(f"\n{'policy':>6} {'measured rel':>12} {'predicted rel':>13} {'abs err':>8}")
        for i in range(args.policies):
            layers = {u: LayerChoice(prune=rng.choice(ev.space.choices(u, "prune")[1:])) for u in units if rng.random() < 0.6}
            policy = Policy(layers=layers, fingerprint=ev.space.fingerprint)
            predicted = table.predict_rel(policy)
            measured = meter.measure(ev._onnx_of(policy)).rel
            errors.append(abs(predicted - measured))
            print(f"{i:>6} {measured:12.3f} {predicted:13.3f} {errors[-1]:8.3f}")
        print(f"LUT entries measured: {len(table.data['deltas'])}; median abs error of relative latency "
              f"{statistics.median(errors):.3f} (x base {table.base_us():.0f} us = "
              f"{statistics.median(errors) * table.base_us():.0f} us)")


if __name__ == "__main__":
    main()
