"""The SQLite study of a run folder (or of a sqlite:// URL that several drivers share): WAL, a long busy wait,
and a claim of a waiting trial that only one writer can win.

Why: Optuna claims a waiting (enqueued or re-queued) trial by reading its state and moving it to RUNNING in one
transaction (`RDBStorage.set_trial_state_values`, which returns False to every driver but the winner), made atomic
by SELECT ... FOR UPDATE. SQLite ignores FOR UPDATE, and Python's sqlite3 runs the SELECT outside any transaction
(it begins one only before a write), so two drivers could both read WAITING and both take the trial; the second
`tell` then failed. Here a claim begins with BEGIN IMMEDIATE, which takes SQLite's write lock before the read: one
claim at a time, and only the first sees WAITING. Every other call keeps sqlite3's usual transactions, so reads
never wait on a lock (WAL).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import optuna
import sqlalchemy
from optuna.trial import TrialState

from squeezer.search.sqlite_template import seed_from_template
from squeezer.search.storage import open_shared

__all__ = ["BUSY_MS", "ClaimingSQLiteStorage", "open_sqlite"]

BUSY_MS = 60_000  # how long a transaction waits for another's write lock before "database is locked"


class ClaimingSQLiteStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage on SQLite whose claim of a waiting trial (a move to RUNNING) is one locked
    transaction."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._claiming = threading.local()  # set while this thread's claim runs: its BEGIN takes the write lock
        sqlalchemy.event.listen(self.engine, "connect", _on_connect)
        sqlalchemy.event.listen(self.engine, "begin", self._on_begin)
        self.engine.dispose()  # connections opened while Optuna checked the schema lack the settings above

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        if state != TrialState.RUNNING:
            return super().set_trial_state_values(trial_id, state, values)
        self._claiming.on = True
        try:
            return super().set_trial_state_values(trial_id, state, values)
        finally:
            self._claiming.on = False

    def _on_begin(self, conn: sqlalchemy.engine.Connection) -> None:
        dbapi = conn.connection.driver_connection
        if getattr(self._claiming, "on", False):
            dbapi.isolation_level = None  # sqlite3 emits no BEGIN of its own (no transaction is open here)
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif dbapi.isolation_level is None:
            dbapi.isolation_level = ""  # back to sqlite3's own BEGIN before a write


def _on_connect(conn: Any, _record: Any) -> None:
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute(f"PRAGMA busy_timeout={BUSY_MS}")
    cur.close()


def open_sqlite(url: str) -> ClaimingSQLiteStorage:
    """The study storage on a sqlite:// URL; a new file starts from the empty-schema template."""
    if url.startswith("sqlite:///") and "?" not in url:
        seed_from_template(Path(url[len("sqlite:///"):]))
    # Optuna stamps the schema version from every process that opens the file, readers included; when two do it at
    # once one insert fails (or, for a new file, one CREATE TABLE), but the schema is then complete, so opening
    # again succeeds: open_shared retries with a pause.
    return open_shared(url, kind=ClaimingSQLiteStorage)
