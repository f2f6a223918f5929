"""Joining Ray as Ray's own tools do: RAY_ADDRESS, auto, and a fast one-line failure for every address form."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from squeezer.evaluators.ray_cluster import check_reachable, load_runtime_env, resolve_address


def test_ray_address_is_honoured_without_a_flag_and_for_auto(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None and resolve_address("local") is None
    assert resolve_address("h:1") == "h:1"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert resolve_address(None) == resolve_address("auto") == "10.0.0.1:6379"
    assert resolve_address("h:1") == "h:1"  # an explicit address wins, as in ray.init(address=...)


@pytest.mark.parametrize("address", ["127.0.0.1:9", "ray://127.0.0.1:9"])
def test_every_unreachable_address_fails_in_seconds(address: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ValueError, match="no Ray cluster answers"):
        check_reachable(address)
    assert time.perf_counter() - start < 10


def test_runtime_env_from_json_or_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_runtime_env('{"working_dir": "."}') == {"working_dir": str(tmp_path)}
    (tmp_path / "env.json").write_text(json.dumps({"py_modules": ["."]}))
    assert load_runtime_env("env.json") == {"py_modules": [str(tmp_path)]}
    with pytest.raises(ValueError, match="unknown field"):
        load_runtime_env('{"workdir": "."}')
    with pytest.raises(ValueError, match="does not exist"):
        load_runtime_env('{"working_dir": "nowhere"}')
