"""Where a study lives: the run folder's own storage, or a shared one (an RDB URL) that several drivers write.

Why a module of its own: a shared storage changes three things the run folder's own does not need. Study names must
not collide between runs (two folders called `r1` on two machines), so one is derived from the whole folder path
unless the user names the study to share it (`--study`). A URL whose database driver is missing must say which
package to install rather than end in SQLAlchemy's ImportError. And the run folder records which storage and study
it searched (`storage.json`, password left out) so that `front` and `report` read the shared study from the folder.
"""
from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Any

from squeezer.search.config import SearchError

__all__ = ["OWN_STORAGES", "STORAGE_FILE", "STUDY_PREFIX", "DirectStudy", "banner", "check_driver", "display_url",
           "is_shared", "open_shared", "read_storage_file", "study_name", "write_storage_file"]

STUDY_PREFIX = "squeezer"
OWN_STORAGES = ("sqlite", "journal")
STORAGE_FILE = "storage.json"
# SQLAlchemy's DBAPI module for each URL driver -> the package that provides it
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "pg8000": "pg8000",
                   "asyncpg": "asyncpg", "mysqldb": "mysqlclient", "pymysql": "pymysql",
                   "mysqlconnector": "mysql-connector-python", "mariadbconnector": "mariadb",
                   "pyodbc": "pyodbc", "oracledb": "oracledb", "cx_oracle": "cx_Oracle"}
# the drivers a hint may name, preferred first, for a URL whose own driver is missing
BACKEND_DRIVERS = {"postgresql": ("psycopg", "psycopg2", "pg8000"), "mysql": ("pymysql", "mysqldb", "mysqlconnector")}


def is_shared(storage: Any) -> bool:
    """True for a storage URL (other than the run folder's own SQLite or journal): other drivers may write it."""
    return isinstance(storage, str) and storage not in OWN_STORAGES


def study_name(*, out: Path, storage: Any = None, study: str | None = None) -> str:
    """The user's `study` name; 'squeezer' in the run folder's own storage (so a moved folder still resumes);
    else the folder's name and a digest of its host and full path, so runs in folders of one name never share."""
    if study:
        return study
    if storage is None or storage in OWN_STORAGES:
        return STUDY_PREFIX
    folder = Path(out).resolve()
    if not is_shared(storage):  # a storage object (tests, the Python API): the name it always had
        return f"{STUDY_PREFIX}-{folder.name}"
    digest = hashlib.sha1(f"{socket.gethostname()}:{folder}".encode()).hexdigest()[:8]
    return f"{STUDY_PREFIX}-{folder.name}-{digest}"


def display_url(url: str) -> str:
    """The URL as it may be printed or written down: any password replaced by ***."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (not an RDB URL: nothing to hide)
        return url


def _without_password(url: str) -> str:
    from sqlalchemy.engine import URL, make_url

    u = make_url(url)  # URL.set(password=None) keeps the password: build the URL again without one
    return URL.create(u.drivername, username=u.username, host=u.host, port=u.port, database=u.database,
                      query=u.query).render_as_string(hide_password=False)


def check_driver(url: str) -> None:
    """Refuse, in one line naming the package to install, a URL whose database driver is not importable."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise SearchError(f"--storage {display_url(url)!r} is not a storage URL SQLAlchemy knows ({exc}): use e.g. "
                          "postgresql+psycopg://user@host/db, or 'journal'") from None
    try:
        dialect.import_dbapi()
    except ImportError:
        driver, backend = parsed.get_driver_name(), parsed.get_backend_name()
        package = DRIVER_PACKAGES.get(driver.lower(), driver)
        other = _installed_driver(backend, but=driver)
        hint = f", or name the driver that is installed: {backend}+{other}://..." if other else ""
        raise SearchError(f"--storage {backend}:// (driver {driver}) needs the Python package {package!r}, which "
                          f"is not installed: pip install {package}{hint}") from None


def _installed_driver(backend: str, *, but: str) -> str | None:
    """Another importable driver of `backend` (a bare postgresql:// means psycopg2 to SQLAlchemy 2.0 and psycopg
    to 2.1, while squeezer[postgres] installs psycopg), or None."""
    from sqlalchemy.engine import make_url

    for driver in BACKEND_DRIVERS.get(backend, ()):
        if driver == but:
            continue
        try:
            make_url(f"{backend}+{driver}://").get_dialect().import_dbapi()
        except Exception:  # noqa: BLE001  (not installed, or this SQLAlchemy has no such dialect)
            continue
        return driver
    return None


def dashboard_command(storage: Any, out: str | Path | None = None) -> str | None:
    """The `optuna-dashboard` command that opens a run's study: its own file in `out` ('sqlite' or None, and
    'journal'), or a URL with any password masked; None for a storage object, which has no URL."""
    if storage == "journal" and out is not None:
        return f"optuna-dashboard {Path(out) / 'study.log'}"
    if (storage is None or storage == "sqlite") and out is not None:
        return f"optuna-dashboard sqlite:///{Path(out) / 'study.db'}"
    if isinstance(storage, str):
        return f"optuna-dashboard {display_url(storage)}"
    return None


def banner(*, storage: Any, name: str) -> str | None:
    """The line a search prints at its start and end when its study is in a shared storage: where, which study,
    and how to watch it."""
    if not is_shared(storage):
        return None
    return f"study {name!r} in {display_url(storage)} (watch it: {dashboard_command(storage)})"


def write_storage_file(out: Path, *, storage: Any, name: str) -> None:
    """Record in the run folder which shared storage and study it searched (without a password: a reader gives
    it as the database client expects, e.g. PGPASSWORD or ~/.pgpass)."""
    if not is_shared(storage):
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / STORAGE_FILE).write_text(json.dumps({"storage": _without_password(storage), "study": name}) + "\n")


def read_storage_file(out: Path) -> tuple[str, str] | None:
    """The (storage URL, study name) a run folder searched in a shared storage, or None for its own storage."""
    path = Path(out) / STORAGE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data["storage"], data["study"]


class DirectStudy:
    """The stored study itself, for a search in a shared storage: the searcher asks and tells there, so every
    driver sees the others' trials and Optuna hands each waiting trial to one of them (a WorkingCopy's in-memory
    trial numbers would collide with theirs). Each parameter is then its own storage call."""

    def __init__(self, study: Any) -> None:
        self.study = study

    def begin(self, trial: Any) -> None:
        """Nothing to write: the trial is in storage from the moment it is asked."""

    def finish(self, trial: Any) -> None:
        """Nothing to write: `tell` wrote it."""


def open_shared(url: str, attempts: int = 3, *, kind: Any = None) -> Any:
    """An RDB storage on `url` (of class `kind`, Optuna's RDBStorage unless given), opened again when another
    driver was creating the schema at the same moment (the loser's CREATE TABLE fails though the schema is then
    complete)."""
    import time

    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            return (kind or optuna.storages.RDBStorage)(url)
        except (IntegrityError, OperationalError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")
