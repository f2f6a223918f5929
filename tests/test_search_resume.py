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
