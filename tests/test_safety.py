"""Safe, portable artifacts: no job unpickles a model file unless told to trust it, a compressed model is a
state_dict plus its recipe, policy files are refused in one short line however they are malformed, and the timing
lock cannot be redirected by another user."""
from __future__ import annotations

import os

import pytest
import torch

from squeezer.evaluators.latency import MachineLock
from squeezer.models import resnet20
from squeezer.policies.policy import Policy, PolicyError
from squeezer.spaces.space import SearchSpace


# ---- policy files: refused in one short line --------------------------------------------------------------------
@pytest.mark.parametrize("text,needle", [
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ('{"format": "squeezer.policy", "version": 1, "layers": {}, "meta": ' + '{"a": ' * 100 + "1" + "}" * 101,
     "'meta' nests more than"),
    ('{"format": "' + "x" * 100_000 + '"}', "not a squeezer policy"),
    ('{"format": "squeezer.policy", "version": 1, "layers": {"' + "u" * 100_000 + '": {}}}', "not in the model"),
    ('{"format": "squeezer.policy", "version": 1, "layers": {"fc": {"w_bits": ' + "9" * 5000 + "}}}",
     "not valid JSON"),
])
def test_malformed_policy_files_are_refused_in_one_short_line(tmp_path, text, needle) -> None:
    path = tmp_path / "p.json"
    path.write_text(text)
    space = SearchSpace.from_model(resnet20(num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8))
    with pytest.raises(PolicyError, match=needle) as info:
        Policy.load(path).validate(space)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


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
