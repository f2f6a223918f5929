"""New SQLite studies start from a cached empty schema; existing files are never touched; no cache, no harm."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from squeezer.search.sqlite_template import cache_dir, seed_from_template
from squeezer.search.study import resolve_storage


def _write_and_read(out: Path) -> int:
    study = optuna.create_study(storage=resolve_storage("sqlite", out), study_name="s")
    study.enqueue_trial({"a": 0.5})
    study.optimize(lambda t: t.suggest_float("a", 0, 1), n_trials=2)
    return len(optuna.load_study(study_name="s", storage=resolve_storage("sqlite", out)).trials)


def test_new_studies_are_copies_of_one_cached_empty_database(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SQUEEZER_CACHE", str(tmp_path / "cache"))
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        assert _write_and_read(tmp_path / run) == 2
    templates = list((tmp_path / "cache").glob("optuna-*-empty.db"))
    assert cache_dir() == tmp_path / "cache" and len(templates) == 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_existing_study_file_is_never_replaced(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SQUEEZER_CACHE", str(tmp_path / "cache"))
    assert _write_and_read(tmp_path) == 2
    before = (tmp_path / "study.db").read_bytes()
    assert seed_from_template(tmp_path / "study.db") is False
    assert (tmp_path / "study.db").read_bytes() == before


@pytest.mark.parametrize("cache", ["a-file/sub", "/proc/no-such"])
def test_without_a_usable_cache_optuna_creates_the_file_itself(tmp_path, monkeypatch, cache) -> None:
    (tmp_path / "a-file").write_text("a file where the cache folder would go")
    monkeypatch.setenv("SQUEEZER_CACHE", str(tmp_path / cache))  # an absolute `cache` stays as it is
    assert seed_from_template(tmp_path / "study.db") is False
    assert _write_and_read(tmp_path) == 2


def test_storage_imports_are_preloaded_on_a_thread_that_waits_for_timing(tmp_path, monkeypatch) -> None:
    import sys

    from squeezer.evaluators.latency import MachineLock
    from squeezer.search.study import preload_storage

    monkeypatch.setenv("SQUEEZER_LOCK_DIR", str(tmp_path))
    assert preload_storage("journal") is None
    with MachineLock().timing():  # a latency timing run holds the machine: the imports wait for it
        thread = preload_storage("sqlite")
        assert thread is not None
        thread.join(0.3)
        assert thread.is_alive()
    thread.join(30)
    assert not thread.is_alive() and "optuna.storages._rdb.models" in sys.modules
