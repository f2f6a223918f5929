"""Does the cheap score rank policies as the fine-tuned score does? Kendall tau over random policies.

AMC and later work rank candidates by a cheap proxy (no fine-tune, or BN recalibration) and fine-tune only the
winners; that is only sound if the proxy preserves the ranking. This script scores `--n` random policies of
ResNet-20 on digits with recovery none, bn and a `--steps`-step distilled fine-tune (the reference) and prints the
Kendall tau of each cheap score against the reference. It also prints how far apart the reference scores are
compared with their sampling error on the validation split: when the fine-tuned policies all land within a few
images of each other, no score can reproduce their order and tau says little.

Run: python benchmarks/eval_rank_correlation.py [--n 20] [--steps 150] [--knobs prune,w_bits] [--data digits|mnist]
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import kendalltau

from squeezer.evaluators.baseline import train_baseline
from squeezer.evaluators.evaluate import EvalSettings, Evaluator
from squeezer.evaluators.measurement import Measurement
from squeezer.policies.policy import Policy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20, help="random policies")
    ap.add_argument("--steps", type=int, default=150, help="fine-tune steps of the reference score")
    ap.add_argument("--knobs", default="prune,w_bits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 on 2 shared cores can be 5x slower)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    knobs = tuple(args.knobs.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "r20.pt"
        base = train_baseline("resnet20", args.data, out=ckpt, seed=args.seed)
        print(f"base ResNet-20 on {args.data}: val accuracy {base.val_accuracy:.4f}")
        modes = {"none": EvalSettings(recovery="none", latency="none"),
                 "bn": EvalSettings(recovery="bn", latency="none"),
                 f"kd{args.steps}": EvalSettings(recovery="kd", finetune_steps=args.steps, latency="none")}
        evaluators = {name: Evaluator(str(ckpt), args.data, s) for name, s in modes.items()}
        val_size = len(next(iter(evaluators.values())).data.val)
        space = next(iter(evaluators.values())).space
        rng = random.Random(args.seed)
        choices = {k: c for k, c in space.distributions().items() if k.rsplit("/", 1)[1] in knobs}
        policies = [Policy.from_params({k: rng.choice(c) for k, c in choices.items()}, space) for _ in range(args.n)]
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
    acc = scores[ref]
    mean = sum(acc) / len(acc)
    spread = (sum((a - mean) ** 2 for a in acc) / max(1, len(acc) - 1)) ** 0.5
    error = (mean * (1 - mean) / val_size) ** 0.5
    print(f"reference scores: std {spread:.4f} across policies vs sampling error {error:.4f} of one score "
          f"({val_size} validation images)")


if __name__ == "__main__":
    main()
