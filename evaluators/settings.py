"""How a policy is scored, as data: recovery, latency, device and seed, each a frozen, keyword-only config.

The configs validate themselves, so a bad value fails where it is written, naming the field and what it may be,
not deep inside a worker. `EvalSettings.flat()` / `from_flat` are the one-level names the CLI flags, run folders
written before the configs were split, the evaluation cache key and resume messages use (`latency_batch`,
`bn_batches`, ...).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

__all__ = ["DEVICES", "EvalSettings", "LATENCY_MODES", "LatencyConfig", "RECOVERY", "RecoveryConfig"]

RECOVERY = ("none", "bn", "finetune", "kd")
LATENCY_MODES = ("measure", "predict", "hybrid", "none")
DEVICES = ("cpu", "cuda")


def _at_least(owner: object, names: tuple[str, ...], low: int) -> None:
    for name in names:
        value = getattr(owner, name)
        if value is not None and int(value) < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")


@dataclass(frozen=True, kw_only=True)
class RecoveryConfig:
    """How a candidate recovers before it is scored: `mode` none, bn (BatchNorm statistics re-estimated on
    `bn_batches` training batches), finetune or kd (`finetune_steps` steps at `finetune_lr`, kd distilled from the
    unchanged model with `kd_weight` and `kd_temperature`); `distill_steps` align low-rank factors while applying.

    A fine-tune (finetune, kd, and `squeezer apply --finetune-steps`) may also match intermediate features of the
    unchanged model: `hint_weight` weighs the FitNets hint loss and `at_weight` attention transfer, on the modules
    `hint_layers` names (names or fnmatch patterns; empty: each stage's end), see `evaluators/feature_match.py`.
    `unlabelled`: recovery never reads labels, the unchanged model labels the images (its soft outputs for the
    distillation term, its top class for the cross-entropy term), so it can run on a folder of images alone."""

    mode: str = "bn"
    bn_batches: int = 20
    finetune_steps: int = 50
    finetune_lr: float = 0.01
    kd_weight: float = 0.5
    kd_temperature: float = 4.0
    batch_size: int = 64
    distill_steps: int = 0
    hint_weight: float = 0.0
    at_weight: float = 0.0
    hint_layers: tuple[str, ...] = ()
    unlabelled: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "hint_layers", tuple(self.hint_layers))  # a list, read back from JSON
        if self.mode not in RECOVERY:
            raise ValueError(f"unknown recovery mode {self.mode!r}: choose from {', '.join(RECOVERY)}")
        _at_least(self, ("bn_batches", "finetune_steps", "batch_size"), 1)
        _at_least(self, ("distill_steps",), 0)
        for name in ("finetune_lr", "kd_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.kd_weight <= 1:
            raise ValueError(f"kd_weight mixes distillation into the loss: give 0 to 1, got {self.kd_weight}")
        for name in ("hint_weight", "at_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} weighs a feature loss: give 0 (off) or more, got {getattr(self, name)}")

    @property
    def matches_features(self) -> bool:
        """True when a fine-tune adds a FitNets hint or attention-transfer loss."""
        return self.hint_weight > 0 or self.at_weight > 0

    @property
    def uses_teacher(self) -> bool:
        """True when recovery reads the unchanged model: distillation, feature matching, or its labels."""
        return self.mode == "kd" or (self.mode == "finetune" and (self.unlabelled or self.matches_features))


@dataclass(frozen=True, kw_only=True)
class LatencyConfig:
    """How latency is known: `mode` "measure" times every candidate, "predict" uses the lookup table, "hybrid"
    predicts and also times every `measure_every`-th evaluation, "none" skips latency. A timing is `reps`
    sessions of `runs` runs at batch `batch` on `threads` threads (None: every core but one), after `warmup`
    runs; a lookup-table entry spreads as many runs over `table_reps` sessions."""

    mode: str = "measure"
    batch: int = 1
    threads: int | None = None
    warmup: int = 30
    runs: int = 200
    reps: int = 3
    table_reps: int = 3
    measure_every: int = 5

    def __post_init__(self) -> None:
        if self.mode not in LATENCY_MODES:
            raise ValueError(f"unknown latency mode {self.mode!r}: choose from {', '.join(LATENCY_MODES)}")
        _at_least(self, ("batch", "threads", "runs", "reps", "table_reps", "measure_every"), 1)
        _at_least(self, ("warmup",), 0)


# one-level name -> (section, field): the names of the CLI flags and of run folders' flat "eval" records
_FLAT = {"recovery": ("recovery", "mode"), **{f.name: ("recovery", f.name) for f in fields(RecoveryConfig)
                                              if f.name != "mode"},
         "latency": ("latency", "mode"), "measure_every": ("latency", "measure_every"),
         **{f"latency_{f.name}": ("latency", f.name) for f in fields(LatencyConfig)
            if f.name not in ("mode", "measure_every")}}
# settings added after outcomes were first cached under `flat()`'s names: left out of it at these defaults, so
# those outcomes keep their keys
_LATER = {"hint_weight": 0.0, "at_weight": 0.0, "hint_layers": (), "unlabelled": False}


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """How a policy is scored: its recovery, its latency, where accuracy work runs (`device`) and the seed."""

    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, kind in (("recovery", RecoveryConfig), ("latency", LatencyConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}: choose from {', '.join(DEVICES)}")

    def flat(self) -> dict[str, Any]:
        """Every setting under its one-level name (recovery, bn_batches, latency, latency_batch, ..., seed); the
        later ones (`_LATER`) only where they differ from their defaults."""
        out = {name: getattr(getattr(self, section), key) for name, (section, key) in _FLAT.items()}
        out = {k: v for k, v in out.items() if k not in _LATER or v != _LATER[k]}
        return {**out, "device": self.device, "seed": self.seed}

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> EvalSettings:
        """Settings from one-level names (unknown names are ignored: a run folder may hold newer ones)."""
        parts: dict[str, dict[str, Any]] = {"recovery": {}, "latency": {}}
        for name, value in values.items():
            if name in _FLAT:
                section, key = _FLAT[name]
                parts[section][key] = value
        return cls(recovery=RecoveryConfig(**parts["recovery"]), latency=LatencyConfig(**parts["latency"]),
                   **{k: values[k] for k in ("device", "seed") if k in values})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvalSettings:
        """Settings from `to_json`, or from the flat record run folders held before the configs were split."""
        if not isinstance(data.get("recovery", {}), Mapping):
            return cls.from_flat(data)

        def known(kind: type, values: Mapping[str, Any]) -> dict[str, Any]:
            return {f.name: values[f.name] for f in fields(kind) if f.name in values}

        return cls(recovery=RecoveryConfig(**known(RecoveryConfig, data.get("recovery", {}))),
                   latency=LatencyConfig(**known(LatencyConfig, data.get("latency", {}))),
                   **{k: data[k] for k in ("device", "seed") if k in data})

    def scoring(self) -> dict[str, Any]:
        """The settings a trial's numbers depend on, by their one-level names: a study scored under others cannot
        be resumed with these.

        Only those of the chosen recovery count (the distillation temperature does not change a BN-recalibrated
        score), and not how carefully latency is timed (runs, repetitions) nor where accuracy runs (device)."""
        fits = ("finetune_steps", "finetune_lr", "batch_size", "hint_weight", "at_weight", "hint_layers",
                "unlabelled")
        by_mode = {"none": (), "bn": ("bn_batches", "batch_size"), "finetune": fits,
                   "kd": (*fits, "kd_weight", "kd_temperature")}
        flat = {**_LATER, **self.flat()}
        keys = ("recovery", "distill_steps", "latency", *by_mode[self.recovery.mode])
        if self.latency.mode != "none":
            keys += ("latency_batch", "latency_threads")
        return {k: flat[k] for k in keys if k not in _LATER or flat[k] != _LATER[k]}
