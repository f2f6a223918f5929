"""The in-memory working copy: what reaches storage is what the sampler saw, trial for trial."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
from optuna.trial import TrialState

from squeezer.evaluators.zoo import resnet20
from squeezer.search.budget import Budget
from squeezer.search.objectives import make_objective
from squeezer.search.study import open_study, resolve_storage, run_search
from squeezer.search.testing import FakeEvaluator, InlinePool
from squeezer.search.working_copy import ConcurrentWriterError, WorkingCopy, _params_table_matches
from squeezer.spaces.space import SearchSpace


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    torch.manual_seed(0)
    return SearchSpace.from_model(resnet20(num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8),
                                  knobs=("prune", "w_bits"))


def _search(space: SearchSpace, out: Path, storage: str, trials: int = 8) -> optuna.Study:
    ev = FakeEvaluator(space)
    run_search(space, InlinePool(ev), "macs<=50%", ev.base(), out=out, trials=trials, storage=storage, repair=True)
    return optuna.load_study(study_name="squeezer", storage=resolve_storage(storage, out))


def _view(t: optuna.trial.FrozenTrial) -> tuple:
    return t.number, t.state, t.values, t.params, t.distributions, t.user_attrs, t.system_attrs


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_storage_holds_every_trial_as_the_sampler_saw_it(space: SearchSpace, tmp_path: Path, storage: str) -> None:
    stored = _search(space, tmp_path, storage)
    # Reloading builds a fresh working copy from storage alone: it must equal what was written.
    ev = FakeEvaluator(space)
    obj = make_objective("multi", budget=Budget.parse("macs<=50%"), base=ev.base())
    _, work = open_study(out=tmp_path, storage=storage, objective=obj, sampler="tpe", seed=0, trials=8,
                         fingerprint=space.fingerprint, settings={})
    trials = stored.get_trials()
    assert [t.number for t in trials] == list(range(8))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert all(len(t.params) == len(space.distributions()) for t in trials)
    assert all("metrics" in t.user_attrs and "run" in t.user_attrs for t in trials)
    assert [_view(t) for t in work.study.get_trials()] == [_view(t) for t in trials]
    frame = stored.trials_dataframe()
    assert any(c.startswith("params_") for c in frame.columns)  # optuna's own tools see the params


def test_sqlite_and_journal_store_the_same_search(space: SearchSpace, tmp_path: Path) -> None:
    a = _search(space, tmp_path / "a", "sqlite", trials=6).get_trials()
    b = _search(space, tmp_path / "b", "journal", trials=6).get_trials()
    assert [(t.params, t.values) for t in a] == [(t.params, t.values) for t in b]


def test_params_go_through_optuna_when_the_table_does_not_match(tmp_path: Path) -> None:
    rdb = resolve_storage("sqlite", tmp_path)
    assert _params_table_matches(rdb)
    with rdb.engine.begin() as conn:
        conn.execute(sqlalchemy.text("ALTER TABLE trial_params RENAME COLUMN distribution_json TO dist"))
    rdb.engine.dispose()
    assert not _params_table_matches(rdb)


def test_a_second_writer_is_refused_in_one_line(space: SearchSpace, tmp_path: Path) -> None:
    _search(space, tmp_path, "sqlite", trials=2)
    backend = optuna.storages.get_storage(resolve_storage("sqlite", tmp_path))
    stored = optuna.load_study(study_name="squeezer", storage=backend)
    work = WorkingCopy(stored, backend, optuna.samplers.RandomSampler(seed=0))
    stored.ask()  # another process adds a trial behind the copy's back
    trial = work.study.ask({"x": optuna.distributions.CategoricalDistribution([0, 1])})
    with pytest.raises(ConcurrentWriterError, match="run one search per output folder"):
        work.begin(trial)
