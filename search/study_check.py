"""Damage to a run folder's study, named before a search writes into it or a reader trusts it.

Why: a truncated `study.db` used to read as "still being created", and a deleted one made the next search start
over and overwrite the old policy files. A search checks the folder's own study (SQLite or journal) under the
folder's lock, so no other search is midway through creating it.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from squeezer.search.errors import SearchError
from squeezer.search.run_lock import short
from squeezer.search.storage import STORAGE_FILE

__all__ = ["StudyDamagedError", "check_study_files", "corrupt_error", "holds_trials", "journal_damage",
           "sqlite_damage"]

OWN_FILES = {"sqlite": "study.db", "journal": "study.log"}


class StudyDamagedError(SearchError):
    """The run folder's study is corrupt, or missing beside the policy files it wrote."""


def corrupt_error(path: Path, reason: str, *, reading: bool) -> StudyDamagedError:
    """The one-line error for a corrupt study, with the ways on for a reader or a search."""
    way = ("its policy files (policies/) are intact: apply one with --policy FILE --model MODEL" if reading else
           "keep the policy files (policies/), and search again with another --out, or restore the file from a backup")
    return StudyDamagedError(f"the study {short(path)} is corrupt ({short(reason, 60)[1:-1]}): {way}")


def sqlite_damage(path: Path, *, full: bool) -> str | None:
    """What SQLite finds wrong with the file at `path`, or None. `full` reads every page (a search about to write
    into it); otherwise only the schema version is read (a reader, which also fails on any damaged page it meets)."""
    try:
        with contextlib.closing(sqlite3.connect(str(path), timeout=10)) as conn:
            if full:
                rows = conn.execute("PRAGMA quick_check").fetchall()
                if rows != [("ok",)]:
                    return "; ".join(str(r[0]) for r in rows[:2])
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return None  # busy, not damaged: the storage itself waits or reports it
        return str(exc)
    return None


def journal_damage(path: Path) -> str | None:
    """What is wrong with the journal file at `path` (each line one JSON operation of Optuna's), or None.

    Optuna skips a last line that is cut short and fails on a broken line before others; a search appending to a
    cut line would break it for good, so any line that is not a whole operation is damage."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                return f"line {number} is cut short"
            try:
                operation = json.loads(line)
            except ValueError:
                return f"line {number} is not JSON"
            if not isinstance(operation, dict) or not isinstance(operation.get("op_code"), int):
                return f"line {number} is not an Optuna journal operation"
    return None


def holds_trials(out: Path, storage: Any) -> bool:
    """Whether the run folder `out` may hold trials of a study: its own study file or policy files are there, or
    its study lives elsewhere (a storage URL or object, or a shared storage it recorded), which it cannot tell.
    A folder holding settings alone (a search stopped before its first trial) has nothing to lose."""
    kind = "sqlite" if storage is None else storage
    if not isinstance(kind, str) or kind not in OWN_FILES or (out / STORAGE_FILE).is_file():
        return True
    return any((out / name).is_file() for name in OWN_FILES.values()) or (
        (out / "policies").is_dir() and any((out / "policies").iterdir()))


def check_study_files(out: Path, storage: Any) -> None:
    """Refuse to search in `out` when its own study is corrupt, or missing while the policy files it wrote remain
    (a search would start over and overwrite them). Storages outside the folder (URLs, objects) are not checked."""
    kind = "sqlite" if storage is None else storage
    if not isinstance(kind, str) or kind not in OWN_FILES:
        return
    path = out / OWN_FILES[kind]
    if path.is_file():
        damage = sqlite_damage(path, full=True) if kind == "sqlite" else journal_damage(path)
        if damage is not None:
            raise corrupt_error(path, damage, reading=False)
        return
    written = sum(1 for _ in (out / "policies").glob("trial_*.json")) if (out / "policies").is_dir() else 0
    if not written:
        return
    other = next((k for k, name in OWN_FILES.items() if k != kind and (out / name).is_file()), None)
    if other is not None:
        raise StudyDamagedError(f"output folder {short(out)} holds its study in {OWN_FILES[other]}, not "
                                f"{OWN_FILES[kind]}: resume with --storage {other}")
    raise StudyDamagedError(f"output folder {short(out)} holds {written} trial policy files but no {OWN_FILES[kind]}: "
                            "a new search would overwrite them; restore the study, or pass another --out")
