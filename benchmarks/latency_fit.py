"""Which correction of the latency table's sums predicts best: the one the table uses against the alternatives.

Times the table for a space (each entry over `--table-reps` sessions, as a search's table), then a pool of whole
random policies of the three calibration kinds (any knob, float only, a few int8 units), each once, as a search
times a candidate (`--reps` sessions). Offline, on those same timings, it draws `--draws` sets of 16 calibration
policies (as the table does: the kinds in turn), fits each correction to them and predicts the other policies:

- now: slopes for the structural sum, the policy's MAC change (from shapes) and the MAC-scaled and unscaled
  bit-width sums (`fit_slopes`);
- no MAC term: slopes for the structural sum and the two bit-width sums;
- structure as summed: the structural sum as it is, slopes for the two bit-width sums (the table until 2026-11-30 (6));
- uncorrected: 1 + the structural and MAC-scaled bit-width sums (what the table predicts before it has points).

Run: python benchmarks/latency_fit.py [--data digits|mnist] [--knobs prune w_bits a_bits rank block] [--per-kind 32]
     [--draws 300] [--save timings.json] [--reps 3] [--table-reps 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from squeezer.evaluators.evaluate import EvalSettings, Evaluator
from squeezer.evaluators.settings import LatencyConfig
from squeezer.evaluators.latency import (LatencyTable, calibration_policies, choice_parts, fit_slopes, is_bits,
                                         nonneg_lstsq, table_entries)
from squeezer.spaces.knobs import BITS, KNOBS, SpaceConfig
from squeezer.spaces.space import SearchSpace
from squeezer.models import load_workload

Fit = Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], float]]  # (sums, measured) -> sums -> predicted


def _now(s: np.ndarray, m: np.ndarray) -> Callable[[np.ndarray], float]:
    a, mac, b, c = fit_slopes([[*row, mv] for row, mv in zip(s, m)])
    return lambda row: 1 + a * row[0] + b * row[1] + c * row[2] + mac * row[3]


def _no_mac_term(s: np.ndarray, m: np.ndarray) -> Callable[[np.ndarray], float]:
    coef = nonneg_lstsq(s[:, :3], m - 1)
    return lambda row: 1 + float(row[:3] @ coef)


def _structure_as_summed(s: np.ndarray, m: np.ndarray) -> Callable[[np.ndarray], float]:
    b, c = nonneg_lstsq(s[:, 1:3], m - 1 - s[:, 0])
    return lambda row: 1 + row[0] + b * row[1] + c * row[2]


FITS: dict[str, Fit] = {"now": _now, "no MAC term": _no_mac_term, "structure as summed": _structure_as_summed,
                        "uncorrected": lambda s, m: (lambda row: 1 + row[0] + row[1])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--knobs", nargs="+", default=list(KNOBS))
    ap.add_argument("--per-kind", type=int, default=32, help="timed policies of each kind (half to calibrate)")
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default="digits", help="digits (8x8) or mnist (28x28): the input timed")
    ap.add_argument("--save", default=None, help="also write the timings and sums to this JSON file")
    ap.add_argument("--reps", type=int, default=LatencyConfig.reps,
                    help="sessions of each model per timing of a whole policy, as a search times a candidate (min 3)")
    ap.add_argument("--table-reps", type=int, default=LatencyConfig.table_reps,
                    help="sessions per timing of a table entry (as many runs in all, split among them)")
    args = ap.parse_args()
    if not any(KNOBS[k].role == BITS for k in args.knobs if k in KNOBS):
        ap.error("give w_bits or a_bits among --knobs: errors are reported for policies with and without int8 units")
    if args.per_kind < 8:
        ap.error("--per-kind must be at least 8: 16 policies calibrate, the rest are predicted")
    torch.set_num_threads(args.threads)
    ev = Evaluator(*load_workload(model="resnet20", data=args.data),
                   EvalSettings(latency=LatencyConfig(mode="measure", threads=args.threads, reps=args.reps,
                                                      table_reps=args.table_reps)))
    assert ev.meter is not None
    space = SearchSpace.from_model(ev.base, ev.example, SpaceConfig(knobs=tuple(args.knobs)))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as lut_dir:
        table = LatencyTable(ev._table_meter(), ev._onnx_of, key=ev.space.fingerprint,
                             fingerprint=ev.space.fingerprint, cache_dir=lut_dir, space=ev.space)
        table.fill(table_entries(space))
        policies = calibration_policies(space, 3 * args.per_kind, seed=11)
        sums = np.array([table.sums(p) for p in policies])
        measured = np.array([ev.meter.measure(ev._onnx_of(p)).rel for p in policies])
    print(f"knobs {','.join(args.knobs)}: table and {len(policies)} policies timed in "
          f"{time.perf_counter() - start:.0f} s")
    kind = np.arange(len(policies)) % 3
    if args.save:
        Path(args.save).write_text(json.dumps({"knobs": args.knobs, "data": args.data, "sums": sums.tolist(),
                                               "measured": measured.tolist(),
                                               "policies": [p.to_json() for p in policies]}))
    int8 = np.array([any(is_bits(part) for c in p.layers.values() for part in choice_parts(c)) for p in policies])
    rng = np.random.default_rng(0)
    errors: dict[str, dict[str, list[float]]] = {name: {"with int8 units": [], "float only": [], "all": []}
                                                 for name in FITS}
    for _ in range(args.draws):
        calib = np.concatenate([rng.choice(np.flatnonzero(kind == k), n, replace=False)
                                for k, n in zip(range(3), (6, 5, 5))])  # 16, the kinds in turn as the table has them
        test = np.setdiff1d(np.arange(len(policies)), calib)
        for name, fit in FITS.items():
            predict = fit(sums[calib], measured[calib])
            err = {i: abs(max(0.05, predict(sums[i])) - measured[i]) / measured[i] for i in test}
            errors[name]["with int8 units"].append(statistics.median(err[i] for i in test if int8[i]))
            errors[name]["float only"].append(statistics.median(err[i] for i in test if not int8[i]))
            errors[name]["all"].append(statistics.median(err.values()))
    print(f"median relative error over {args.draws} draws of 16 calibration policies "
          f"({int(int8.sum())} policies with int8 units, {int((~int8).sum())} float only):")
    print(f"{'correction':<22} {'with int8 units':>16} {'float only':>11} {'all':>6}")
    for name, by in errors.items():
        print(f"{name:<22} " + " ".join(f"{statistics.median(by[k]):{w}.3f}"
                                        for k, w in (("with int8 units", 16), ("float only", 11), ("all", 6))))


if __name__ == "__main__":
    main()
