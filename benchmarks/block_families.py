"""Each compact-block family in turn on every swappable conv of ResNet-20 (bundled MNIST), at MACs matched to dwsep.

Per family: the sub-choice whose swapped model's predicted MACs come closest to the dwsep-swapped model's, then
validation accuracy right after the closed-form start (no calibration data), after the data fit (BatchNorms and
the least-squares heads, or dwsep's alternating solve), after the fit plus `--distill` Adam steps per block, after
the same short fine-tune of that model, and onnxruntime latency relative to the unswapped model (batch 1).
Run: python benchmarks/block_families.py [--threads 1] [--train-steps 300] [--distill 50] [--finetune 100]
"""
from __future__ import annotations

import argparse

import torch

from squeezer.datasets import load_data
from squeezer.evaluators.finetune import FitConfig, evaluate, fit
from squeezer.evaluators.latency import LatencyMeter
from squeezer.models import resnet20
from squeezer.policies.apply import apply_policy
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import Policy
from squeezer.spaces.knobs import SpaceConfig
from squeezer.spaces.space import SearchSpace

LADDERS = {
    "dwsep": ["dwsep"],
    "invres": ["invres:1", "invres:2", "invres:3", "invres:4"],
    "fire": ["fire:0.0625", "fire:0.125", "fire:0.25", "fire:0.375", "fire:0.5", "fire:0.75"],
    "shuffle": ["shuffle:2", "shuffle:4", "shuffle:8"],
    "spatial": ["spatial:0.125", "spatial:0.25", "spatial:0.375", "spatial:0.5", "spatial:0.75", "spatial:1"],
    "bottleneck": ["bottleneck:0.125", "bottleneck:0.25", "bottleneck:0.375", "bottleneck:0.5",
                   "bottleneck:0.75", "bottleneck:1"],
}


def swap_all(space: SearchSpace, value: str) -> Policy:
    """Every unit offering the family takes `value`, or the family's offered value with the nearest sub-choice."""
    family, _, sub = value.partition(":")
    params = {}
    for unit in space.units:
        offered = [v for v in space.choices(unit, "block") if v.partition(":")[0] == family]
        if offered:
            params[f"{unit}/block"] = value if value in offered else min(
                offered, key=lambda v: abs(float(v.partition(":")[2] or 0) - float(sub or 0)))
    return Policy.from_params(params, space)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--distill", type=int, default=50, help="Adam steps per block after the data fit")
    ap.add_argument("--finetune", type=int, default=100, help="SGD steps of the swapped model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data("mnist")
    torch.manual_seed(0)
    base = fit(resnet20(num_classes=10, in_channels=1), data.train, FitConfig(steps=args.train_steps)).eval()
    x = data.example_inputs(1)
    grid = tuple(dict.fromkeys(["keep"] + [v for ladder in LADDERS.values() for v in ladder]))
    space = SearchSpace.from_model(base, x, SpaceConfig(choices={"block": grid}))
    calibration = data.calibration(4)
    reference = export_onnx(base, x)
    meter = LatencyMeter(reference, tuple(x.shape), threads=1, runs=100)
    target = space.predict(swap_all(space, "dwsep").layers).macs
    print(f"resnet20 mnist, base val accuracy {evaluate(base, data.val)[0]:.3f}, "
          f"MACs {space.baseline().macs / 1e6:.2f} M; dwsep-swapped MACs {target / 1e6:.2f} M; "
          f"{args.threads} torch thread(s)")
    print("| family | value | units | MACs (M) | start | fit | fit + distill | + fine-tune | ORT latency rel |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family, ladder in LADDERS.items():
        value = min(ladder, key=lambda v: abs(space.predict(swap_all(space, v).layers).macs - target))
        policy = swap_all(space, value)
        macs = space.predict(policy.layers).macs
        start = apply_policy(base, policy, example_inputs=x, space=space)
        fitted = apply_policy(base, policy, calibration, space=space)
        distilled = apply_policy(base, policy, calibration, space=space, distill_steps=args.distill)
        tuned = fit(apply_policy(base, policy, calibration, space=space, distill_steps=args.distill), data.train,
                    FitConfig(steps=args.finetune, lr=0.01)).eval()
        rel = meter.measure(export_onnx(tuned, x)).rel
        accs = [evaluate(m, data.val)[0] for m in (start, fitted, distilled, tuned)]
        print(f"| {family} | {value} | {len(policy.layers)} | {macs / 1e6:.2f} | "
              + " | ".join(f"{a:.3f}" for a in accs) + f" | {rel:.2f} |", flush=True)


if __name__ == "__main__":
    main()
