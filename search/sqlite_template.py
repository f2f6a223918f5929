"""A new SQLite study file starts as a copy of an empty one this Optuna version made before.

Why: Optuna stamps a new database's schema version by loading alembic's revision scripts, a large share of what a
short search's orchestration costs; opening an existing file is far quicker. The empty file is kept per Optuna and
SQLAlchemy version in the user's cache ($SQUEEZER_CACHE, else $XDG_CACHE_HOME/squeezer, else ~/.cache/squeezer).
Any failure here only means Optuna creates the file itself, as it would without this module.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["cache_dir", "seed_from_template"]


def cache_dir() -> Path:
    if os.environ.get("SQUEEZER_CACHE"):
        return Path(os.environ["SQUEEZER_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "squeezer"


def _template() -> Path:
    """The empty study database for the installed Optuna/SQLAlchemy, made on first use."""
    import optuna
    import sqlalchemy

    path = cache_dir() / f"optuna-{optuna.__version__}-sqlalchemy-{sqlalchemy.__version__}-empty.db"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}")
            storage.engine.dispose()
            os.replace(tmp, path)  # atomic: a concurrent maker's file is the same schema
        finally:
            tmp.unlink(missing_ok=True)
    return path


def seed_from_template(db: Path) -> bool:
    """Create `db` as a copy of the empty template unless it exists; True if it did.

    The copy is written beside `db` and hard-linked into place, so another process opening `db` meanwhile sees
    either no file or a whole one, and a file someone else created first is never replaced.
    """
    if db.exists():
        return False
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(_template(), tmp)
        os.link(tmp, db)
        return True
    except Exception:  # noqa: BLE001  (no cache, no hard links, a lost race: Optuna creates the file)
        return False
    finally:
        tmp.unlink(missing_ok=True)
