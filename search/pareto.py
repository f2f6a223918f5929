"""Reading a search back from storage: trial records, the feasible front, hypervolume, the best trial under a limit.

Only storage is read (never the running process), so all of this works on a running or a killed study.
"""
from __future__ import annotations

import contextlib
import csv
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from squeezer.evaluators.measurement import Measurement
from squeezer.search.budget import Budget, BudgetError, cost_fraction
from squeezer.search.records import TrialRecord, promoted_key
from squeezer.search.study_check import corrupt_error, journal_damage, sqlite_damage
from squeezer.search.storage import read_storage_file

__all__ = ["StudyResult", "front_rows", "front_row", "hypervolume"]

FRONT_COLUMNS = ("number", "accuracy", "loss", "macs", "params", "bops", "size_mb", "latency_ms", "latency_rel", "x",
                 "feasible", "fidelity", "policy_file")


def front_row(r: TrialRecord) -> dict[str, Any]:
    """One row of front.csv / front.json (FRONT_COLUMNS, in order)."""
    return {"number": r.number, "accuracy": r.accuracy, "loss": r.loss, "macs": r.macs, "params": r.params,
            "bops": r.bops, "size_mb": r.size_mb, "latency_ms": r.latency_ms, "latency_rel": r.latency_rel,
            "x": r.x, "feasible": r.feasible, "fidelity": r.fidelity, "policy_file": r.policy_file}


def _cost_frac(r: TrialRecord) -> float | None:
    return r.cost_frac


def front_rows(rows: Iterable[TrialRecord], *,
               cost: Callable[[TrialRecord], float | None] = _cost_frac) -> list[TrialRecord]:
    """Feasible, non-dominated records (max accuracy, min `cost`), cheapest first; ties keep the earliest trial."""
    pts = [(c, r) for r in rows if r.feasible and r.accuracy is not None and (c := cost(r)) is not None]
    pts.sort(key=lambda p: (p[0], -p[1].accuracy, p[1].number))
    out: list[TrialRecord] = []
    best = float("-inf")
    for _, r in pts:
        if r.accuracy > best:
            out.append(r)
            best = r.accuracy
    return out


def hypervolume(points: Sequence[tuple[float, float]], ref: tuple[float, float] = (0.0, 1.0)) -> float:
    """2-D hypervolume of (accuracy, cost) points, accuracy maximised and cost minimised, against `ref`.

    `ref` = (worst accuracy, worst cost); with cost as a fraction of the base model, (0, 1) measures the area of
    the accuracy-cost plane the points dominate, 1.0 for a free perfect model. Written here rather than taken from
    Optuna, whose hypervolume lives in a private module (`optuna._hypervolume`) that an upgrade may move.
    """
    acc_ref, cost_ref = ref
    pts = sorted((c, a) for a, c in points if a > acc_ref and c < cost_ref)
    area, best = 0.0, acc_ref
    front: list[tuple[float, float]] = []
    for c, a in pts:
        if a > best:
            front.append((c, a))
            best = a
    for i, (c, a) in enumerate(front):
        nxt = front[i + 1][0] if i + 1 < len(front) else cost_ref
        area += (nxt - c) * (a - acc_ref)
    return area


def _check_schema_ready(path: Path) -> None:
    """Raise (one line) when `path` is corrupt, or while the search that owns it is still creating its tables."""
    import sqlite3

    damage = sqlite_damage(path, full=False)
    if damage is not None and "locked" not in damage:
        raise corrupt_error(path, damage, reading=True)
    try:
        with contextlib.closing(sqlite3.connect(str(path), timeout=10)) as conn:
            ready = conn.execute("SELECT COUNT(*) FROM alembic_version").fetchone()[0] > 0
    except sqlite3.Error:
        ready = False
    if not ready:
        raise FileNotFoundError(f"{path} is still being created by a starting search: try again in a moment")


