"""A throwaway PostgreSQL server in a temporary folder, for the shared-storage test and the scale-out benchmark.

initdb refuses to run as root, so as root the server runs as the `postgres` user (Debian's packages create it);
it listens on a Unix socket in its own folder only (no TCP), with trust authentication and fsync off.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["missing", "postgres_server"]


def _bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name), reverse=True)
    return Path(dirs[0]) if dirs and (Path(dirs[0]) / "initdb").exists() else None


def missing() -> str | None:
    """Why no server can be started here (a reason to skip), or None."""
    if _bindir() is None:
        return "PostgreSQL's server binaries (initdb, pg_ctl) are not installed"
    try:
        import psycopg  # noqa: F401  (the driver squeezer[postgres] installs)
    except ImportError:
        return "the PostgreSQL driver is not installed (pip install squeezer[postgres])"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser to start the server as another user"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server, yield its SQLAlchemy URL (psycopg, Unix socket), stop and delete it on exit."""
    bindir = _bindir()
    assert bindir is not None, missing()
    folder = Path(tempfile.mkdtemp(prefix="squeezer-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, user="postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()

    def pg(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       cwd=folder, timeout=120)

    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        options = f"-k {folder} -p {port} -c listen_addresses='' -c fsync=off -c max_connections=100"
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
        try:
            yield f"postgresql+psycopg://postgres@/postgres?host={folder}&port={port}"
        finally:
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
