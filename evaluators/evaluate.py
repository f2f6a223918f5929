"""One policy in, one Outcome out: apply -> measured cost -> recovery -> val accuracy -> ONNX -> latency.

An `Evaluator` is built once per worker (loading the model and data, tracing the space and exporting the
reference ONNX cost seconds) and then evaluates many policies. It never raises: a policy that cannot be applied,
or that scores NaN, comes back as `EvalFailure(reason)`, so one bad candidate never stops a search. Results are
cached in memory and optionally on disk, keyed by the policy's choices and the settings, so a repeated policy is
never evaluated twice.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from squeezer.evaluators.accuracy import RECOVERY, recover, score
from squeezer.evaluators.cost import measure_cost
from squeezer.evaluators.data import DataBundle
from squeezer.evaluators.latency import (LatencyMeter, LatencyResult, LatencyTable, MachineLock, calibration_policies,
                                         MIN_REPS, hardware_fingerprint, table_entries)
from squeezer.evaluators.mac_count import mac_counter
from squeezer.evaluators.measurement import EvalFailure, Measurement, Outcome
from squeezer.policies.apply import apply_policy
from squeezer.policies.clone import clone_module
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import Policy
from squeezer.spaces.space import SearchSpace

__all__ = ["EvalSettings", "Evaluator", "LATENCY_MODES", "worker_evaluator"]

LATENCY_MODES = ("measure", "predict", "hybrid", "none")


@dataclass(frozen=True)
class EvalSettings:
    """How a policy is scored. `latency`: "measure" times every candidate, "predict" uses the lookup table,
    "hybrid" predicts and also measures every `measure_every`-th evaluation, "none" skips latency."""

    recovery: str = "bn"
    bn_batches: int = 20
    finetune_steps: int = 50
    finetune_lr: float = 0.01
    kd_weight: float = 0.5
    kd_temperature: float = 4.0
    batch_size: int = 64
    latency: str = "measure"
    latency_batch: int = 1
    latency_threads: int | None = None  # None: every core but one (latency.timing_threads)
    latency_warmup: int = 30
    latency_runs: int = 200
    latency_reps: int = 3
    latency_table_reps: int = 3  # sessions per timing of a lookup-table entry (Evaluator._table_meter)
    measure_every: int = 5
    distill_steps: int = 0
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.recovery not in RECOVERY:
            raise ValueError(f"unknown recovery {self.recovery!r}: choose from {', '.join(RECOVERY)}")
        if self.latency not in LATENCY_MODES:
            raise ValueError(f"unknown latency mode {self.latency!r}: choose from {', '.join(LATENCY_MODES)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}: choose 'cpu' or 'cuda'")
        for name in ("bn_batches", "finetune_steps", "batch_size", "latency_batch", "latency_runs", "latency_reps",
                     "latency_table_reps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.finetune_lr > 0 or not self.kd_temperature > 0:
            raise ValueError(f"finetune_lr and kd_temperature must be positive, got {self.finetune_lr} and "
                             f"{self.kd_temperature}")
        if not 0 <= self.kd_weight <= 1:
            raise ValueError(f"kd_weight mixes distillation into the loss: give 0 to 1, got {self.kd_weight}")

    def scoring(self) -> dict[str, Any]:
        """The settings a trial's numbers depend on: a study scored under others cannot be resumed with these.

        Only those of the chosen recovery count (the distillation temperature does not change a BN-recalibrated
        score), and not how carefully latency is timed (runs, repetitions) nor where accuracy runs (device)."""
        fields = {"none": (), "bn": ("bn_batches", "batch_size"),
                  "finetune": ("finetune_steps", "finetune_lr", "batch_size"),
                  "kd": ("finetune_steps", "finetune_lr", "batch_size", "kd_weight", "kd_temperature")}
        out = {"recovery": self.recovery, "distill_steps": self.distill_steps, "latency": self.latency,
               **{k: getattr(self, k) for k in fields[self.recovery]}}
        if self.latency != "none":
            out.update(latency_batch=self.latency_batch, latency_threads=self.latency_threads)
        return out


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
    """Holds the base model, data, space, calibration batches and reference ONNX of one worker."""

    def __init__(self, model: nn.Module, data: DataBundle, settings: EvalSettings = EvalSettings(),
                 *, cache_dir: str | Path | None = None, lut_dir: str | Path | None = None,
                 lock: MachineLock | None = None, latency_fn: Callable[[bytes], LatencyResult] | None = None,
                 hardware: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.data = data
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for but torch sees no GPU: use device 'cpu'")
        self.device = torch.device(settings.device)
        self.base = copy.deepcopy(model).eval()
        self.example = self.data.example_inputs(1)
        self.space = SearchSpace.from_model(self.base, self.example)
        # fvcore's count, or a forward pass that matches it (watching the units, whose MACs BOPs weigh)
        self.count_macs = mac_counter(self.base, self.example, watch=self.space.units)
        self.calibration = self.data.calibration()
        self.lock = lock or MachineLock()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._memory: dict[str, Outcome] = {}
        self.hits = 0
        self.count = 0
        self._latency_fn = latency_fn
        self.meter: LatencyMeter | None = None
        self.table: LatencyTable | None = None
        self.reference: bytes | None = None
        if settings.latency != "none":
            with self.lock.compute():
                self.reference = export_onnx(self.base, self.example)
            if latency_fn is None:
                self.meter = self._new_meter(settings.latency_runs, settings.latency_reps)
            if settings.latency in ("predict", "hybrid"):
                if self.meter is None:
                    raise ValueError("latency 'predict'/'hybrid' builds its table locally: drop latency_fn")
                self.table = LatencyTable(self._table_meter(), self._onnx_of, key=self.space.fingerprint,
                                          fingerprint=self.space.fingerprint, cache_dir=lut_dir or cache_dir,
                                          space=self.space)
        self.base_model = self.base.to(self.device)
        self._apply_memo: dict[str, Any] = {}  # what applying policies derives from base_model alone
        self.hardware = hardware or hardware_fingerprint(settings.latency_threads)  # of the timing machine

    def _table_meter(self) -> LatencyMeter:
        """The lookup table's meter: as many timed runs as a candidate's timing, over `latency_table_reps` sessions.

        Each session of a model runs at its own speed (ResNet-20 on 8x8 digits: 3-5% apart, whatever the session
        options), and a prediction sums many entries' errors, so where inputs are tiny more sessions help. Every
        knob, policies timed as candidates are (benchmarks/latency_fit.py): on 8x8 digits entries over 3 sessions of
        200 runs erred 7.7%, over 12 of 50 6.9%; on 28x28 MNIST 4.9% and 5.2%, the table taking 38-41% longer on
        both. Hence 3 by default, where the table shares the candidates' meter."""
        meter = self.meter
        assert meter is not None
        reps = max(MIN_REPS, self.settings.latency_table_reps)
        return meter if reps == meter.reps else self._new_meter(max(1, meter.runs * meter.reps // reps), reps)

    def _new_meter(self, runs: int, reps: int) -> LatencyMeter:
        """A meter of this model against its ONNX reference, with the settings' batch, threads and warm-up."""
        s = self.settings
        assert self.reference is not None
        return LatencyMeter(self.reference, tuple(self.example.shape), batch=s.latency_batch, threads=s.latency_threads,
                            warmup=s.latency_warmup, runs=runs, reps=reps, lock=self.lock)

    # ---- cache ------------------------------------------------------------------------------------------------------
    def key(self, policy: Policy) -> str:
        """Cache key: the policy's choices and model fingerprint (not its meta) plus every setting."""
        body = policy.to_json()
        body.pop("meta", None)
        text = json.dumps({"policy": body, "settings": asdict(self.settings)}, sort_keys=True)
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
                            distill_steps=s.distill_steps, seed=s.seed, memo=self._apply_memo)

    def build_latency_table(self, space: SearchSpace | None = None,
                            progress: Callable[[int, int], None] | None = None, calibration: int = 16) -> int:
        """Time every lookup-table entry `space` (default: this model's full space) can need, and `calibration`
        random whole policies of it for the table's correction, before a search predicts from it; returns how many
        models were timed (0 when the cached table is complete)."""
        if self.table is None:
            raise ValueError("no latency table: use EvalSettings(latency='predict' or 'hybrid')")
        space = space or self.space
        return self.table.fill(table_entries(space), progress,
                               calibration_policies(space, calibration, seed=self.settings.seed))

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
            teacher = self.base_model if s.recovery == "kd" else None
            return recover(model, s.recovery, self.data, teacher=teacher, bn_batches=s.bn_batches,
                           steps=s.finetune_steps, lr=s.finetune_lr, kd_weight=s.kd_weight,
                           kd_temperature=s.kd_temperature, batch_size=s.batch_size, seed=s.seed, device=self.device)

    def _evaluate(self, policy: Policy, start: float) -> Outcome:
        self.count += 1
        return self.measure(self.compress(policy), policy, start=start)

    def measure(self, model: nn.Module, policy: Policy, *, start: float | None = None,
                latency: bool | None = None) -> Outcome:
        """Cost, val accuracy and (as the settings say, or `latency`) ONNX latency of an already compressed model."""
        s = self.settings
        start = time.perf_counter() if start is None else start
        if latency is None:
            latency = s.latency == "measure" or (s.latency == "hybrid"
                                                 and (self.count - 1) % max(1, s.measure_every) == 0)
        measure = latency and (self.meter is not None or self._latency_fn is not None)
        with self.lock.compute():
            cost = measure_cost(model, self.example, policy, self.space, self.count_macs)
            accuracy, loss = score(model, self.data, device=self.device)
            if not (math.isfinite(accuracy) and math.isfinite(loss)):
                return EvalFailure(f"non-finite score (accuracy {accuracy}, loss {loss})", time.perf_counter() - start)
            onnx = export_onnx(clone_module(model).cpu(), self.example) if measure else None
        latency_fields: dict[str, Any] = {}
        if onnx is not None:
            # hybrid: the table's prediction is kept beside the timing (how far off it is, reported to the user),
            # then the timed candidate sharpens the table's correction
            predicted = self.table.predict_rel(policy) if self.table is not None else None
            result = (self._latency_fn or self.meter.measure)(onnx)  # type: ignore[union-attr]
            if self.table is not None:
                self.table.record(policy, result.rel)
            latency_fields = {"latency_ms": result.median_ms, "latency_p90_ms": result.p90_ms,
                              "latency_spread": result.spread, "latency_rel": result.rel, "latency_source": "measured",
                              "latency_predicted": predicted}
        elif self.table is not None:
            rel = self.table.predict_rel(policy)
            latency_fields = {"latency_ms": self.table.base_us() * rel / 1e3, "latency_rel": rel,
                              "latency_source": "predicted"}
        return Measurement(accuracy=accuracy, loss=loss, macs=cost["macs"], params=cost["params"], bops=cost["bops"],
                           size_mb=cost["size_mb"], seconds=time.perf_counter() - start, recovery=s.recovery,
                           fingerprint=self.space.fingerprint, hardware=self.hardware, **latency_fields)


def worker_evaluator(model: nn.Module, data: DataBundle, settings: EvalSettings,
                     options: dict[str, Any]) -> Evaluator | EvalFailure:
    """A worker's Evaluator, or the failure each evaluation handed to the worker reports.

    Raised while a worker starts, the error would break a process pool with no reason given ("a child process
    terminated abruptly"), or kill Ray actors until the pool gave up on them."""
    try:
        return Evaluator(model, data, settings, **options)
    except Exception as exc:  # noqa: BLE001
        return EvalFailure(f"the worker could not build its evaluator: {type(exc).__name__}: {exc}"[:300])
