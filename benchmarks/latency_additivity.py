"""Do per-unit latency deltas add up? The lookup table assumes they do; this measures where they don't.

For a few choices, times ResNet-20 (digits, batch 1) with the choice on 4 units and on every unit, and prints the
measured relative change beside the sum of the units' single-unit changes.

Run: python benchmarks/latency_additivity.py [--threads 1]
"""
from __future__ import annotations

import argparse

import torch

from squeezer.evaluators.evaluate import EvalSettings, Evaluator
from squeezer.evaluators.settings import LatencyConfig
from squeezer.policies.policy import LayerChoice, Policy
from squeezer.models import load_workload

CHOICES = {"prune 0.5": LayerChoice(prune=0.5), "w8a8": LayerChoice(w_bits=8, a_bits=8),
           "w8 (weights only)": LayerChoice(w_bits=8)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ev = Evaluator(*load_workload(model="resnet20", data="digits"),
                   EvalSettings(latency=LatencyConfig(mode="measure", threads=args.threads)))
    assert ev.meter is not None

    def delta(layers: dict[str, LayerChoice]) -> float:
        policy = Policy(layers=layers, fingerprint=ev.space.fingerprint)
        return ev.meter.measure(ev._onnx_of(policy)).rel - 1.0

    print(f"{'choice':>18} {'units':>5} {'measured':>9} {'sum of singles':>14}")
    for label, choice in CHOICES.items():
        units = [u for u in ev.space.units if all(v in ev.space.choices(u, k) for k, v in choice.changed().items())]
        singles = {u: delta({u: choice}) for u in units}
        for chosen in (units[3:20:5], units):
            measured = delta({u: choice for u in chosen})
            print(f"{label:>18} {len(chosen):>5} {measured:+9.3f} {sum(singles[u] for u in chosen):+14.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
