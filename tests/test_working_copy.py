"""The in-memory working copy: what reaches storage is what the sampler saw, trial for trial."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from squeezer.models import resnet20
from squeezer.search.budget import Budget
from squeezer.search.config import SearchConfig
from squeezer.search.objectives import make_objective
from squeezer.search.study import open_study, resolve_storage, run_search
from fakes import FakeEvaluator, InlinePool
from squeezer.search.working_copy import ConcurrentWriterError, WorkingCopy
from squeezer.spaces.space import SearchSpace


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    torch.manual_seed(0)
    return SearchSpace.from_model(resnet20(num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8),
                                  knobs=("prune", "w_bits"))


def _search(space: SearchSpace, out: Path, storage: str, trials: int = 8) -> optuna.Study:
    ev = FakeEvaluator(space)
    run_search(space, InlinePool(ev), ev.base(), out=out,
               config=SearchConfig(budget="macs<=50%", trials=trials, storage=storage, repair=True))
    return optuna.load_study(study_name="squeezer", storage=resolve_storage(storage, out))


def _view(t: optuna.trial.FrozenTrial) -> tuple:
    return t.number, t.state, t.values, t.params, t.distributions, t.user_attrs, t.system_attrs


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_storage_holds_every_trial_as_the_sampler_saw_it(space: SearchSpace, tmp_path: Path, storage: str) -> None:
    stored = _search(space, tmp_path, storage)
    # Reloading builds a fresh working copy from storage alone: it must equal what was written.
    ev = FakeEvaluator(space)
    obj = make_objective("multi", budget=Budget.parse("macs<=50%"), base=ev.base())
    config = SearchConfig(budget="macs<=50%", trials=8, storage=storage)
    _, work = open_study(out=tmp_path, config=config, objective=obj, fingerprint=space.fingerprint)
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


def _copy(out: Path) -> tuple[optuna.Study, WorkingCopy]:
    backend = optuna.storages.get_storage(resolve_storage("sqlite", out))
    stored = optuna.create_study(study_name="s", storage=backend, directions=["maximize", "minimize"],
                                 load_if_exists=True)
    return stored, WorkingCopy(stored, backend, optuna.samplers.RandomSampler(seed=0))


def test_a_trial_written_through_the_copy_reads_back_as_the_copy_holds_it(tmp_path: Path) -> None:
    stored, work = _copy(tmp_path)
    dist = {"x": optuna.distributions.CategoricalDistribution([0.25, 0.5]),
            "n": optuna.distributions.IntDistribution(1, 8)}
    for values in ([0.9, float("inf")], [0.5, 2.0]):
        trial = work.study.ask(dist)
        trial.set_user_attr("policy", {"a": 1})
        trial.set_user_attr("kept", [1, 2])
        work.begin(trial)
        assert stored.get_trials()[-1].state == TrialState.RUNNING  # a killed search would find it
        trial.set_user_attr("policy", {"a": 2})  # changed after begin
        trial.set_user_attr("metrics", {"accuracy": values[0]})
        trial.set_constraint("macs<=50%", -0.5)
        work.study.tell(trial, values)
        work.finish(trial)
    got = optuna.load_study(study_name="s", storage=resolve_storage("sqlite", tmp_path)).get_trials()
    want = work.study.get_trials()
    assert [_view(t) for t in got] == [_view(t) for t in want]
    assert got[0].values == [0.9, float("inf")] and got[0].user_attrs["policy"] == {"a": 2}
    assert got[0].system_attrs["constraints:macs<=50%"] == -0.5  # samplers read constraints back on resume


def test_the_search_writes_through_optunas_public_api_only() -> None:
    """No module of the search imports Optuna's private modules (its RDB table models, to write rows past Optuna):
    what storage holds is what Optuna itself writes."""
    import ast

    root = Path(__file__).resolve().parents[1] / "search"
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not [m for m in imported if m.startswith("optuna") and "._" in m], path.name


def test_a_second_writer_is_refused_in_one_line(space: SearchSpace, tmp_path: Path) -> None:
    _search(space, tmp_path, "sqlite", trials=2)
    backend = optuna.storages.get_storage(resolve_storage("sqlite", tmp_path))
    stored = optuna.load_study(study_name="squeezer", storage=backend)
    work = WorkingCopy(stored, backend, optuna.samplers.RandomSampler(seed=0))
    stored.ask()  # another process adds a trial behind the copy's back
    trial = work.study.ask({"x": optuna.distributions.CategoricalDistribution([0, 1])})
    with pytest.raises(ConcurrentWriterError, match="run one search per output folder"):
        work.begin(trial)


def test_a_trial_finished_by_another_writer_is_refused_in_one_line(tmp_path: Path) -> None:
    stored, work = _copy(tmp_path)
    trial = work.study.ask({"x": optuna.distributions.CategoricalDistribution([0, 1])})
    work.begin(trial)
    stored.tell(trial.number, state=TrialState.FAIL)  # another process finishes the stored trial
    trial.set_user_attr("metrics", {"accuracy": 0.5})
    work.study.tell(trial, [0.5, 0.5])
    with pytest.raises(ConcurrentWriterError, match="run one search per output folder"):
        work.finish(trial)
