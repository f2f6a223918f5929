"""Resume: a search killed mid-run continues from storage, losing and repeating no completed trial."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from squeezer.policies.policy import Policy
from squeezer.search.pareto import StudyResult
from squeezer.search_job import failure_counts
from fakes import fake_search


def _count(out: Path) -> tuple[int, int]:
    try:
        result = StudyResult.load(out)
    except Exception:  # storage not written yet
        return 0, 0
    states = [r.state for r in result.rows]
    return states.count(TrialState.COMPLETE), states.count(TrialState.RUNNING)


@pytest.mark.parametrize("sampler", ["tpe", pytest.param("ddpg", marks=pytest.mark.slow)])
def test_resume_after_kill(tmp_path: Path, sampler: str) -> None:
    out = tmp_path / "run"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from fakes import fake_search; "
            f"fake_search({str(out)!r}, sampler={sampler!r}, trials=14, workers=2, delay=0.4)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        complete, running = _count(out)
        if complete >= 4 and running >= 1:
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the search finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "search.lock").is_file()  # the lock file stays; its lock went with the killed process
    before = {r.number: r for r in StudyResult.load(out).rows}
    done_before = {n: r for n, r in before.items() if r.state == TrialState.COMPLETE}
    running_before = {n: r for n, r in before.items() if r.state == TrialState.RUNNING}
    assert len(done_before) >= 4 and running_before
    # a RUNNING trial already holds the policy it is evaluating, its policy file written from it
    assert all(r.policy is not None and r.driver is not None for r in running_before.values())
    assert all(Policy.load(out / r.policy_file) == r.policy for r in running_before.values())

    fake_search(str(out), sampler=sampler, trials=14, workers=2)  # the same call, in this process
    after = StudyResult.load(out)
    rows = {r.number: r for r in after.rows}
    complete = [r for r in after.rows if r.state == TrialState.COMPLETE]
    assert len(complete) == 14  # the target is reached, counting what the killed run finished
    for n, r in done_before.items():  # nothing completed is lost or re-run
        assert rows[n].state == TrialState.COMPLETE and rows[n].accuracy == r.accuracy
    requeued = [r for r in complete if r.requeued_from is not None]
    assert sorted(r.requeued_from for r in requeued) == sorted(running_before)
    for r in requeued:  # a stale trial is re-asked with its own params and marked as such
        stale = rows[r.requeued_from]
        assert stale.state == TrialState.FAIL and stale.stale is True
        assert stale.trial_params.items() <= r.trial_params.items()  # a half-asked one is completed
        if sampler == "ddpg":  # the agent's episode travels with it
            assert r.ddpg_actions == stale.ddpg_actions and r.ddpg_target == stale.ddpg_target
    failed, interrupted = failure_counts(after.rows)  # what the search's summary reports
    assert interrupted == len(running_before) and not failed
    policies = [str(sorted(r.policy.layers.items())) for r in complete if r.requeued_from is None]
    assert len(complete) == len({r.number for r in complete})
    assert len(policies) == len(complete) - len(requeued)


def test_reader_refuses_a_study_whose_schema_is_still_being_created(tmp_path: Path) -> None:
    import sqlite3

    with sqlite3.connect(tmp_path / "study.db") as conn:  # tables made, version not stamped yet
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
    with pytest.raises(FileNotFoundError, match="still being created"):
        StudyResult.load(tmp_path)
    with sqlite3.connect(tmp_path / "study.db") as conn:  # a reader stamped nothing
        assert conn.execute("SELECT COUNT(*) FROM alembic_version").fetchone()[0] == 0


# ---- one writer per run folder, and damage named -------------------------------------------------------------------
HOLD = ("import sys, time\nfrom squeezer.search.run_lock import holding_folder\nwith holding_folder(sys.argv[1]):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n")


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file's content hash and every entry's mtime: what must not change when a search is refused."""
    import hashlib

    out = {".": ("dir", folder.stat().st_mtime_ns)}
    for p in sorted(folder.rglob("*")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(folder))] = (digest, p.stat().st_mtime_ns)
    return out


def _contents(folder: Path) -> dict[str, str]:
    """Every file's content hash but the lock's (a refused search that took the lock wrote its id there)."""
    return {name: digest for name, (digest, _) in _snapshot(folder).items() if name not in (".", "search.lock")}


def _one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(n in err for n in needles), err


@pytest.fixture()
def finished(tmp_path: Path) -> Path:
    """A finished four-trial study of the fake search."""
    import gc

    fake_search(str(tmp_path / "run"), trials=4, workers=1)
    gc.collect()  # the search's storage engine closes, folding SQLite's -wal file into study.db
    return tmp_path / "run"


