"""Wall time and accuracy of swapping every unit of ResNet-20 (digits) for a depthwise-separable block.

Compares no fit (no calibration batches), the closed-form fit (default), and the fit followed by Adam steps
(`--steps`, e.g. 300 as the old default). Target: a few seconds for the default.
Run: python benchmarks/dwsep_apply.py [--threads 1] [--steps 0 20] [--train-steps 80]
"""
from __future__ import annotations

import argparse
import time

import torch

from squeezer.datasets import load_data
from squeezer.evaluators.finetune import FitConfig, evaluate, fit
from squeezer.models import resnet20
from squeezer.policies.apply import apply_policy
from squeezer.policies.policy import Policy
from squeezer.spaces.space import SearchSpace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 on a busy 2-core machine: minutes)")
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 20], help="Adam steps after the fit")
    ap.add_argument("--train-steps", type=int, default=80)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data("digits")
    torch.manual_seed(0)
    model = fit(resnet20(num_classes=10, in_channels=1), data.train, FitConfig(steps=args.train_steps)).eval()
    x = data.example_inputs(1)
    space = SearchSpace.from_model(model, x)
    policy = Policy.uniform(space, block="dwsep")
    with torch.no_grad():
        reference = model(data.val.x)
    print(f"resnet20 digits 1x1x8x8, dwsep on all {len(policy.layers)} units, {args.threads} torch thread(s); "
          f"unswapped val accuracy {evaluate(model, data.val)[0]:.3f}")
    runs = [("no fit", [], 0)] + [(f"fit + {s} Adam steps" if s else "fit (default)", data.calibration(4), s)
                                  for s in args.steps]
    for name, calibration, steps in runs:
        start = time.perf_counter()
        swapped = apply_policy(model, policy, calibration, example_inputs=x, space=space, distill_steps=steps)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            error = float((swapped(data.val.x) - reference).norm() / reference.norm())
        print(f"  {name:<22} apply {seconds:6.2f} s, logit rel. error {error:.3f}, "
              f"val accuracy {evaluate(swapped, data.val)[0]:.3f}")


if __name__ == "__main__":
    main()
