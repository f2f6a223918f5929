"""Time and peak memory of building one model's search space (the bounded dependency analysis of issue 24).

Run: python benchmarks/space_build.py [--model swin_t] [--size 64]
Run it under a memory limit (`ulimit -v`) or a timeout on a shared machine: an unbounded analysis grows until killed.
Prints the space, the seconds `SearchSpace.from_model` took, and the process's peak resident memory before and after.
"""
from __future__ import annotations

import argparse
import logging
import resource
import time

import torch
import torchvision

from squeezer.spaces.space import SearchSpace


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="swin_t")
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)
    model = torchvision.models.get_model(args.model, num_classes=10).eval()
    x = torch.randn(1, 3, args.size, args.size)
    before = _peak_mb()
    start = time.perf_counter()
    space = SearchSpace.from_model(model, x)
    seconds = time.perf_counter() - start
    print(f"{args.model} {args.size}x{args.size}: {space}; built in {seconds:.1f} s; "
          f"peak RSS {before:.0f} MB before, {_peak_mb():.0f} MB after")


if __name__ == "__main__":
    main()
