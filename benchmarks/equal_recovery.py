"""Equal recovery: does the searched pruning policy beat the baselines once every method gets the same fine-tune?

A search scores candidates with a cheap recovery (BatchNorm statistics re-estimated), but a user ships the model
after a real fine-tune. This script prunes one trained model to each budget by every method, gives every pruned
model the identical recovery (the same distilled fine-tune from the unpruned model: same steps, data order and seed)
and scores it on the held-out test split, which no method ever saw:

- `tpe` (or any `--samplers`: random, ddpg, ...): `search_policies` with `--trials` evaluations, its most accurate
  feasible trial (one within a point of the budget's MACs when there is one), applied by `apply`;
- `uniform`: the project's uniform prune policy under the budget (`search/baselines.py`'s `uniform_at`);
- `tp-global`: Torch-Pruning's global pruning (GroupMagnitudeImportance, L2, `global_pruning=True`);
- `tp-uniform-l1`: Torch-Pruning's per-layer uniform L1 pruning.

Torch-Pruning's ratio is bisected to the largest MACs at or under the budget, with the same channel rounding as the
project's space (`--channel-round`). Seeds drive the search and the recovery; the base model is trained once
(seed 0), so the baselines' pruned models are the same for every seed and only their recovery differs. For each
budget the table gives MACs (fraction of the base, by the project's counter), test accuracy after BN
re-estimation and after the fine-tune (mean and sample sd over seeds), then for each searched method the paired
difference to the best baseline (mean ± sd over seeds), the pooled sd of the two methods' scores and whether the
gain exceeds twice it, and the wall time of search + recovery against the baseline's recovery alone.

Run: python benchmarks/equal_recovery.py [--data mnist] [--budgets 'macs<=25%' 'macs<=12%' 'macs<=6%']
     [--seeds 0 1 2] [--trials 30] [--samplers tpe random] [--kd-steps 400] [--channel-round 4] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

import squeezer
from squeezer.evaluators.accuracy import recover
from squeezer.evaluators.cost import count_macs
from squeezer.evaluators.data import DataBundle
from squeezer.evaluators.evaluate import EvalSettings, Evaluator
from squeezer.evaluators.finetune import evaluate
from squeezer.evaluators.pool import PoolConfig
from squeezer.evaluators.settings import LatencyConfig, RecoveryConfig
from squeezer.inspection import load_result
from squeezer.models import load_workload
from squeezer.search.baselines import uniform_at
from squeezer.search.budget import Budget
from squeezer.search.config import SearchConfig
from squeezer.spaces.knobs import PRUNE, SpaceConfig
from squeezer.spaces.space import SearchSpace
from squeezer.training import train_baseline

BN = RecoveryConfig(mode="bn")  # what the search scores candidates with, and every method's first recovery


@dataclass
class Scores:
    """One method at one budget: per seed, MACs fraction, test accuracy before and after the fine-tune, seconds
    spent finding the policy (search + apply) and recovering it."""

    macs: list[float] = field(default_factory=list)
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    find_s: list[float] = field(default_factory=list)
    recover_s: list[float] = field(default_factory=list)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--train-steps", type=int, default=300, help="training steps of the base model (seed 0)")
    ap.add_argument("--budgets", nargs="+", default=["macs<=25%", "macs<=12%", "macs<=6%"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=30, help="evaluations of each search")
    ap.add_argument("--samplers", nargs="+", default=["tpe", "random"], help="searched methods (tpe, random, ddpg..)")
    ap.add_argument("--kd-steps", type=int, default=400, help="distilled fine-tune steps every method gets")
    ap.add_argument("--kd-lr", type=float, default=0.01)
    ap.add_argument("--channel-round", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 on 2 shared cores can be 5x slower)")
    ap.add_argument("--work", default=None, help="folder for the base model and the runs (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = work / f"{args.model}-{args.data}.pt"
        if not ckpt.is_file():
            trained = train_baseline(args.model, args.data, out=ckpt, steps=args.train_steps, seed=0)
            print(f"trained {args.model} on {args.data} in {trained.seconds:.0f} s")
        base, bundle = load_workload(model=str(ckpt), data=args.data)
        base.eval()
        example = bundle.example_inputs()
        base_macs = count_macs(base, example)[0]
        base_test = evaluate(base, bundle.test)[0]
        print(f"base {args.model} on {args.data}: test accuracy {base_test:.4f} ({len(bundle.test)} test images), "
              f"{base_macs:,} MACs")
        space = SearchSpace.from_model(base, example, SpaceConfig(knobs=(PRUNE,), round_to=args.channel_round))
        recovery = RecoveryConfig(mode="kd", finetune_steps=args.kd_steps, finetune_lr=args.kd_lr)

        def finish(model: nn.Module, seed: int, found_s: float, into: Scores, name: str) -> None:
            """The identical recovery every method gets, and the test scores before and after it (each printed as
            it comes, so a stopped run keeps what it measured)."""
            into.macs.append(count_macs(model, example)[0] / base_macs)
            into.before.append(evaluate(model, bundle.test)[0])
            start = time.perf_counter()
            tuned = recover(copy.deepcopy(model), recovery, bundle, teacher=base, seed=seed)
            into.recover_s.append(time.perf_counter() - start)
            into.after.append(evaluate(tuned, bundle.test)[0])
            into.find_s.append(found_s)
            print(f"  seed {seed} {name}: MACs {into.macs[-1]:.3f}, test {into.before[-1]:.4f} after BN, "
                  f"{into.after[-1]:.4f} after the fine-tune ({found_s:.0f} s + {into.recover_s[-1]:.0f} s)",
                  flush=True)

        for text in args.budgets:
            limit = Budget.parse(text).limits[0]
            target = limit.value
            results: dict[str, Scores] = {}
            fixed = fixed_baselines(base, bundle, space, target, args.channel_round, base_macs)
            for seed in args.seeds:
                for name, (model, found_s) in fixed.items():
                    bn = recover(copy.deepcopy(model), BN, bundle, seed=seed)  # as `apply` recovers a policy
                    finish(bn, seed, found_s, results.setdefault(name, Scores()), name)
                for sampler in args.samplers:
                    model, found_s = searched(ckpt, args.data, work / f"{sampler}-{target:.3f}-s{seed}", text,
                                              sampler=sampler, trials=args.trials, seed=seed,
                                              channel_round=args.channel_round, target=target, threads=args.threads)
                    finish(model, seed, found_s, results.setdefault(sampler, Scores()), sampler)
                print(f"  {text} seed {seed} done", flush=True)
            report(text, target, results, args.samplers, base_test)


def searched(ckpt: Path, data: str, out: Path, budget: str, *, sampler: str, trials: int, seed: int,
             channel_round: int, target: float, threads: int) -> tuple[nn.Module, float]:
    """The search's pick applied (BN-recovered as the search scored it), and the seconds of search + apply."""
    start = time.perf_counter()
    squeezer.search_policies(model=str(ckpt), data=data, out=out, budget=budget, latency="none", recovery="bn",
                             search=SearchConfig(trials=trials, sampler=sampler, knobs=(PRUNE,), seed=seed,
                                                 channel_round=channel_round),
                             pool=PoolConfig(workers=1, backend="local", eval_threads=threads))
    result = load_result(out)
    feasible = [r for r in result.completed() if r.feasible and r.accuracy is not None]
    if not feasible:
        raise SystemExit(f"{sampler} seed {seed}: no feasible trial under {budget}; search longer")
    base = result.base.macs
    near = [r for r in feasible if r.macs is not None and r.macs >= (target - 0.01) * base]
    pick = max(near or feasible, key=lambda r: r.accuracy)
    applied = squeezer.apply(out, trial=pick.number, out=out / "picked.pt", latency=False)
    assert applied.model is not None
    return applied.model, time.perf_counter() - start