class StudyResult:
    """The trials of one search, as records read from storage."""

    def __init__(self, study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> None:
        self.study = study
        self.attrs = dict(study.user_attrs)
        self.base = Measurement.from_metrics(self.attrs["base"]) if "base" in self.attrs else None
        self.budget = Budget.parse(self.attrs.get("budget") or None)
        if trials is None:
            trials = study.get_trials(deepcopy=False)
        self.rows = [TrialRecord.from_trial(t, promoted=self.attrs.get(promoted_key(t.number))) for t in trials]

    @classmethod
    def from_study(cls, study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> "StudyResult":
        """`trials`: the study's trials when the caller holds them already (a search's working copy), to skip
        reading every trial back from storage, which is slow in an RDB."""
        return cls(study, trials)

    @classmethod
    def load(cls, storage_or_dir: str | Path | BaseStorage, *, study_name: str | None = None) -> "StudyResult":
        """From a run folder (its study.db), a storage URL, or a storage object."""
        storage: Any = storage_or_dir
        db = log = None  # the run folder's SQLite or journal file, when that is what is read
        try:
            if isinstance(storage_or_dir, Path) or (isinstance(storage_or_dir, str) and "://" not in storage_or_dir):
                folder = Path(storage_or_dir)
                shared = read_storage_file(folder)  # a search in a shared storage: read its study there
                if shared is not None:
                    storage, study_name = shared[0], study_name or shared[1]
                elif (folder / "study.db").is_file():
                    # A reader never creates tables, and waits for a starting search to finish its schema: Optuna
                    # stamps the schema version from every process that opens the file, and two stamps at once crash.
                    db = folder / "study.db"
                    _check_schema_ready(db)
                    storage = optuna.storages.RDBStorage(f"sqlite:///{(folder / 'study.db').resolve()}",
                                                         skip_table_creation=True)
                elif (folder / "study.log").is_file():
                    from optuna.storages import JournalStorage
                    from optuna.storages.journal import JournalFileBackend

                    log = folder / "study.log"
                    storage = JournalStorage(JournalFileBackend(str(log.resolve())))
                else:
                    raise FileNotFoundError(f"{folder} holds no study.log or study.db: pass a search output folder")
            names = optuna.get_all_study_names(storage)
            if study_name is None:
                ours = [n for n in names if n.startswith("squeezer")] or names
                if len(ours) != 1:
                    raise ValueError(f"storage holds {len(ours)} studies: pass study_name (one of {', '.join(ours)})")
                study_name = ours[0]
            return cls(optuna.load_study(study_name=study_name, storage=storage))
        except Exception as exc:
            # a damaged page that the schema check did not read fails here, as SQLAlchemy's multi-line error
            reason = str(getattr(exc, "orig", exc))
            if db is not None and any(c.__name__ == "DatabaseError" for c in type(exc).__mro__) and \
                    "locked" not in reason:
                raise corrupt_error(db, reason, reading=True) from None
            damage = journal_damage(log) if log is not None else None  # replaying a broken journal fails anywhere
            if damage is not None:
                raise corrupt_error(log, damage, reading=True) from None
            raise

    def completed(self) -> list[TrialRecord]:
        return [r for r in self.rows if r.completed]

    def with_cost(self, metric_x: str) -> list[TrialRecord]:
        """The completed trials, each with `x`: its `metric_x` as a fraction of the base model's."""
        rows = []
        for r in self.completed():
            m = r.measurement()
            frac = cost_fraction(m, self.base, metric_x) if self.base is not None and m is not None else r.cost_frac
            rows.append(replace(r, x=frac))
        return rows

    def front(self, metric_x: str = "macs", *, feasible_only: bool = True) -> list[TrialRecord]:
        """Feasible, non-dominated trials (max accuracy, min `metric_x` as a fraction of base), cheapest first."""
        rows = self.with_cost(metric_x)
        if not feasible_only:
            rows = [replace(r, feasible=True) for r in rows]
        return front_rows(rows, cost=lambda r: r.x)

    def hypervolume(self, metric_x: str = "macs", *, ref: tuple[float, float] = (0.0, 1.0)) -> float:
        return hypervolume([(r.accuracy, r.x) for r in self.front(metric_x)], ref)

    def best_under(self, limit: str) -> TrialRecord | None:
        """The most accurate feasible trial that also meets `limit` (e.g. 'latency<=2ms'), or None."""
        extra = Budget.parse(limit)
        if not extra.limits:
            raise BudgetError("best_under needs a limit such as 'latency<=2ms'")
        best = None
        for r in self.completed():
            m = r.measurement()
            if not r.feasible or m is None or not extra.is_feasible(m, self.base):
                continue
            if best is None or r.accuracy > best.accuracy:
                best = r
        return best

    def write_front(self, out: str | Path, *, metric_x: str = "macs") -> tuple[Path, Path]:
        """front.csv and front.json in `out`: one row per front trial (number, metrics, feasible, policy file)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        columns = list(FRONT_COLUMNS)
        rows = [front_row(r) for r in self.front(metric_x)]
        with open(out / "front.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        (out / "front.json").write_text(json.dumps({"metric_x": metric_x, "budget": str(self.budget),
                                                    "rows": rows}, indent=2) + "\n")
        return out / "front.csv", out / "front.json"
