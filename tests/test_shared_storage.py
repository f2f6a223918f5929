"""Shared storage: unique study names, one-line errors for missing database drivers, several drivers on one study."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from fakes import fake_search
from postgres_server import missing as postgres_missing
from postgres_server import postgres_server
from squeezer.search.config import SearchError
from squeezer.search.pareto import StudyResult
from squeezer.search.records import TrialRecord
from squeezer.search.storage import (banner, check_driver, display_url, read_storage_file, study_name,
                                     write_storage_file)


def test_study_names_in_a_shared_storage_are_unique_per_folder(tmp_path: Path) -> None:
    url = "postgresql://u:secret@db/s"
    a, b = tmp_path / "x" / "r1", tmp_path / "y" / "r1"  # two runs whose folders share a base name
    assert study_name(out=a, storage=url) != study_name(out=b, storage=url)
    assert study_name(out=a, storage=url).startswith("squeezer-r1-")
    assert study_name(out=a, storage=url, study="shared") == study_name(out=b, storage=url, study="shared")
    assert study_name(out=a) == study_name(out=a, storage="journal") == "squeezer"  # the folder's own storage


def test_a_password_is_never_printed_or_written(tmp_path: Path) -> None:
    url = "postgresql://u:secret@db:5432/s"
    assert "secret" not in display_url(url) and "db:5432/s" in display_url(url)
    line = banner(storage=url, name="squeezer-r1-abc")
    assert line and "squeezer-r1-abc" in line and "optuna-dashboard" in line and "secret" not in line
    assert banner(storage=None, name="squeezer") is None
    write_storage_file(tmp_path, storage=url, name="n")
    assert "secret" not in (tmp_path / "storage.json").read_text()
    assert read_storage_file(tmp_path) == ("postgresql://u@db:5432/s", "n")


def test_a_storage_url_without_its_driver_names_the_package() -> None:
    pytest.importorskip("sqlalchemy")
    try:
        import MySQLdb  # noqa: F401
        pytest.skip("mysqlclient is installed here")
    except ImportError:
        pass
    with pytest.raises(SearchError, match="pip install mysqlclient"):
        check_driver("mysql://u@localhost/db")
    with pytest.raises(SearchError, match="not a storage URL"):
        check_driver("nosuchdb://x")
    check_driver("sqlite:///x.db")  # the standard library's


def test_a_missing_driver_names_the_installed_one_of_its_database() -> None:
    pytest.importorskip("psycopg")  # what squeezer[postgres] installs
    try:
        import psycopg2  # noqa: F401
        pytest.skip("psycopg2 is installed here")
    except ImportError:
        pass
    with pytest.raises(SearchError, match=r"pip install psycopg2-binary, or name the driver that is installed: "
                                          r"postgresql\+psycopg://"):
        check_driver("postgresql+psycopg2://u@localhost/db")
    check_driver("postgresql+psycopg://u@localhost/db")


def test_a_waiting_trial_is_claimed_by_one_sqlite_writer_only(tmp_path: Path) -> None:
    """Two storages on one SQLite file claim the same WAITING trial at the same moment, many times: Optuna's claim
    (set_trial_state_values to RUNNING) must return True to exactly one (plain SQLite lets both win often)."""
    from squeezer.search.sqlite_storage import open_sqlite

    url = f"sqlite:///{tmp_path / 's.db'}"
    a, b = open_sqlite(url), open_sqlite(url)
    study = optuna.create_study(storage=a, study_name="s")
    for i in range(8):
        study.enqueue_trial({"x": i}, skip_if_exists=False)
        trial_id = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))[0]._trial_id
        won: list[bool] = []
        start = threading.Barrier(2)

        def claim(storage: optuna.storages.RDBStorage) -> None:
            start.wait()
            won.append(storage.set_trial_state_values(trial_id, TrialState.RUNNING))

        threads = [threading.Thread(target=claim, args=(s,)) for s in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(won) == [False, True], f"round {i}: claims {won}"
        a.set_trial_state_values(trial_id, TrialState.FAIL)


def _two_drivers(tmp_path: Path, url: str) -> list[optuna.trial.FrozenTrial]:
    """Two searches on folders a and b, one storage URL and one study ('together'), run side by side; checks that
    the one study holds `trials` trials in all (a driver may start one more when both ask at once), no trial
    number twice, each evaluated by one driver whose folder holds its policy file; returns the trials."""
    errors: list[BaseException] = []

    def drive(name: str) -> None:
        try:
            fake_search(str(tmp_path / name), trials=12, workers=1, delay=0.05, storage=url, study="together",
                        sampler="random")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    study = optuna.load_study(study_name="together", storage=url)
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    assert 12 <= len(finished) <= 13 and not [t for t in trials if t.state == TrialState.RUNNING]
    assert len({t.number for t in trials}) == len(trials)
    runs = {TrialRecord.from_trial(t).driver.run for t in finished}
    assert len(runs) == 2  # both drivers evaluated some
    # each folder holds the policy files of its own trials only
    files = [{p.name for p in (tmp_path / n / "policies").glob("*.json")} for n in ("a", "b")]
    assert not files[0] & files[1] and len(files[0] | files[1]) == len(trials)
    for n in ("a", "b"):  # what `squeezer search` writes for a shared storage, so that `front` reads it from there
        write_storage_file(tmp_path / n, storage=url, name="together")
    return trials


def test_two_drivers_share_one_study_each_trial_once(tmp_path: Path) -> None:
    _two_drivers(tmp_path, f"sqlite:///{tmp_path / 'shared.db'}")
    fronts = [sorted(r.number for r in StudyResult.load(tmp_path / n).front()) for n in ("a", "b")]
    assert fronts[0] == fronts[1] and fronts[0]


@pytest.mark.slow
@pytest.mark.skipif(postgres_missing() is not None, reason=str(postgres_missing()))
def test_two_drivers_share_one_study_in_a_real_postgresql(tmp_path: Path, capsys) -> None:
    """The same two drivers against a PostgreSQL server of its own; `squeezer front` reads one front from either
    folder."""
    from squeezer.cli import main

    with postgres_server() as url:
        check_driver(url)
        trials = _two_drivers(tmp_path, url)
        fronts = []
        for n in ("a", "b"):
            capsys.readouterr()
            assert main(["front", str(tmp_path / n), "--json"]) == 0
            front = json.loads(capsys.readouterr().out)
            assert front["completed"] == len([t for t in trials if t.state == TrialState.COMPLETE])
            fronts.append([row["number"] for row in front["front"]])
    assert fronts[0] == fronts[1] and fronts[0]