def fixed_baselines(base: nn.Module, bundle: DataBundle, space: SearchSpace, target: float, channel_round: int,
                    base_macs: int) -> dict[str, tuple[nn.Module, float]]:
    """The pruned (not yet recovered) models of the methods that do not depend on the seed, and their seconds."""
    out = {}
    example = bundle.example_inputs()
    start = time.perf_counter()
    policy = uniform_at(space, target, metric="macs", knob=PRUNE, levels=81)
    no_recovery = EvalSettings(recovery=RecoveryConfig(mode="none"), latency=LatencyConfig(mode="none"))
    out["uniform"] = (Evaluator(base, bundle, no_recovery, space=space).compress(policy), time.perf_counter() - start)
    for name, importance, whole in (("tp-global", tp.importance.GroupMagnitudeImportance(p=2), True),
                                    ("tp-uniform-l1", tp.importance.GroupMagnitudeImportance(p=1), False)):
        start = time.perf_counter()
        model = _bisect(lambda r: _tp_prune(base, example, importance, r, whole, channel_round), example, target,
                        base_macs)
        out[name] = (model, time.perf_counter() - start)
    return out


def _tp_prune(base: nn.Module, example: torch.Tensor, importance: object, ratio: float, whole: bool,
              channel_round: int) -> nn.Module:
    model = copy.deepcopy(base).eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, example, importance=importance, global_pruning=whole, pruning_ratio=ratio,
                                  ignored_layers=[head], round_to=channel_round)
    pruner.step()
    return model


