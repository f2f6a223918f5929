"""A run's settings as data, written once: the search's own (`SearchConfig`), a whole run's (`RunConfig`: model,
data, search and evaluation settings), the one function pair that turns a run into run.json's JSON and back, and
the one check a resumed run must pass.

The search settings are also what the study's own attrs hold (`search_record`), so the run folder and the study
are refused by the same check with the same keys. Run folders written before the evaluation settings were split
into configs hold them as one flat "eval" record; they read back the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from optuna.storages import BaseStorage

from squeezer.evaluators.data import DataConfig, FileSplit
from squeezer.evaluators.settings import EvalSettings
from squeezer.search.budget import METRICS, Budget
from squeezer.search.errors import SearchError
from squeezer.search.objectives import KINDS
from squeezer.search.optuna_searcher import SAMPLERS
from squeezer.spaces.knobs import CHANNEL_ROUND, KNOBS, PRUNE, SpaceConfig

__all__ = ["RESUME_KEYS", "RUN_VERSION", "RunConfig", "SearchConfig", "SearchError", "check_resume", "run_from_json",
           "run_to_json", "search_record"]

RUN_VERSION = 2  # run.json with the evaluation settings as configs (1: one flat "eval" record)
SAMPLER_NAMES = (*SAMPLERS, "ddpg")
# What a resumed run must share with the one it resumes; absent from an older record, a key is not compared.
RESUME_KEYS = ("fingerprint", "budget", "objective", "knobs", "sampler", "cost_metric", "weights", "channel_round",
               "prune_grid")
# What a record written before the space's settings were recorded searched: kept channels rounded to multiples of 8,
# pruning at most 75% of a group's channels.
LEGACY_SPACE = {"channel_round": 8, "prune_grid": (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)}


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """What is searched and how: the `budget` (hard limits, e.g. "macs<=50%"), `trials` evaluations in all,
    proposed by `sampler`, towards `objective` ("multi": the accuracy-vs-cost front over `cost_metric`, by default
    the budget's first metric; "single": the most accurate policy within the budget), over the `knobs` offered;
    `repair` shrinks each proposal into the budget first, `promote` re-evaluates that many of the front's most
    accurate trials with a distilled fine-tune, `channel_round` rounds kept channels (and ranks, block widths) up to
    a multiple, `prune_grid` is the pruning ratios offered (None, for both: what a resumed run recorded, else the
    space's defaults), `seed` seeds sampler and evaluation, `storage` is the Optuna storage
    (None or "sqlite": the run folder's study.db; "journal"; a URL; or a storage object), and `study` names the
    study in a shared storage (a URL) that several drivers optimize together (None: one named for the run folder)."""

    budget: str = ""
    trials: int = 50
    sampler: str = "tpe"
    objective: str = "multi"
    cost_metric: str | None = None
    knobs: tuple[str, ...] = tuple(KNOBS)
    repair: bool = False
    promote: int = 0
    channel_round: int | None = None
    prune_grid: tuple[float, ...] | None = None
    seed: int = 0
    storage: str | BaseStorage | None = None
    study: str | None = None

    def __post_init__(self) -> None:
        # the budget as Budget prints it, so a record compares equal however the user spaced it
        object.__setattr__(self, "budget", str(Budget.parse(self.budget)))
        object.__setattr__(self, "knobs", tuple(self.knobs))
        if self.trials < 1:
            raise ValueError(f"trials must be at least 1, got {self.trials}")
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {self.sampler!r}: choose from {', '.join(SAMPLER_NAMES)}")
        if self.objective not in KINDS:
            raise ValueError(f"unknown objective {self.objective!r}: choose from {', '.join(KINDS)}")
        if self.cost_metric is not None and self.cost_metric not in METRICS:
            raise ValueError(f"unknown cost_metric {self.cost_metric!r}: choose from {', '.join(METRICS)}")
        if not self.knobs:
            raise ValueError(f"knobs is empty: choose one or more of {', '.join(KNOBS)}")
        SpaceConfig(knobs=self.knobs)  # names an unknown knob and the known ones
        if self.promote < 0:
            raise ValueError(f"promote must be 0 or more, got {self.promote}")
        if self.channel_round is not None and self.channel_round < 1:
            raise ValueError(f"channel_round must be 1 or more, got {self.channel_round}")
        if self.prune_grid is not None:
            grid = tuple(sorted({float(r) for r in self.prune_grid}))
            if not grid or not all(0.0 <= r < 1.0 for r in grid):
                raise ValueError(f"prune_grid must hold ratios in [0, 1), got {list(self.prune_grid)}")
            object.__setattr__(self, "prune_grid", grid)

    @property
    def space(self) -> SpaceConfig:
        """The space searched: the knobs, the prune grid and the channel rounding (the defaults where None)."""
        return SpaceConfig(knobs=self.knobs, round_to=self.channel_round or CHANNEL_ROUND,
                           choices={PRUNE: self.prune_grid or KNOBS[PRUNE].grid})

    def resumed(self, recorded: "SearchConfig | None") -> "SearchConfig":
        """This search with the space settings it leaves unset (None) taken from the run it resumes (`recorded`),
        so an older run resumes with the space it searched; then every one resolved."""
        pick = {}
        for name in LEGACY_SPACE:
            value = getattr(self, name)
            if value is None and recorded is not None:
                value = getattr(recorded, name)
            pick[name] = value
        space = replace(self, **pick).space
        return replace(self, channel_round=space.round_to, prune_grid=space.grid(PRUNE))

    @property
    def parsed_budget(self) -> Budget:
        return Budget.parse(self.budget)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One search run: the model and data it searched (references, as the workers and `apply` load them), the
    weights loaded into the model (a torchvision weights name in full, or a state_dict file; None: none), the
    fingerprint of the model's space, its search and evaluation settings, how the data was read (`data_config`,
    its preprocessing as resolved, statistics included) and how an image folder's files were divided
    (`data_split`), so that a resumed search and `apply` read the same images the same way."""

    model: str
    data: str
    fingerprint: str
    weights: str | None = None
    search: SearchConfig = field(default_factory=SearchConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    data_config: DataConfig = field(default_factory=DataConfig)
    data_split: FileSplit | None = None


def search_record(config: SearchConfig, fingerprint: str) -> dict[str, Any]:
    """The search settings as JSON (the storage is left out: a URL can carry a password, an object has no JSON)."""
    space = config.space
    return {"fingerprint": fingerprint, "budget": config.budget, "objective": config.objective,
            "knobs": list(config.knobs), "sampler": config.sampler, "cost_metric": config.cost_metric,
            "seed": config.seed, "trials": config.trials, "repair": config.repair, "promote": config.promote,
            "channel_round": space.round_to, "prune_grid": list(space.grid(PRUNE))}


def run_to_json(run: RunConfig) -> dict[str, Any]:
    """run.json's content: the model and data, the search settings at the top level, the evaluation's under "eval"."""
    # absent when none were given, so a resume without --weights is not compared
    weights = {} if run.weights is None else {"weights": run.weights}
    return {"version": RUN_VERSION, "model": run.model, "data": run.data, **weights,
            **search_record(run.search, run.fingerprint), "eval": run.eval.to_json(),
            "data_config": run.data_config.to_json(),
            "data_split": run.data_split.to_json() if run.data_split is not None else None}


def run_from_json(data: Mapping[str, Any]) -> RunConfig:
    """The run `run_to_json` wrote, or one written before (a flat "eval" record, fewer search settings)."""
    known = {f.name for f in fields(SearchConfig)} - {"storage", "study"}
    search = {**LEGACY_SPACE, **{k: data[k] for k in known if data.get(k) is not None}}
    split = data.get("data_split")
    return RunConfig(model=data["model"], data=data["data"], fingerprint=data.get("fingerprint", ""),
                     weights=data.get("weights"), search=SearchConfig(**search),
                     eval=EvalSettings.from_json(data.get("eval", {})),
                     data_config=DataConfig.from_json(data.get("data_config") or {}),
                     data_split=FileSplit.from_json(split) if split else None)


def check_resume(there: Mapping[str, Any], now: Mapping[str, Any], *, out: str | Path) -> None:
    """Refuse, before anything runs, to resume `there` (a run.json, or a study's attrs) with the settings `now`
    (`run_to_json` or `search_record` of them) when its trials would not be comparable with the new ones: another
    model, budget, objective, knob set, sampler or space settings, or (where both hold them) other evaluation
    settings. A record written before the space settings were recorded searched the legacy space."""
    legacy = {k: list(v) if isinstance(v, tuple) else v for k, v in LEGACY_SPACE.items()}
    there = {**legacy, **there} if "fingerprint" in there else there
    for key in RESUME_KEYS:
        if key in there and key in now and there[key] != now[key]:
            raise SearchError(f"output folder {str(out)!r} holds a different study ({key} {there[key]!r} there, "
                              f"{now[key]!r} now): choose another --out or delete the folder")
    if "eval" in there and "eval" in now:  # trials scored another way would share one front with the new ones
        was, now_ = EvalSettings.from_json(there["eval"]).scoring(), EvalSettings.from_json(now["eval"]).scoring()
        changed = [k for k in sorted(set(was) | set(now_)) if was.get(k) != now_.get(k)]
        if changed:
            diff = ", ".join(f"{k} {was.get(k)!r} there, {now_.get(k)!r} now" for k in changed)
            raise SearchError(
                f"output folder {str(out)!r} holds a study scored with other evaluation settings ({diff}): resume "
                "with the settings it was started with, or choose another --out")
    if "data_config" in there and "data_config" in now:  # other images, or the same read another way
        was, now_ = (DataConfig.from_json(d).scoring() for d in (there["data_config"], now["data_config"]))
        changed = [k for k in sorted(was) if was[k] != now_[k]]
        if changed:
            raise SearchError(f"output folder {str(out)!r} holds a study that read its data with other settings "
                              f"({', '.join(changed)} differ): resume with the data flags it was started with (or "
                              "none), or choose another --out")

