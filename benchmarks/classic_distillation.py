"""Distillation beyond logits at equal recovery: ResNet-20 on the bundled MNIST, pruned uniformly to a MACs fraction,
recovered by Hinton KD alone, KD + FitNets hints, KD + attention transfer, and KD on unlabelled images (the
unchanged model labels them), each for the same steps, data order and seeds; test accuracy of each.

Every variant runs through `squeezer.evaluators.accuracy.recover` with a `RecoveryConfig`, as a search's recovery
does; only the feature weights and `unlabelled` differ between rows.
Run: nice -n 5 python benchmarks/classic_distillation.py [--seeds 3] [--steps 100] [--train-steps 300]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import replace

import torch

from squeezer.datasets import load_data
from squeezer.evaluators.accuracy import recover
from squeezer.evaluators.finetune import FitConfig, evaluate, fit
from squeezer.evaluators.settings import RecoveryConfig
from squeezer.models import resnet20
from squeezer.policies.apply import apply_policy
from squeezer.search.baselines import uniform_at
from squeezer.spaces.space import SearchSpace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=300, help="SGD steps of the unchanged model")
    ap.add_argument("--macs", type=float, default=0.25, help="uniform pruning to this fraction of the base MACs")
    ap.add_argument("--steps", type=int, default=100, help="recovery steps, the same for every variant")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--hint-weight", type=float, default=10.0)
    ap.add_argument("--at-weight", type=float, default=50.0)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data("mnist")
    torch.manual_seed(0)
    base = fit(resnet20(num_classes=10, in_channels=1), data.train, FitConfig(steps=args.train_steps)).eval()
    x = data.example_inputs(1)
    space = SearchSpace.from_model(base, x)
    policy = uniform_at(space, args.macs)
    pruned = apply_policy(base, policy, data.calibration(), example_inputs=x, space=space)
    macs = space.predict(policy.layers).macs / space.baseline().macs
    kd = RecoveryConfig(mode="kd", finetune_steps=args.steps, finetune_lr=args.lr)
    variants = {
        "KD (Hinton)": kd,
        f"KD + FitNets hints (weight {args.hint_weight:g})": replace(kd, hint_weight=args.hint_weight),
        f"KD + attention transfer (weight {args.at_weight:g})": replace(kd, at_weight=args.at_weight),
        "KD on unlabelled images": replace(kd, unlabelled=True),
    }
    bn = recover(copy.deepcopy(pruned), RecoveryConfig(mode="bn"), data, seed=0)
    print(f"resnet20 mnist ({len(data.train)} train / {len(data.test)} test images), base test accuracy "
          f"{evaluate(base, data.test)[0]:.4f}; uniform prune to {macs:.3f} of the MACs, BN recalibrated only "
          f"{evaluate(bn, data.test)[0]:.4f}; {args.steps} recovery steps at lr {args.lr:g}, kd_weight "
          f"{kd.kd_weight:g}, T {kd.kd_temperature:g}; seeds 0..{args.seeds - 1}; {args.threads} torch thread(s)")
    print("| recovery | test accuracy, mean | per seed | seconds per run |")
    print("|---|---|---|---|")
    for name, config in variants.items():
        accs, secs = [], []
        for seed in range(args.seeds):
            start = time.perf_counter()
            model = recover(copy.deepcopy(pruned), config, data, teacher=base, seed=seed)
            secs.append(time.perf_counter() - start)
            accs.append(evaluate(model, data.test)[0])
        print(f"| {name} | {statistics.mean(accs):.4f} | {' '.join(f'{a:.4f}' for a in accs)} | "
              f"{statistics.mean(secs):.0f} |", flush=True)


if __name__ == "__main__":
    main()