def _bisect(prune: Callable[[float], nn.Module], example: torch.Tensor, target: float, base_macs: int) -> nn.Module:
    """The model pruned at the smallest ratio whose MACs are at or under `target` of the base."""
    lo, hi = 0.0, 0.99
    best = prune(hi)
    if count_macs(best, example)[0] > target * base_macs:
        raise SystemExit(f"Torch-Pruning at ratio {hi} keeps more than {target:.1%} of the MACs: that method cannot "
                         "reach the budget here (try another --channel-round)")
    for _ in range(12):
        mid = (lo + hi) / 2
        model = prune(mid)
        if count_macs(model, example)[0] <= target * base_macs:
            hi, best = mid, model
        else:
            lo = mid
    return best


def report(budget: str, target: float, results: dict[str, Scores], samplers: list[str], base_test: float) -> None:
    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    def sd(xs: list[float]) -> float:
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    print(f"\n### {budget} (unpruned test accuracy {base_test:.4f})\n")
    print("| method | MACs of base (per seed) | test acc. after BN re-estimation | test acc. after the same fine-tune "
          "| mean ± sd | find s | recover s |")
    print("|---|---|---|---|---:|---:|---:|")
    for name, s in results.items():
        flag = "" if all(abs(m - target) <= 0.01 for m in s.macs) else " (not within 1 point)"
        print(f"| {name} | {' / '.join(f'{m:.3f}' for m in s.macs)}{flag} | {' / '.join(f'{a:.3f}' for a in s.before)}"
              f" | {' / '.join(f'{a:.3f}' for a in s.after)} | {mean(s.after):.4f} ± {sd(s.after):.4f} "
              f"| {mean(s.find_s):.0f} | {mean(s.recover_s):.0f} |")
    baselines = [n for n in results if n not in samplers]
    best = max(baselines, key=lambda n: mean(results[n].after))
    ref = results[best]
    print(f"\nbest baseline: {best} ({mean(ref.after):.4f})")
    for name in samplers:
        s = results[name]
        diffs = [a - b for a, b in zip(s.after, ref.after)]
        pooled = ((sd(s.after) ** 2 + sd(ref.after) ** 2) / 2) ** 0.5
        gain = mean(diffs)
        verdict = "one seed: no spread to judge by" if len(diffs) < 2 else \
            "beats it beyond twice the pooled sd" if gain > 2 * pooled and gain > 0 else \
            "does NOT beat it beyond twice the pooled sd"
        cost = mean(s.find_s) + mean(s.recover_s)
        print(f"{name} - {best}: {100 * gain:+.2f} points (paired sd {100 * sd(diffs):.2f}; pooled sd "
              f"{100 * pooled:.2f}): {verdict}; wall time search + recovery {cost:.0f} s vs the baseline's recovery "
              f"alone {mean(ref.recover_s):.0f} s")


if __name__ == "__main__":
    main()
