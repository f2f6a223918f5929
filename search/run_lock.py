"""One writer per run folder: an OS lock on `<out>/search.lock`, held for a search's whole life.

Why: two searches on one folder interleave trials in one study and overwrite each other's policy files. The lock is
taken before the search writes anything, so a second search is refused with the folder untouched. It is an
`flock`, which the kernel drops when its holder exits in any way (a SIGKILL included), so no stale lock is ever left
to clear by hand. Readers (`front`, `apply`, `report`) take no lock: storage is safe to read while a search writes.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from pathlib import Path
from typing import Iterator

from squeezer.search.errors import SearchError

__all__ = ["LOCK_FILE", "FolderInUseError", "holding_folder", "usable_folder"]

LOCK_FILE = "search.lock"

# A search job holds the lock and calls run_search, which takes it again: within one thread the lock is re-entrant
# (a second flock on a new descriptor would refuse its own holder).
_held: dict[str, tuple[int, int, int]] = {}  # real folder path -> (descriptor, owning thread, depth)
_guard = threading.Lock()


class FolderInUseError(SearchError):
    """Another search holds the run folder's lock."""


def short(value: object, most: int = 80) -> str:
    """`repr(str(value))`, cut to about `most` characters, for one-line error messages."""
    text = repr(str(value))
    return text if len(text) <= most else f"{text[:most - 4]}...{text[-1]}"


def usable_folder(out: Path) -> None:
    """Refuse (one line) an output path that cannot be a run folder: an existing file, or one under a file."""
    if out.exists() and not out.is_dir():
        raise SearchError(f"output folder {short(out)} is an existing file, not a folder: pass a new folder's path, "
                          "or a run folder to resume")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SearchError(f"cannot create output folder {short(out)} ({exc.strerror or type(exc).__name__}): pass "
                          "a folder path you can write") from None


@contextlib.contextmanager
def holding_folder(out: str | Path) -> Iterator[None]:
    """Hold `out`'s writer lock for the block (creating the folder); refuse at once if another search holds it."""
    out = Path(out)
    usable_folder(out)
    key, me = os.path.realpath(out), threading.get_ident()
    with _guard:
        held = _held.get(key)
        if held is not None and held[1] == me:
            _held[key] = (held[0], me, held[2] + 1)
            fd = None
        elif held is not None:
            raise FolderInUseError(f"output folder {short(out)} is in use by another search in this process: run "
                                   "one search per output folder")
        else:
            fd = _lock(out)
            _held[key] = (fd, me, 1)
    try:
        yield
    finally:
        with _guard:
            fd_held, _, depth = _held[key]
            if depth > 1:
                _held[key] = (fd_held, me, depth - 1)
            else:
                del _held[key]
                os.close(fd_held)  # closing the last descriptor releases the flock


def _lock(out: Path) -> int:
    """The locked descriptor of `out`'s lock file (a link in its place is refused rather than followed)."""
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SearchError(f"{short(path)} is a link: remove it") from None
        raise SearchError(f"cannot open {short(path)} ({exc.strerror}): pass a folder you can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        who = f" (process {short(holder, 40)[1:-1]})" if holder else ""
        raise FolderInUseError(f"output folder {short(out)} is in use by another search{who}: wait for it to end, "
                               "or pass another --out") from None
    # who holds it, for the message another search shows; written only by the holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}@{os.uname().nodename}\n".encode(), 0)
    return fd
