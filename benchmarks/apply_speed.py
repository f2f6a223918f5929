"""Wall time of `apply_policy` for a mixed policy (prune + rank + w_bits) on torchvision ResNet-18.

Target: under 2 s on 2 CPU cores. "first" decomposes every weight tensor (cold cache); "cached" re-applies the same
policy, so only the truncation and layer building remain (what a search pays when it revisits weights).
Run: python benchmarks/apply_speed.py [--size 224] [--repeats 3] [--decomposition tucker|cp]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torchvision

from squeezer.policies.apply import apply_policy
from squeezer.policies.lowrank import clear_cache
from squeezer.policies.policy import Policy
from squeezer.spaces.knobs import split_key
from squeezer.spaces.space import SearchSpace


def mixed_policy(space: SearchSpace, seed: int) -> Policy:
    """Every unit gets a random prune ratio, rank and weight width from its offered choices (seeded)."""
    rng = random.Random(seed)
    params = {key: rng.choice(choices) for key, choices in space.distributions().items()
              if split_key(key)[1] in ("prune", "rank", "w_bits")}
    return Policy.from_params(params, space)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224, help="input height/width of the example batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decomposition", default="tucker", choices=("tucker", "cp"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, args.size, args.size)
    space = SearchSpace.from_model(model, x, decomposition=args.decomposition)
    first, cached = [], []
    for seed in range(args.repeats):
        policy = mixed_policy(space, seed)
        clear_cache()
        t = time.perf_counter()
        apply_policy(model, policy, example_inputs=x, space=space)
        first.append(time.perf_counter() - t)
        t = time.perf_counter()
        apply_policy(model, policy, example_inputs=x, space=space)
        cached.append(time.perf_counter() - t)
        print(f"policy {seed}: {policy.summary()}: first {first[-1]:.2f} s, cached {cached[-1]:.2f} s")
    print(f"resnet18 1x3x{args.size}x{args.size} ({args.decomposition}), median of {args.repeats}: "
          f"first apply {statistics.median(first):.2f} s, cached apply {statistics.median(cached):.2f} s "
          f"(target < 2 s)")


if __name__ == "__main__":
    main()
