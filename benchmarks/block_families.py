"""Each compact-block family in turn on every swappable conv of ResNet-20 (bundled MNIST), at MACs matched to dwsep;
then a search over every family against one over keep/dwsep only, at the same budget and evaluations.

Families (`--part families`): per family, the sub-choice whose swapped model's predicted MACs come closest to the
dwsep-swapped model's, in a space whose widths are not rounded (`--round-to 1`: with the default rounding to
multiples of 8 every family's smallest sub-choice lies above dwsep), then validation accuracy right after the
closed-form start (no calibration data), after the data fit (BatchNorms and the least-squares heads, or dwsep's
alternating solve), after the fit plus `--distill` Adam steps per block, after the same short fine-tune of that
model, and onnxruntime latency relative to the unswapped model (batch 1).

Search (`--part search`): the block knob alone under `--budget`, `--trials` evaluations per search, repaired into
the budget, each candidate distilled block-wise and then recovered by the same KD fine-tune; one search offers the
default grid of every family, the other keep and dwsep only; per seed, the best validation accuracy within the
budget and that policy's test accuracy after the same recovery.
Run: python benchmarks/block_families.py [--part families|search|both] [--threads 1] [--train-steps 300]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from squeezer.datasets import load_data
from squeezer.evaluators.finetune import FitConfig, evaluate, fit
from squeezer.evaluators.latency import LatencyMeter
from squeezer.evaluators.pool import LocalPool, PoolConfig
from squeezer.evaluators.settings import EvalSettings, LatencyConfig, RecoveryConfig
from squeezer.models import resnet20
from squeezer.policies.apply import apply_policy
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import Policy
from squeezer.search.config import SearchConfig
from squeezer.search.study import run_search
from squeezer.spaces.block_shapes import DEFAULT_GRID, DWSEP, KEEP
from squeezer.spaces.knobs import SpaceConfig
from squeezer.spaces.space import SearchSpace

def _ratios(numerators: range, denominator: int) -> list[str]:
    return [f"{n / denominator:g}" for n in numerators]


# fine ladders, so that every family has a sub-choice within a few percent of dwsep's MACs
LADDERS = {
    "dwsep": ["dwsep"],
    "invres": [f"invres:{v}" for v in _ratios(range(4, 16), 16)] + ["invres:1", "invres:2"],
    "fire": [f"fire:{v}" for v in _ratios(range(1, 25), 64)],
    "shuffle": ["shuffle:2", "shuffle:4", "shuffle:8"],
    "spatial": [f"spatial:{v}" for v in _ratios(range(2, 33), 64)],
    "bottleneck": [f"bottleneck:{v}" for v in _ratios(range(2, 41), 64)],
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


def families(args: argparse.Namespace, data, base: torch.nn.Module) -> None:
    x = data.example_inputs(1)
    grid = tuple(dict.fromkeys(["keep"] + [v for ladder in LADDERS.values() for v in ladder]))
    unrounded = SearchSpace.from_model(base, x, SpaceConfig(choices={"block": grid}, round_to=args.round_to))
    # the shuffle's groups must divide every width pruning can leave, so it keeps the default rounding
    rounded = SearchSpace.from_model(base, x, SpaceConfig(choices={"block": grid}))
    calibration = data.calibration(4)
    reference = export_onnx(base, x)
    meter = LatencyMeter(reference, tuple(x.shape), threads=1, runs=100)
    target = unrounded.predict(swap_all(unrounded, "dwsep").layers).macs
    print(f"resnet20 mnist, base val accuracy {evaluate(base, data.val)[0]:.3f}, "
          f"MACs {unrounded.baseline().macs / 1e6:.2f} M; dwsep-swapped MACs {target / 1e6:.2f} M; "
          f"widths rounded to {args.round_to} (the shuffle's to 8); {args.threads} torch thread(s)")
    print("| family | value | units | MACs (M) | MACs / dwsep's | start | fit | fit + distill | + fine-tune "
          "| ORT latency rel |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family, ladder in LADDERS.items():
        space = rounded if family == "shuffle" else unrounded
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
        print(f"| {family} | {value} | {len(policy.layers)} | {macs / 1e6:.2f} | {macs / target:.3f} | "
              + " | ".join(f"{a:.3f}" for a in accs) + f" | {rel:.2f} |", flush=True)


def search(args: argparse.Namespace, data, base: torch.nn.Module) -> None:
    """The two grids searched alike: same budget, evaluations, recovery, seeds."""
    x = data.example_inputs(1)
    grids = {"every family": DEFAULT_GRID, "keep/dwsep only": (KEEP, DWSEP)}
    grids = {name: grid for name, grid in grids.items() if name.split()[0] in args.grids}
    recovery = RecoveryConfig(mode="kd", finetune_steps=args.finetune, distill_steps=args.search_distill)
    print(f"block knob only, budget {args.budget}, {args.trials} evaluations per search, repaired into the budget; "
          f"recovery: {args.search_distill} distill steps per block, then KD {args.finetune} steps")
    print("| grid | seed | feasible trials | best val accuracy | its MACs (M) | its test accuracy | its blocks |")
    print("|---|---|---|---|---|---|---|")
    results: dict[str, list[float]] = {name: [] for name in grids}
    for seed in args.seeds:
        for name, grid in grids.items():
            space = SearchSpace.from_model(base, x, SpaceConfig(knobs=("block",), choices={"block": grid}))
            settings = EvalSettings(recovery=recovery, latency=LatencyConfig(mode="none"), seed=seed)
            pool = LocalPool(base, data, settings, config=PoolConfig(workers=1), space=space)
            try:
                reference = pool.evaluator.base_measurement()
                config = SearchConfig(budget=args.budget, trials=args.trials, knobs=("block",), repair=True,
                                      seed=seed, objective="single")
                with tempfile.TemporaryDirectory() as out:
                    result = run_search(space, pool, reference, out=out, config=config)
                    feasible = [r for r in result.rows if r.feasible and r.accuracy is not None]
                    best = max(feasible, key=lambda r: r.accuracy) if feasible else None
                    test = evaluate(pool.evaluator.compress(best.policy), data.test)[0] if best else float("nan")
            finally:
                pool.close()
            if best is None:
                print(f"| {name} | {seed} | 0 | - | - | - | - |", flush=True)
                continue
            results[name].append(test)
            kinds = sorted({c.block.partition(":")[0] for c in best.policy.layers.values() if c.block != KEEP})
            print(f"| {name} | {seed} | {len(feasible)} | {best.accuracy:.4f} | {best.macs / 1e6:.2f} | {test:.4f} | "
                  f"{', '.join(kinds) or 'keep'} |", flush=True)
    for name, accs in results.items():
        spread = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        print(f"{name}: test accuracy mean {statistics.mean(accs):.4f}, stdev {spread:.4f} over {len(accs)} seeds")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["families", "search", "both"], default="both")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--round-to", type=int, default=1, help="width rounding of the families' space")
    ap.add_argument("--distill", type=int, default=50, help="Adam steps per block after the data fit")
    ap.add_argument("--finetune", type=int, default=100, help="SGD steps of the swapped model (KD in the search)")
    ap.add_argument("--budget", default="macs<=20%")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--search-distill", type=int, default=20, help="distill steps per block in the search")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--grids", nargs="+", choices=["every", "keep/dwsep"], default=["every", "keep/dwsep"],
                    help="which of the two searches to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data("mnist")
    torch.manual_seed(0)
    base = fit(resnet20(num_classes=10, in_channels=1), data.train, FitConfig(steps=args.train_steps)).eval()
    if args.part in ("families", "both"):
        families(args, data, base)
    if args.part in ("search", "both"):
        search(args, data, base)


if __name__ == "__main__":
    main()
