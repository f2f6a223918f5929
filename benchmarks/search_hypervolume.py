"""Hypervolume of the (accuracy, MACs) front per searcher at equal evaluation counts, over seeds.

    python benchmarks/search_hypervolume.py --evaluator cheap --trials 60 200 --seeds 5 --repair
    python benchmarks/search_hypervolume.py --evaluator fake --trials 20 --seeds 1   # seconds, for a smoke run

Prints and writes (between markers in benchmarks/RESULTS.md) a table of median and IQR of the hypervolume of the
feasible front (accuracy vs MACs fraction of the base) for random, tpe, nsga2 and ddpg, and the uniform-pruning
baseline's accuracy at 50% MACs. Defaults are the demo's: resnet20 on digits, knobs prune and w_bits, budget
macs<=50%. `cheap` = that model trained briefly, policies applied with BN recalibration (a repeated policy is
scored once, as the real evaluator's cache does); `fake` = the deterministic stand-in of tests/fakes.py.

Two reference points: (chance accuracy, the budget's MACs fraction), the corner of the region a feasible, useful
policy can occupy, is the headline; (0, 1) is also printed, but it credits every searcher with the same area for
MACs between the budget and the base and accuracy below chance, which compresses differences between searchers.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

from squeezer.search.baselines import uniform_at
from squeezer.search.budget import Budget
from squeezer.search.config import SearchConfig
from squeezer.search.study import run_search
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the search's stand-ins live with the tests
from fakes import CheapEvaluator, FakeEvaluator, InlinePool  # noqa: E402

MARK_START, MARK_END = "<!-- search_hypervolume:start -->", "<!-- search_hypervolume:end -->"


class Cached:
    """Scores each distinct policy once (the evaluations are seeded, so a repeat would give the same numbers)."""

    def __init__(self, evaluate) -> None:
        self.evaluate, self.memory = evaluate, {}

    def __call__(self, policy):
        key = json.dumps({u: c.changed() for u, c in sorted(policy.layers.items()) if not c.is_neutral()})
        if key not in self.memory:
            self.memory[key] = self.evaluate(policy)
        return self.memory[key]


def _evaluator(kind: str, steps: int, knobs: tuple[str, ...]):
    if kind == "cheap":
        return CheapEvaluator(steps=steps, knobs=knobs)
    import torch

    from squeezer.models import resnet20
    from squeezer.spaces.space import SearchSpace

    torch.manual_seed(0)
    space = SearchSpace.from_model(resnet20(num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8),
                                   knobs=knobs)
    return FakeEvaluator(space)


def run(*, evaluator: str, trials: list[int], seeds: int, samplers: list[str], budget: str, repair: bool,
        steps: int, knobs: tuple[str, ...]) -> tuple[list[dict], float]:
    ev = _evaluator(evaluator, steps, knobs)
    score = Cached(ev)
    base = ev.base()
    limit = Budget.parse(budget).limits[0]
    classes = ev.data.num_classes if hasattr(ev, "data") else 10
    ref = (1.0 / classes, limit.value if limit.relative else limit.value / base.macs)
    rows = []
    for n in trials:
        for sampler in samplers:
            hvs, hvs01, seconds, at_half = [], [], [], []
            for seed in range(seeds):
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    # In memory: storage speed is not what is compared here (search_orchestration.py measures it).
                    config = SearchConfig(budget=budget, sampler=sampler, trials=n, seed=seed,
                                          repair=repair and sampler != "ddpg",
                                          storage=optuna.storages.InMemoryStorage())
                    result = run_search(ev.space, InlinePool(score), base, out=Path(tmp), config=config)
                    seconds.append(time.perf_counter() - start)
                    hvs.append(result.hypervolume("macs", ref=ref))
                    hvs01.append(result.hypervolume("macs"))
                    best = result.best_under("macs<=50%")
                    at_half.append(best.accuracy if best else 0.0)
            q1, med, q3 = np.percentile(hvs, [25, 50, 75])
            rows.append({"trials": n, "sampler": sampler, "median": med, "iqr": q3 - q1, "seeds": seeds,
                         "median01": float(np.median(hvs01)), "ref": ref,
                         "seconds": float(np.median(seconds)), "at_half": float(np.median(at_half))})
            print(f"{n:>4} {sampler:>7}  HV median {med:.4f}  IQR {q3 - q1:.4f}  HV(0,1) {np.median(hvs01):.4f}  "
                  f"best acc at <=50% MACs "
                  f"{np.median(at_half):.4f}  ({np.median(seconds):.0f} s/run)", flush=True)
    uniform = ev(uniform_at(ev.space, 0.5, metric="macs", knob="prune"))
    return rows, float(getattr(uniform, "accuracy", float("nan")))


def markdown(rows: list[dict], uniform_acc: float, *, command: str, evaluator: str, budget: str,
             knobs: tuple[str, ...]) -> str:
    ref = rows[0]["ref"]
    lines = [MARK_START, "## Search: hypervolume at equal evaluations", "",
             f"`{command}` ({time.strftime('%Y-%m-%d')}, evaluator `{evaluator}`, knobs {','.join(knobs)}, budget "
             f"`{budget}`; hypervolume of the feasible (accuracy, MACs fraction) front against reference "
             f"({ref[0]:.2f}, {ref[1]:.2f}) = (chance accuracy, the budget), and against (0, 1))", "",
             "| trials | searcher | HV median | HV IQR | x random | HV (0,1) median | x random | "
             "best accuracy at <=50% MACs (median) | seeds | s/run |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    random_of = {r["trials"]: r for r in rows if r["sampler"] == "random"}
    for r in rows:
        rnd = random_of.get(r["trials"])
        ratio = f"{r['median'] / rnd['median']:.2f}" if rnd and rnd["median"] else "-"
        ratio01 = f"{r['median01'] / rnd['median01']:.2f}" if rnd and rnd["median01"] else "-"
        lines.append(f"| {r['trials']} | {r['sampler']} | {r['median']:.4f} | {r['iqr']:.4f} | {ratio} | "
                     f"{r['median01']:.4f} | {ratio01} | {r['at_half']:.4f} | {r['seeds']} | {r['seconds']:.0f} |")
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
    parser.add_argument("--budget", default="macs<=50%")
    parser.add_argument("--knobs", nargs="+", default=["prune", "w_bits"], help="knobs of the space searched")
    parser.add_argument("--repair", action="store_true", help="repair Optuna samplers' draws into the budget")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the cheap evaluator's model")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # two threads on two shared cores slow small models 5-10x (OpenMP barriers)
    rows, uniform_acc = run(evaluator=args.evaluator, trials=args.trials, seeds=args.seeds, samplers=args.samplers,
                            budget=args.budget, repair=args.repair, steps=args.steps,
                            knobs=tuple(args.knobs))
    command = "python benchmarks/search_hypervolume.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = markdown(rows, uniform_acc, command=command, evaluator=args.evaluator, budget=args.budget,
                    knobs=tuple(args.knobs))
    print(text)
    write_results(text, args.results)


if __name__ == "__main__":
    main()
