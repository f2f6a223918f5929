"""Optuna's own tools (optuna-dashboard, trials_dataframe, plots) see what Squeezer sees: named objectives, each
trial's constraints where the dashboard reads them, the main metrics as flat attrs, and the command to open it."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from squeezer.models import resnet20
from squeezer.search.config import SearchConfig
from squeezer.search.records import FLAT_METRICS, TrialRecord
from squeezer.search.study import dashboard_command, resolve_storage, run_search
from squeezer.spaces.space import SearchSpace
from fakes import FakeEvaluator, InlinePool

BUDGET = "macs<=50%,params<=60%"


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    torch.manual_seed(0)
    return SearchSpace.from_model(resnet20(num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8),
                                  knobs=("prune", "w_bits"))


def _search(space: SearchSpace, out: Path, *, sampler: str = "tpe", objective: str = "multi") -> optuna.Study:
    ev = FakeEvaluator(space)
    run_search(space, InlinePool(ev), ev.base(), out=out,
               config=SearchConfig(budget=BUDGET, trials=6, sampler=sampler, objective=objective))
    return optuna.load_study(study_name="squeezer", storage=resolve_storage("sqlite", out))


@pytest.mark.parametrize("sampler", ["tpe", "random", "ddpg"])
def test_every_trial_holds_its_constraints_as_the_list_optuna_dashboard_reads(space: SearchSpace, tmp_path: Path,
                                                                               sampler: str) -> None:
    study = _search(space, tmp_path, sampler=sampler)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 6
    for t in done:
        record = TrialRecord.from_trial(t)
        # optuna_dashboard/_serializer.py: trial_system_attrs.get("constraints", [])
        assert t.system_attrs["constraints"] == list(record.constraints)
        assert list(t.constraints.values()) == list(record.constraints)  # each limit once, as samplers count them
        assert all(v <= 0 for v in t.constraints.values()) == record.feasible
    assert study.user_attrs["constraints"] == ["macs<=50%", "params<=60%"]  # what each entry of the list limits


def test_the_objectives_are_named_and_the_main_metrics_are_flat_sortable_attrs(space: SearchSpace,
                                                                              tmp_path: Path) -> None:
    study = _search(space, tmp_path)
    assert study.metric_names == ["accuracy", "macs_of_base"]
    frame = study.trials_dataframe()
    assert {"values_accuracy", "values_macs_of_base"} <= set(frame.columns)
    for name in ("accuracy", "macs", "params", "size_mb", "feasible"):
        assert f"user_attrs_{name}" in frame.columns, name
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        record = TrialRecord.from_trial(t)
        for name in FLAT_METRICS:
            if getattr(record, name) is not None:
                assert t.user_attrs[name] == getattr(record, name), name
        assert t.user_attrs["accuracy"] == t.values[0]


def test_a_single_objective_studys_value_is_named_for_what_it_holds(space: SearchSpace, tmp_path: Path) -> None:
    assert _search(space, tmp_path, objective="single").metric_names == ["accuracy_penalised"]


def test_the_dashboard_command_names_the_runs_storage(tmp_path: Path) -> None:
    assert dashboard_command(None, Path("runs/r20")) == "optuna-dashboard sqlite:///runs/r20/study.db"
    assert dashboard_command("sqlite", tmp_path) == f"optuna-dashboard sqlite:///{tmp_path}/study.db"
    assert dashboard_command("journal", Path("runs/r20")) == "optuna-dashboard runs/r20/study.log"
    assert dashboard_command("postgresql://me:secret@db.lan/squeeze", tmp_path) == \
        "optuna-dashboard postgresql://me:***@db.lan/squeeze"  # a password is never printed
    assert dashboard_command("mysql://me@db.lan/squeeze", tmp_path) == "optuna-dashboard mysql://me@db.lan/squeeze"
    assert dashboard_command(optuna.storages.InMemoryStorage(), tmp_path) is None
