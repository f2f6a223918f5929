"""One policy in, one Outcome out: apply -> measured cost -> recovery -> val accuracy -> ONNX -> latency.

An `Evaluator` is built once per worker (loading the model and data, tracing the space unless it is handed one,
and exporting the reference ONNX cost seconds) and then evaluates many policies. It never raises: a policy that
cannot be applied, or that scores NaN, comes back as `EvalFailure(reason)`, so one bad candidate never stops a
search. Results are cached in memory and optionally on disk, keyed by the policy's choices and the settings, so a
repeated policy is never evaluated twice.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from squeezer.evaluators.accuracy import recover, score
from squeezer.evaluators.cost import measure_cost
from squeezer.evaluators.data import DataBundle
from squeezer.evaluators.latency import (LatencyMeter, LatencyResult, LatencyTable, MachineLock, calibration_policies,
                                         MIN_REPS, hardware_fingerprint, table_entries)
from squeezer.evaluators.mac_count import mac_counter
from squeezer.evaluators.measurement import EvalFailure, Measurement, Outcome
from squeezer.evaluators.settings import LATENCY_MODES, EvalSettings
from squeezer.policies.apply import apply_policy
from squeezer.policies.clone import clone_module
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import Policy
from squeezer.spaces.space import SearchSpace

__all__ = ["EvalSettings", "Evaluator", "LATENCY_MODES", "worker_evaluator"]

def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def outcome_to_json(outcome: Outcome) -> dict[str, Any]:
    if isinstance(outcome, EvalFailure):
        return {"failure": asdict(outcome)}
    return {"measurement": asdict(outcome)}


def outcome_from_json(data: dict[str, Any]) -> Outcome:
    if "failure" in data:
        return EvalFailure(**data["failure"])
    return Measurement(**data["measurement"])


class Evaluator:
    """Holds the base model, data, space, calibration batches and reference ONNX of one worker.

    `space` is the model's SearchSpace when the caller has traced it already (the search's driver has, and hands
    it to every worker), so no process traces the model twice."""

    def __init__(self, model: nn.Module, data: DataBundle, settings: EvalSettings = EvalSettings(),
                 *, space: SearchSpace | None = None, cache_dir: str | Path | None = None,
                 lut_dir: str | Path | None = None, lock: MachineLock | None = None,
                 latency_fn: Callable[[bytes], LatencyResult] | None = None,
                 hardware: dict[str, Any] | None = None) -> None:
        self.settings = settings
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for but torch sees no GPU: use device 'cpu'")
        self.data = data.for_device(settings.device)
        self.device = torch.device(settings.device)
        self.base = copy.deepcopy(model).eval()
        self.example = self.data.example_inputs(1)
        self.space = space if space is not None else SearchSpace.from_model(self.base, self.example)
        # fvcore's count, or a forward pass that matches it (watching the units, whose MACs BOPs weigh)
        self.count_macs = mac_counter(self.base, self.example, watch=self.space.units)
        self.calibration = self.data.calibration()
        self.lock = lock or MachineLock()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._lut_dir = lut_dir or cache_dir
        self._memory: dict[str, Outcome] = {}
        self.hits = 0
        self.count = 0
        self._latency_fn = latency_fn
        self.meter: LatencyMeter | None = None
        self.table: LatencyTable | None = None
        self.reference: bytes | None = None
        latency = settings.latency
        if latency.mode != "none":
            with self.lock.compute():
                self.reference = export_onnx(self.base, self.example)
            if latency_fn is None:
                self.meter = self._new_meter(latency.runs, latency.reps)
            if latency.mode in ("predict", "hybrid"):
                if self.meter is None:
                    raise ValueError("latency 'predict'/'hybrid' builds its table locally: drop latency_fn")
                self.table = self._new_table()
        self.base_model = self.base.to(self.device)
        self._apply_memo: dict[str, Any] = {}  # what applying policies derives from base_model alone
        self.hardware = hardware or hardware_fingerprint(latency.threads)  # of the timing machine

    def _new_table(self) -> LatencyTable:
        return LatencyTable(self._table_meter(), self._onnx_of, key=self.space.fingerprint,
                            fingerprint=self.space.fingerprint, cache_dir=self._lut_dir, space=self.space)

    def _table_meter(self) -> LatencyMeter:
        """The lookup table's meter: as many timed runs as a candidate's timing, over `table_reps` sessions.

        Each session of a model runs at its own speed, whatever the session options, and a prediction sums many
        entries' errors, so where inputs are tiny more sessions help; elsewhere they only make the table slower to
        build (benchmarks/latency_fit.py, benchmarks/RESULTS.md). Hence 3 by default, where the table shares the
        candidates' meter."""
        meter = self.meter
        assert meter is not None
        reps = max(MIN_REPS, self.settings.latency.table_reps)
        return meter if reps == meter.reps else self._new_meter(max(1, meter.runs * meter.reps // reps), reps)

    def _new_meter(self, runs: int, reps: int) -> LatencyMeter:
        """A meter of this model against its ONNX reference, with the settings' batch, threads and warm-up."""
        s = self.settings.latency
        assert self.reference is not None
        return LatencyMeter(self.reference, tuple(self.example.shape), batch=s.batch, threads=s.threads,
                            warmup=s.warmup, runs=runs, reps=reps, lock=self.lock)

    # ---- cache ------------------------------------------------------------------------------------------------------
    def key(self, policy: Policy) -> str:
        """Cache key: the policy's choices and model fingerprint (not its meta) plus every setting."""
        body = policy.to_json()
        body.pop("meta", None)
        # the one-level names keep the keys of outcomes cached before the settings were split into configs
        text = json.dumps({"policy": body, "settings": self.settings.flat()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def _cached(self, key: str) -> Outcome | None:
        if key in self._memory:
            return self._memory[key]
        if self.cache_dir is not None:
            path = self.cache_dir / f"{key}.json"
            if path.is_file():
                try:
                    outcome = outcome_from_json(json.loads(path.read_text()))
                except (ValueError, TypeError, OSError):
                    return None
                self._memory[key] = outcome
                return outcome
        return None

    def _store(self, key: str, outcome: Outcome) -> None:
        self._memory[key] = outcome
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_dir / f"{key}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(outcome_to_json(outcome)))
            tmp.replace(self.cache_dir / f"{key}.json")

    # ---- evaluation --------------------------------------------------------------------------------------------------
    def evaluate(self, policy: Policy) -> Outcome:
        """Measure `policy` (or return its cached outcome); never raises."""
        key = self.key(policy)
        cached = self._cached(key)
        if cached is not None:
            self.hits += 1
            return cached
        start = time.perf_counter()
        try:
            outcome = self._evaluate(policy, start)
        except Exception as exc:  # any failure of one candidate is a value, not a crash of the search
            outcome = EvalFailure(_reason(exc), time.perf_counter() - start)
        self._store(key, outcome)
        return outcome

    __call__ = evaluate

    def base_measurement(self) -> Outcome:
        """The unmodified model's outcome (the search's reference point)."""
        return self.evaluate(Policy(fingerprint=self.space.fingerprint))

    def _apply(self, policy: Policy) -> nn.Module:
        s = self.settings
        return apply_policy(self.base_model, policy, self.calibration, example_inputs=self.example, space=self.space,
                            distill_steps=s.recovery.distill_steps, seed=s.seed, memo=self._apply_memo)

    def build_latency_table(self, space: SearchSpace | None = None,
                            progress: Callable[[int, int], None] | None = None, calibration: int = 16) -> LatencyTable:
        """Time every lookup-table entry `space` (default: this evaluator's space) can need, and `calibration`
        random whole policies of it for the table's correction, before a search predicts from it; returns the
        table. An evaluator that times candidates makes its table here when its latency mode had none (a search
        that judges a latency limit by the table while timing every candidate)."""
        if self.meter is None:
            raise ValueError("no latency table: it is timed locally, so give latency mode 'measure', 'predict' or "
                             "'hybrid' and no latency_fn")
        if self.table is None:
            self.table = self._new_table()
        space = space or self.space
        policies = calibration_policies(space, calibration, seed=self.settings.seed)
        self.table.fill(table_entries(space), progress, policies)
        return self.table

    def _onnx_of(self, policy: Policy) -> bytes:
        """ONNX of the model with `policy` applied and no recovery (the lookup table's builder)."""
        with self.lock.compute():
            return export_onnx(self._apply(policy).cpu(), self.example)

    def compress(self, policy: Policy) -> nn.Module:
        """The policy applied and recovered exactly as `evaluate` scores it (what `squeezer apply` saves)."""
        s = self.settings
        with self.lock.compute(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            model = self._apply(policy)
            teacher = self.base_model if s.recovery.uses_teacher else None
            return recover(model, s.recovery, self.data, teacher=teacher, seed=s.seed, device=self.device)

    def _evaluate(self, policy: Policy, start: float) -> Outcome:
        self.count += 1
        return self.measure(self.compress(policy), policy, start=start)

    def measure(self, model: nn.Module, policy: Policy, *, start: float | None = None,
                latency: bool | None = None) -> Outcome:
        """Cost, val accuracy and (as the settings say, or `latency`) ONNX latency of an already compressed model.

        Timings are not recorded into the lookup table here: the search's driver records each candidate it was
        told about, once, and a worker's copy of the table reads them from the table's file before predicting."""
        s = self.settings
        mode = s.latency.mode
        start = time.perf_counter() if start is None else start
        if latency is None:
            latency = mode == "measure" or (mode == "hybrid" and (self.count - 1) % s.latency.measure_every == 0)
        measure = latency and (self.meter is not None or self._latency_fn is not None)
        with self.lock.compute():
            cost = measure_cost(model, self.example, policy, self.space, self.count_macs)
            accuracy, loss = score(model, self.data, device=self.device)
            if not (math.isfinite(accuracy) and math.isfinite(loss)):
                return EvalFailure(f"non-finite score (accuracy {accuracy}, loss {loss})", time.perf_counter() - start)
            onnx = export_onnx(clone_module(model).cpu(), self.example) if measure else None
        table = self.table if mode in ("predict", "hybrid") else None  # a table built for the driver predicts nothing
        if table is not None and mode == "hybrid":
            table.refresh()
        latency_fields: dict[str, Any] = {}
        if onnx is not None:
            # hybrid: the table's prediction is kept beside the timing (how far off it is, reported to the user)
            predicted = table.predict_rel(policy) if table is not None else None
            result = (self._latency_fn or self.meter.measure)(onnx)  # type: ignore[union-attr]
            latency_fields = {"latency_ms": result.median_ms, "latency_p90_ms": result.p90_ms,
                              "latency_spread": result.spread, "latency_rel": result.rel, "latency_source": "measured",
                              "latency_predicted": predicted}
        elif table is not None:
            rel = table.predict_rel(policy)
            latency_fields = {"latency_ms": table.base_us() * rel / 1e3, "latency_rel": rel,
                              "latency_source": "predicted"}
        return Measurement(accuracy=accuracy, loss=loss, macs=cost["macs"], params=cost["params"], bops=cost["bops"],
                           size_mb=cost["size_mb"], seconds=time.perf_counter() - start, recovery=s.recovery.mode,
                           fingerprint=self.space.fingerprint, hardware=self.hardware, **latency_fields)


def worker_evaluator(model: nn.Module, data: DataBundle, settings: EvalSettings, *, space: SearchSpace | None = None,
                     cache_dir: str | Path | None = None, latency_fn: Callable[[bytes], LatencyResult] | None = None,
                     hardware: dict[str, Any] | None = None) -> Evaluator | EvalFailure:
    """A worker's Evaluator, or the failure each evaluation handed to the worker reports.

    Raised while a worker starts, the error would break a process pool with no reason given ("a child process
    terminated abruptly"), or kill Ray actors until the pool gave up on them."""
    try:
        return Evaluator(model, data, settings, space=space, cache_dir=cache_dir, latency_fn=latency_fn,
                         hardware=hardware)
    except Exception as exc:  # noqa: BLE001
        return EvalFailure(f"the worker could not build its evaluator: {type(exc).__name__}: {exc}"[:300])