def test_a_second_search_on_a_folder_in_use_is_refused_and_changes_nothing(finished: Path, capsys) -> None:
    import torch

    import squeezer
    from squeezer.cli import main
    from squeezer.models import resnet20
    from squeezer.search.run_lock import FolderInUseError

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(finished)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(finished)
        code = main(["search", "--model", "resnet20", "--budget", "macs<=50%", "--out", str(finished),
                     "--latency", "none", "--workers", "1"])
        _one_line(code, capsys.readouterr().err, "is in use by another search", f"process {holder.pid}@")
        with pytest.raises(FolderInUseError):  # in-memory inputs would be saved into the folder: they are not
            squeezer.search_policies(model=resnet20(num_classes=3, in_channels=1), data=(torch.rand(30, 1, 8, 8),
                                     torch.arange(30) % 3), out=finished, budget="macs<=50%", latency="none")
        with pytest.raises(FolderInUseError):
            fake_search(str(finished), trials=6, workers=1)
        assert _snapshot(finished) == before
        # readers take no lock
        assert len(StudyResult.load(finished).rows) == 4
        assert main(["front", str(finished)]) == 0
    finally:
        holder.kill()
        holder.wait()
    fake_search(str(finished), trials=6, workers=1)  # the lock went with its holder
    assert len(StudyResult.load(finished).completed()) == 6


@pytest.mark.slow  # two whole searches in processes of their own
def test_two_searches_started_together_one_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from fakes import fake_search; "
            f"fake_search({str(out)!r}, trials=6, workers=2, delay=0.3)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"}) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    assert "FolderInUseError" in next(err for rc, err in results if rc), results
    rows = StudyResult.load(out).rows
    assert [r.state for r in rows] == [TrialState.COMPLETE] * 6 and len({r.driver.run for r in rows}) == 1
    assert len(list((out / "policies").glob("*.json"))) == 6


def test_a_truncated_study_is_named_corrupt(finished: Path, capsys) -> None:
    from squeezer.cli import main
    from squeezer.search.study_check import StudyDamagedError

    db = finished / "study.db"
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 2)
    before = _contents(finished)
    code = main(["search", "--model", "resnet20", "--budget", "macs<=50%", "--out", str(finished), "--latency",
                 "none", "--workers", "1"])
    _one_line(code, capsys.readouterr().err, "is corrupt", "keep the policy files", "another --out")
    with pytest.raises(StudyDamagedError, match="is corrupt"):
        fake_search(str(finished), trials=6, workers=1)
    assert _contents(finished) == before
    code = main(["front", str(finished)])
    _one_line(code, capsys.readouterr().err, "is corrupt", "--policy FILE")


def test_a_deleted_study_is_refused_rather_than_started_over(finished: Path, capsys) -> None:
    from squeezer.cli import main

    for name in ("study.db", "study.db-wal", "study.db-shm"):
        (finished / name).unlink(missing_ok=True)
    before = _contents(finished)
    code = main(["search", "--model", "resnet20", "--budget", "macs<=50%", "--out", str(finished), "--latency",
                 "none", "--workers", "1"])
    _one_line(code, capsys.readouterr().err, "holds 4 trial policy files but no study.db", "another --out")
    assert _contents(finished) == before


def test_a_damaged_journal_is_named_corrupt(tmp_path: Path, capsys) -> None:
    """A journal study (--storage journal) cut short or garbled in the middle is named corrupt, with the way out,
    before a search appends to it; a reader says so too where Optuna's replay fails."""
    import shutil

    from squeezer.cli import main
    from squeezer.search.study_check import StudyDamagedError

    fake_search(str(tmp_path / "whole"), trials=2, workers=1, storage="journal")
    lines = (tmp_path / "whole" / "study.log").read_bytes().splitlines(keepends=True)
    damaged = {  # the last operation half written (a full disk, a copy stopped midway); a broken line midway
        f"line {len(lines)} is cut short": b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2],
        "line 4 is not JSON": b"".join(lines[:3]) + b'{"op_code": 5, "worker' + b"".join(lines[3:])}
    for reason, text in damaged.items():
        out = Path(shutil.copytree(tmp_path / "whole", tmp_path / reason.split()[-1]))
        (out / "study.log").write_bytes(text)
        before = _contents(out)
        code = main(["search", "--model", "resnet20", "--budget", "macs<=50%", "--out", str(out), "--latency",
                     "none", "--workers", "1", "--storage", "journal"])
        _one_line(code, capsys.readouterr().err, "study.log' is corrupt", f"({reason})", "keep the policy files",
                  "another --out")
        with pytest.raises(StudyDamagedError, match="is corrupt"):
            fake_search(str(out), trials=4, workers=1, storage="journal")
        assert _contents(out) == before
        code = main(["front", str(out)])
        if "cut" in reason:  # Optuna reads every whole operation: the front of what was recorded
            assert code == 0
        else:
            _one_line(code, capsys.readouterr().err, f"is corrupt ({reason})", "--policy FILE")
