"""Does the cheap score rank policies as the fine-tuned score does? Kendall tau over random policies.

AMC and later work rank candidates by a cheap proxy (no fine-tune, or BN recalibration) and fine-tune only the
winners; that is only sound if the proxy preserves the ranking. This script scores `--n` random policies of
ResNet-20 on digits with recovery none, bn and a `--steps`-step distilled fine-tune (the reference) and prints the
Kendall tau of each cheap score against the reference. It also prints how far apart the reference scores are
compared with their sampling error on the validation split: when the fine-tuned policies all land within a few
images of each other, no score can reproduce their order and tau says little.

`--policies graded` (the default) spreads the policies from light to heavy compression, as a search explores: policy
i of n compresses every unit about (i + 0.5) / n of the way along its choices, give or take one choice. Over such a
range any score that falls with compression ranks well, so the script also prints tau within `--strata` groups of
policies of similar predicted MACs (the mean of the groups' taus): how well the cheap score picks among candidates
of one cost, which is what a search under a budget asks of it. `--policies uniform` draws each unit's choice
independently (the policies then all land near the same overall compression).

Run: python benchmarks/eval_rank_correlation.py [--n 20] [--steps 150] [--knobs prune,w_bits] [--data digits|mnist]
     [--policies graded|uniform] [--strata 4]
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import kendalltau

from squeezer.training import train_baseline
from squeezer.evaluators.evaluate import EvalSettings, Evaluator
from squeezer.evaluators.settings import LatencyConfig, RecoveryConfig
from squeezer.evaluators.measurement import Measurement
from squeezer.policies.policy import Policy
from squeezer.spaces.knobs import split_key
from squeezer.spaces.space import SearchSpace
from squeezer.models import load_workload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20, help="random policies")
    ap.add_argument("--steps", type=int, default=150, help="fine-tune steps of the reference score")
    ap.add_argument("--knobs", default="prune,w_bits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 on 2 shared cores can be 5x slower)")
    ap.add_argument("--policies", choices=["graded", "uniform"], default="graded")
    ap.add_argument("--strata", type=int, default=4, help="groups of similar predicted MACs for the within-cost tau")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    knobs = tuple(args.knobs.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "r20.pt"
        base = train_baseline("resnet20", args.data, out=ckpt, seed=args.seed)
        print(f"base ResNet-20 on {args.data}: val accuracy {base.val_accuracy:.4f}")
        untimed = LatencyConfig(mode="none")
        modes = {"none": EvalSettings(recovery=RecoveryConfig(mode="none"), latency=untimed),
                 "bn": EvalSettings(recovery=RecoveryConfig(mode="bn"), latency=untimed),
                 f"kd{args.steps}": EvalSettings(recovery=RecoveryConfig(mode="kd", finetune_steps=args.steps),
                                                 latency=untimed)}
        evaluators = {name: Evaluator(*load_workload(model=str(ckpt), data=args.data), s) for name, s in modes.items()}
        val_size = len(next(iter(evaluators.values())).data.val)
        space = next(iter(evaluators.values())).space
        policies = draw_policies(space, knobs, args.n, args.policies, args.seed)
        macs = [space.predict(p.layers).macs for p in policies]
        scores: dict[str, list[float]] = {name: [] for name in modes}
        seconds: dict[str, float] = {name: 0.0 for name in modes}
        for policy in policies:
            for name, ev in evaluators.items():
                t = time.perf_counter()
                out = ev.evaluate(policy)
                seconds[name] += time.perf_counter() - t
                scores[name].append(out.accuracy if isinstance(out, Measurement) else 0.0)
    ref = f"kd{args.steps}"
    print(f"{args.n} random policies ({args.knobs}), reference: {args.steps}-step distilled fine-tune")
    print("| score | mean accuracy | s/policy | Kendall tau vs reference |")
    print("|---|---|---|---|")
    for name in modes:
        tau = kendalltau(scores[name], scores[ref]).statistic
        mean = sum(scores[name]) / len(scores[name])
        print(f"| {name} | {mean:.3f} | {seconds[name] / args.n:.2f} | {tau:.3f} |")
    order = sorted(range(args.n), key=lambda i: macs[i])
    groups = [order[g * args.n // args.strata:(g + 1) * args.n // args.strata] for g in range(args.strata)]
    print(f"predicted MACs {min(macs):,} to {max(macs):,}; tau within {args.strata} groups of similar MACs "
          f"({', '.join(str(len(g)) for g in groups)} policies), mean over groups:")
    for name in modes:
        taus = [kendalltau([scores[name][i] for i in g], [scores[ref][i] for i in g]).statistic for g in groups]
        print(f"  {name}: {sum(taus) / len(taus):.3f} ({', '.join(f'{t:.2f}' for t in taus)})")
    acc = scores[ref]
    mean = sum(acc) / len(acc)
    spread = (sum((a - mean) ** 2 for a in acc) / max(1, len(acc) - 1)) ** 0.5
    error = (mean * (1 - mean) / val_size) ** 0.5
    print(f"reference scores: std {spread:.4f} across policies vs sampling error {error:.4f} of one score "
          f"({val_size} validation images)")


def draw_policies(space: SearchSpace, knobs: tuple[str, ...], n: int, how: str, seed: int) -> list[Policy]:
    """`n` policies: "uniform" draws every choice independently; "graded" steps from light to heavy compression."""
    rng = random.Random(seed)
    keys = [k for k in space.distributions() if split_key(k)[1] in knobs]
    policies = []
    for i in range(n):
        params = {}
        for key in keys:
            options = space.choices(*split_key(key))
            if how == "uniform":
                params[key] = rng.choice(options)
            else:
                at = (i + 0.5) / n * (len(options) - 1) + rng.choice((-1, 0, 1))
                params[key] = options[min(len(options) - 1, max(0, round(at)))]
        policies.append(Policy.from_params(params, space))
    return policies


if __name__ == "__main__":
    main()
