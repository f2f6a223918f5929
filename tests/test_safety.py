"""Safe, portable artifacts: no job unpickles a model file unless told to trust it, a compressed model is a
state_dict plus its recipe, policy files are refused in one short line however they are malformed, and the timing
lock cannot be redirected by another user."""
from __future__ import annotations

import os

import pytest

from squeezer.evaluators.latency import MachineLock


# ---- the timing lock ----------------------------------------------------------------------------------------------
def test_the_lock_lives_in_a_private_directory_of_this_user(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SQUEEZER_LOCK_DIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    lock = MachineLock()
    folder = tmp_path / f"squeezer-{os.getuid()}"
    assert lock.rw.parent == folder and lock.gate.parent == folder
    assert os.stat(folder).st_mode & 0o777 == 0o700
    with lock.compute():
        pass
    assert lock.rw.is_file()


def test_the_lock_refuses_a_planted_link(tmp_path) -> None:
    lock = MachineLock(tmp_path)
    target = tmp_path / "someone_elses_file"
    lock.rw.symlink_to(target)
    with pytest.raises(FileExistsError, match="is a link"):
        with lock.compute():
            pass
    with pytest.raises(FileExistsError, match="is a link"):
        with lock.timing():
            pass
    assert not target.exists()


def test_the_lock_refuses_a_directory_that_is_a_link_or_not_ours(tmp_path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / f"squeezer-{os.getuid()}").symlink_to(elsewhere)
    with pytest.raises(FileExistsError, match="is a link"):
        MachineLock(tmp_path / "shared")
    if os.getuid() != 0:
        return  # only root can hand a directory to another user
    theirs = tmp_path / "theirs" / f"squeezer-{os.getuid()}"
    theirs.mkdir(parents=True)
    os.chown(theirs, 12345, 12345)
    with pytest.raises(FileExistsError, match="owned by user 12345"):
        MachineLock(tmp_path / "theirs")
