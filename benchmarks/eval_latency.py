"""Latency measurement quality: the same model measured twice, and the lookup table's prediction error.

A timing is itself noisy: int8 kernels drift against the fp32 reference with the machine's phases. So each test
policy is timed `--repeat` times (the error is reported against the first timing and against their mean, beside how
far the first two lie apart), and at the end the table's calibration policies are timed again, to show how far the
machine drifted between building the table and testing it.

Run: python benchmarks/eval_latency.py [--data digits|mnist] [--policies 15] [--batch 1] [--threads 1]
     [--knobs prune w_bits] [--repeat 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from squeezer.evaluators.evaluate import EvalSettings, Evaluator
from squeezer.evaluators.settings import LatencyConfig
from squeezer.evaluators.latency import LatencyTable, calibration_policies, choice_parts, is_bits, table_entries
from squeezer.spaces.knobs import SpaceConfig
from squeezer.spaces.space import SearchSpace
from squeezer.models import load_workload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policies", type=int, default=15)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime and torch threads")
    ap.add_argument("--data", default="digits", help="digits (8x8) or mnist (28x28): the input timed")
    ap.add_argument("--calibration", type=int, default=16, help="whole random policies timed for the correction")
    ap.add_argument("--knobs", nargs="+", default=["prune"], help="knobs of the space the random policies use")
    ap.add_argument("--repeat", type=int, default=2,
                    help="timings of each test policy: two or more also report how well a timing repeats")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ev = Evaluator(*load_workload(model="resnet20", data=args.data),
                   EvalSettings(latency=LatencyConfig(mode="measure", batch=args.batch, threads=args.threads)))
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

    space = SearchSpace.from_model(ev.base, ev.example, SpaceConfig(knobs=tuple(args.knobs)))
    with tempfile.TemporaryDirectory() as lut_dir:
        table = LatencyTable(ev._table_meter(), ev._onnx_of, key=ev.space.fingerprint,
                             fingerprint=ev.space.fingerprint, cache_dir=lut_dir, space=ev.space)
        entries = table_entries(space)
        start = time.perf_counter()
        # calibration policies from another seed than the policies the prediction is tested on
        table.fill(entries, calibration=calibration_policies(space, args.calibration, seed=1))
        a, mac, b, c = table.slopes()
        print(f"\nlookup table: {len(entries)} entries + base + {args.calibration} calibration policies timed in "
              f"{time.perf_counter() - start:.1f} s; correction: measured = 1 + {a:.3f} x parts + {mac:.3f} x MAC "
              f"change + {b:.3f} x bits + {c:.3f} x bits unscaled")
        # for comparison, the correction used before: one line through the whole sum, with the base as a point
        x, y = np.array([[1.0, 1.0]] + [[1 + p[0] + p[1], p[4]] for p in table.data["calibration"]]).T
        line = np.polyfit(x, y, 1)
        errors: dict[str, list[float]] = {"summed": [], "line": [], "table": [], "table_mean": [], "repeat": []}
        by_kind: dict[str, list[float]] = {"with int8 units": [], "float only": []}
        print(f"{'policy':>6} {'measured rel':>12} {'again':>6} {'summed rel':>10} {'predicted rel':>13} "
              f"{'rel err':>8}")
        for i, policy in enumerate(calibration_policies(space, args.policies, seed=0)):
            parts, bits, _, _ = table.sums(policy)
            predicted = table.predict_rel(policy)
            onnx = ev._onnx_of(policy)
            timed = [meter.measure(onnx).rel for _ in range(args.repeat)]
            measured, mean = timed[0], statistics.mean(timed)
            errors["summed"].append(abs(1 + parts + bits - measured) / measured)
            errors["line"].append(abs(np.polyval(line, 1 + parts + bits) - measured) / measured)
            errors["table"].append(abs(predicted - measured) / measured)
            has_int8 = any(is_bits(part) for choice in policy.layers.values() for part in choice_parts(choice))
            by_kind["with int8 units" if has_int8 else "float only"].append(errors["table"][-1])
            errors["table_mean"].append(abs(predicted - mean) / mean)
            if len(timed) > 1:
                errors["repeat"].append(abs(timed[1] - timed[0]) / mean)
            again = f"{timed[1]:6.3f}" if len(timed) > 1 else f"{'':>6}"
            print(f"{i:>6} {measured:12.3f} {again} {1 + parts + bits:10.3f} {predicted:13.3f} "
                  f"{errors['table'][-1]:8.3f}")
        med = {k: statistics.median(v) for k, v in errors.items() if v}
        print(f"knobs {','.join(args.knobs)}: median relative error of the predicted latency {med['table']:.3f} "
              f"over {args.policies} random policies (target <= 0.05); on the same timings: uncorrected sum "
              f"{med['summed']:.3f}, one line through the whole sum {med['line']:.3f}")
        print("by kind of policy: " + ", ".join(f"{kind} {statistics.median(v):.3f} ({len(v)})"
                                                for kind, v in by_kind.items() if v))
        # how far the machine drifted since the table was built: its calibration policies timed again now
        drift = [(meter.measure(ev._onnx_of(policy)).rel - point[4]) / point[4]
                 for policy, point in zip(calibration_policies(space, args.calibration, seed=1),
                                          table.data["calibration"])]
        print(f"the table's calibration policies, timed again now, differ from their timings when the table was "
              f"built by {statistics.median(map(abs, drift)):.3f} (median; signed {statistics.median(drift):+.3f}): "
              f"drift that no prediction made then can follow")
        if "repeat" in med:
            print(f"timing each policy {args.repeat} times: the first two timings differ by {med['repeat']:.3f} "
                  f"(median; the measurement's own repeatability on these policies); the prediction against the mean "
                  f"of the timings errs {med['table_mean']:.3f}")


if __name__ == "__main__":
    main()
