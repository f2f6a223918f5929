"""Hypervolume of the (accuracy, MACs) front per searcher at equal evaluation counts, over seeds.

    python benchmarks/search_hypervolume.py --evaluator cheap --trials 60 200 --seeds 5
    python benchmarks/search_hypervolume.py --evaluator fake --trials 20 --seeds 1   # seconds, for a smoke run

Prints and writes (between markers in benchmarks/RESULTS.md) a table of median and IQR of the hypervolume (accuracy
vs MACs fraction of the base, reference (0, 1)) of the feasible front for random, tpe, nsga2 and ddpg, and the
uniform-pruning baseline's accuracy at 50% MACs. `cheap` = resnet20 trained briefly on digits, policies applied
with BN recalibration; `fake` = the deterministic stand-in of squeezer.search.testing.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

from squeezer.search.baselines import uniform_at
from squeezer.search.study import run_search
from squeezer.search.testing import CheapEvaluator, FakeEvaluator, InlinePool

MARK_START, MARK_END = "<!-- search_hypervolume:start -->", "<!-- search_hypervolume:end -->"


def _evaluator(kind: str, steps: int):
    if kind == "cheap":
        return CheapEvaluator(steps=steps, knobs=("prune",))
    import torch

    from squeezer.evaluators.zoo import resnet20
    from squeezer.spaces.space import SearchSpace

    torch.manual_seed(0)
    space = SearchSpace.from_model(resnet20(num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8),
                                   knobs=("prune", "w_bits", "rank"))
    return FakeEvaluator(space)


def run(*, evaluator: str, trials: list[int], seeds: int, samplers: list[str], budget: str, repair: bool,
        steps: int) -> tuple[list[dict], float]:
    ev = _evaluator(evaluator, steps)
    base = ev.base()
    rows = []
    for n in trials:
        for sampler in samplers:
            hvs, seconds, at_half = [], [], []
            for seed in range(seeds):
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    # In memory: storage speed is not what is compared here (search_orchestration.py measures it).
                    result = run_search(ev.space, InlinePool(ev), budget, base, out=Path(tmp), sampler=sampler,
                                        trials=n, seed=seed, repair=repair and sampler != "ddpg",
                                        storage=optuna.storages.InMemoryStorage())
                    seconds.append(time.perf_counter() - start)
                    hvs.append(result.hypervolume("macs"))
                    best = result.best_under("macs<=50%")
                    at_half.append(best["accuracy"] if best else 0.0)
            q1, med, q3 = np.percentile(hvs, [25, 50, 75])
            rows.append({"trials": n, "sampler": sampler, "median": med, "iqr": q3 - q1, "seeds": seeds,
                         "seconds": float(np.median(seconds)), "at_half": float(np.median(at_half))})
            print(f"{n:>4} {sampler:>7}  HV median {med:.4f}  IQR {q3 - q1:.4f}  best acc at <=50% MACs "
                  f"{np.median(at_half):.4f}  ({np.median(seconds):.0f} s/run)", flush=True)
    uniform = ev(uniform_at(ev.space, 0.5, metric="macs", knob="prune"))
    return rows, float(getattr(uniform, "accuracy", float("nan")))


def markdown(rows: list[dict], uniform_acc: float, *, command: str, evaluator: str, budget: str) -> str:
    lines = [MARK_START, "## Search: hypervolume at equal evaluations", "",
             f"`{command}` ({time.strftime('%Y-%m-%d')}, evaluator `{evaluator}`, budget `{budget}`; hypervolume "
             "of the feasible (accuracy, MACs fraction) front, reference (0, 1))", "",
             "| trials | searcher | HV median | HV IQR | best accuracy at <=50% MACs (median) | seeds | s/run |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['trials']} | {r['sampler']} | {r['median']:.4f} | {r['iqr']:.4f} | {r['at_half']:.4f} | "
              f"{r['seeds']} | {r['seconds']:.0f} |" for r in rows]
    lines += ["", f"Uniform pruning at 50% MACs: accuracy {uniform_acc:.4f}.", MARK_END]
    return "\n".join(lines) + "\n"


def write_results(text: str, path: Path) -> None:
    """Replace this benchmark's section of RESULTS.md (other benchmarks' sections are left alone)."""
    old = path.read_text() if path.is_file() else "# Benchmark results\n"
    if MARK_START in old and MARK_END in old:
        head, rest = old.split(MARK_START, 1)
        new = head + text.rstrip("\n") + rest.split(MARK_END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--evaluator", choices=("cheap", "fake"), default="cheap")
    parser.add_argument("--trials", type=int, nargs="+", default=[60, 200])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--samplers", nargs="+", default=["random", "tpe", "nsga2", "ddpg"])
    parser.add_argument("--budget", default="macs<=75%")
    parser.add_argument("--repair", action="store_true", help="repair Optuna samplers' draws into the budget")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the cheap evaluator's model")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args(argv)
    rows, uniform_acc = run(evaluator=args.evaluator, trials=args.trials, seeds=args.seeds, samplers=args.samplers,
                            budget=args.budget, repair=args.repair, steps=args.steps)
    command = "python benchmarks/search_hypervolume.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = markdown(rows, uniform_acc, command=command, evaluator=args.evaluator, budget=args.budget)
    print(text)
    write_results(text, args.results)


if __name__ == "__main__":
    main()
