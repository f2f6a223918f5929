"""The shared contract every searcher passes: budget respected, seeded, failures recorded, fronts sound."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from squeezer.models import resnet20
from squeezer.policies.policy import Policy
from squeezer.search.pareto import StudyResult, hypervolume
from squeezer.progress import LiveDisplay
from squeezer.plots import history_rows, points, write_front_html, write_front_png, write_report
from squeezer.search.config import SearchConfig
from squeezer.search.study import SearchError, SearchProgress, run_search
from fakes import FakeEvaluator, InlinePool, ThreadPool
from squeezer.spaces.space import SearchSpace

SAMPLERS = ["tpe", "nsga2", "random", "qmc", "ddpg"]
BUDGET = "macs<=45%,size<=50%"


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    torch.manual_seed(0)
    return SearchSpace.from_model(resnet20(num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8),
                                  knobs=("prune", "w_bits", "rank"))


def _search(space: SearchSpace, out: Path, sampler: str, *, trials: int = 16, seed: int = 0, **kw):
    ev = FakeEvaluator(space)
    config = SearchConfig(budget=BUDGET, sampler=sampler, trials=trials, seed=seed,
                          storage=optuna.storages.InMemoryStorage(), **kw)
    return run_search(space, InlinePool(ev), ev.base(), out=out, config=config)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_searcher_respects_budget_and_is_seeded(space: SearchSpace, sampler: str, tmp_path: Path) -> None:
    repair = sampler != "ddpg"  # the agent meets the budget through its action wall
    first = _search(space, tmp_path / "a", sampler, repair=repair)
    done = first.completed()
    assert len(done) == 16
    bl = space.baseline()
    for row in done:
        cost = space.predict(row.policy.layers)
        predicted_ok = cost.macs <= 0.45 * bl.macs + 1e-9 and cost.size_bytes <= 0.50 * bl.size_bytes + 1e-9
        assert row.feasible == predicted_ok, row.number
        assert predicted_ok  # repair / the wall keep every evaluated policy inside
        assert Policy.load(tmp_path / "a" / row.policy_file) == row.policy  # the file is the stored policy
    again = _search(space, tmp_path / "b", sampler, repair=repair)
    assert [r.policy.layers for r in again.completed()] == [r.policy.layers for r in done]


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_without_repair_infeasible_trials_are_marked(space: SearchSpace, sampler: str, tmp_path: Path) -> None:
    result = _search(space, tmp_path, sampler, trials=12)
    for row in result.completed():
        cost = space.predict(row.policy.layers)
        bl = space.baseline()
        assert row.feasible == (cost.macs <= 0.45 * bl.macs and cost.size_bytes <= 0.5 * bl.size_bytes)
    for row in result.front():
        assert row.feasible


def test_failures_are_recorded_and_parallel_workers(space: SearchSpace, tmp_path: Path) -> None:
    ev = FakeEvaluator(space, fail_unit="layer1.0.conv1")
    config = SearchConfig(budget=BUDGET, sampler="random", trials=12, repair=True)
    result = run_search(space, ThreadPool(ev, workers=3), ev.base(), out=tmp_path, config=config, workers=3)
    failed = [r for r in result.rows if r.state == TrialState.FAIL]
    assert failed and all("fake failure" in r.fail_reason for r in failed)
    assert len(result.rows) == 12
    # a second call with the same arguments has nothing left to do; other settings are refused
    again = run_search(space, ThreadPool(ev), ev.base(), out=tmp_path,
                       config=config)  # read back from storage: the failures kept their state and reason
    assert len(again.rows) == 12
    assert [(r.number, r.fail_reason) for r in again.rows if r.state == TrialState.FAIL] == \
        [(r.number, r.fail_reason) for r in failed]
    with pytest.raises(SearchError, match="budget"):
        run_search(space, ThreadPool(ev), ev.base(), out=tmp_path,
                   config=SearchConfig(budget="macs<=30%", sampler="random", trials=12))


class _CountingPool(InlinePool):
    """An inline pool that remembers the most policies it ever held; `in_process` as a real pool would say."""

    def __init__(self, evaluate, *, in_process: bool) -> None:
        super().__init__(evaluate)
        self.in_process, self.most = in_process, 0

    def submit(self, key, policy) -> None:
        super().submit(key, policy)
        self.most = max(self.most, self.pending())


@pytest.mark.parametrize("in_process, workers, most", [(True, 1, 1), (False, 1, 2), (False, 2, 3)])
def test_workers_outside_the_process_get_a_policy_queued_ahead(space: SearchSpace, tmp_path: Path,
                                                               in_process: bool, workers: int, most: int) -> None:
    ev = FakeEvaluator(space)
    pool = _CountingPool(ev, in_process=in_process)
    config = SearchConfig(budget=BUDGET, sampler="random", trials=6, repair=True,
                          storage=optuna.storages.InMemoryStorage())
    result = run_search(space, pool, ev.base(), out=tmp_path, config=config, workers=workers)
    assert len(result.completed()) == 6 and pool.most == most


def test_single_objective_and_promotion(space: SearchSpace, tmp_path: Path) -> None:
    ev = FakeEvaluator(space)
    seen = []

    def finetune(policy: Policy):
        seen.append(policy)
        m = ev(policy)
        return type(m)(**{**m.metrics(), "accuracy": min(1.0, m.accuracy + 0.01), "recovery": "finetune"})

    config = SearchConfig(budget=BUDGET, sampler="tpe", trials=12, objective="single", repair=True, promote=2)
    result = run_search(space, InlinePool(ev), ev.base(), out=tmp_path, config=config, promote_fn=finetune,
                        on_progress=lambda stats: None)
    promoted = [r for r in result.rows if r.fidelity == "finetune"]
    assert len(promoted) == len(seen) == min(2, len(result.front()))
    for r in promoted:
        assert r.accuracy == pytest.approx(r.cheap.accuracy + 0.01) and r.recovery == "finetune"
        assert r.cheap.fidelity == "cheap" and r.cheap.recovery != "finetune" and r.policy == r.cheap.policy


def test_front_rows_are_feasible_and_non_dominated(space: SearchSpace, tmp_path: Path) -> None:
    ev = FakeEvaluator(space)
    run_search(space, InlinePool(ev), ev.base(), out=tmp_path,
               config=SearchConfig(budget=BUDGET, sampler="random", trials=20))
    result = StudyResult.load(tmp_path)  # from storage alone
    front = result.front()
    assert front and all(r.feasible for r in front)
    feasible = [r for r in result.with_cost("macs") if r.feasible]
    for r in front:
        assert not any(o.accuracy >= r.accuracy and o.x <= r.x and (o.accuracy, o.x) != (r.accuracy, r.x)
                       for o in feasible)
    best = result.best_under("latency<=1.5ms")
    assert best is None or best.latency_ms <= 1.5
    csv_path, json_path = result.write_front(tmp_path)
    assert csv_path.read_text().count("\n") == len(front) + 1
    assert result.hypervolume() > 0
    assert sum(p["front"] for p in points(result)) == len(front)
    assert len(history_rows(result)) == len(result.completed())
    for path in (write_front_html(result, tmp_path), write_front_png(result, tmp_path), write_report(result, tmp_path)):
        assert path.stat().st_size > 1000


def test_hypervolume_of_a_known_set() -> None:
    # (accuracy, cost): staircase areas 0.2*0.5 + 0.3*0.8 + 0.5*0.9 = 0.79; the dominated point adds nothing
    pts = [(0.5, 0.2), (0.8, 0.5), (0.9, 0.8), (0.6, 0.6)]
    assert hypervolume(pts, (0.0, 1.0)) == pytest.approx(0.5 * 0.3 + 0.8 * 0.3 + 0.9 * 0.2)
    assert hypervolume([], (0.0, 1.0)) == 0.0
    assert hypervolume([(1.0, 0.0)], (0.0, 1.0)) == pytest.approx(1.0)


def test_driver_never_asks_beside_a_timing_run(space: SearchSpace, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler's work is CPU work: while a latency timing run holds the machine, the driver waits to ask."""
    import threading
    import time

    from squeezer.evaluators.latency import MachineLock
    from squeezer.search.optuna_searcher import OptunaSearcher

    monkeypatch.setenv("SQUEEZER_LOCK_DIR", str(tmp_path / "locks"))
    asked: list[float] = []
    inner = OptunaSearcher.ask
    monkeypatch.setattr(OptunaSearcher, "ask", lambda self: asked.append(time.perf_counter()) or inner(self))
    holding, released = threading.Event(), []

    def time_something() -> None:
        with MachineLock().timing():
            holding.set()
            time.sleep(0.5)
            released.append(time.perf_counter())

    timer = threading.Thread(target=time_something)
    timer.start()
    holding.wait()
    result = _search(space, tmp_path / "run", "random", trials=2)
    timer.join()
    assert len(result.completed()) == 2
    assert asked and asked[0] >= released[0]


class _LatencyModel:
    """int8 units slow the model down, as on small inputs on a CPU; remembers what it was taught."""

    def __init__(self, space: SearchSpace) -> None:
        self.space, self.bl = space, space.baseline()
        self.calls, self.timed = 0, []

    def predict_rel(self, p: Policy) -> float:
        self.calls += 1
        return self.space.predict(p.layers).macs / self.bl.macs + 0.1 * sum(c.w_bits < 32 for c in p.layers.values())

    def record(self, p: Policy, measured_rel: float) -> None:
        self.timed.append((p.to_json(), measured_rel))


def test_repair_judges_latency_by_the_latency_model_and_teaches_it_each_timing(space: SearchSpace,
                                                                                tmp_path: Path) -> None:
    """Given a latency model, repaired proposals meet a latency limit by it, bit widths dropped where it says so,
    and every candidate whose latency was timed is handed back to the model to learn from."""
    import dataclasses

    from squeezer.evaluators.measurement import Measurement

    model = _LatencyModel(space)
    ev = FakeEvaluator(space)

    def timed(p: Policy):  # the fake's latency as if measured, as the model predicts it (so repair keeps no margin)
        m = ev(p)
        rel = model.predict_rel(p)
        return dataclasses.replace(m, latency_source="measured", latency_rel=rel) if isinstance(m, Measurement) else m

    config = SearchConfig(budget="latency<=80%", sampler="random", trials=6, repair=True,
                          storage=optuna.storages.InMemoryStorage())
    result = run_search(space, InlinePool(timed), ev.base(), out=tmp_path, config=config, latency_model=model)
    assert model.calls
    for row in result.completed():
        assert model.predict_rel(row.policy) <= 0.8 + 1e-9
    def key(policy: dict) -> str:
        return json.dumps(policy, sort_keys=True)

    taught = sorted((key(p), rel) for p, rel in model.timed)
    assert taught == sorted((key(r.policy.to_json()), r.latency_rel) for r in result.completed())
    assert all(r.latency_margin == pytest.approx(1.0) for r in result.completed())


class _FastTable:
    """Predicts latency as the share of MACs left; the 'measured' latency below is a quarter slower."""

    def __init__(self, space: SearchSpace) -> None:
        self.space, self.bl = space, space.baseline()

    def predict_rel(self, p: Policy) -> float:
        return self.space.predict(p.layers).macs / self.bl.macs

    def record(self, p: Policy, measured_rel: float) -> None:
        pass


def test_repair_aims_below_a_latency_limit_by_what_timed_candidates_measured(space: SearchSpace,
                                                                             tmp_path: Path) -> None:
    """A latency model that predicts 25% fast: the first candidates, within the limit by its word, measure over
    it; once three were timed, repair aims at limit / 1.25 and the measured candidates are within the limit,
    and a searcher reopened on the study starts from the same margin."""
    import dataclasses

    from squeezer.search.budget import Budget
    from squeezer.search.objectives import make_objective
    from squeezer.search.optuna_searcher import OptunaSearcher
    from squeezer.search.study import resolve_storage

    table, ev = _FastTable(space), FakeEvaluator(space)

    def timed(p: Policy):
        m = ev(p)
        return dataclasses.replace(m, latency_source="measured", latency_rel=1.25 * table.predict_rel(p))

    config = SearchConfig(budget="latency<=25%", sampler="random", trials=8, repair=True)
    result = run_search(space, InlinePool(timed), ev.base(), out=tmp_path, config=config, latency_model=table)
    rows = sorted(result.completed(), key=lambda r: r.number)
    assert [r.latency_margin for r in rows[:3]] == [1.0, 1.0, 1.0]
    assert not any(r.feasible for r in rows[:3])  # predicted within the limit, measured a quarter slower
    for row in rows[3:]:
        assert row.latency_margin == pytest.approx(1.25)
        assert row.feasible and row.latency_rel <= 0.25 + 1e-9
    study = optuna.load_study(study_name="squeezer", storage=resolve_storage("sqlite", tmp_path))
    objective = make_objective(budget=Budget.parse("latency<=25%"), base=ev.base())
    reopened = OptunaSearcher(study, space, objective, name="random", repair=True, latency_model=table)
    assert reopened.margin.value() == pytest.approx(1.25)


def test_agent_wall_judges_latency_by_the_latency_model(space: SearchSpace, tmp_path: Path) -> None:
    """Under a latency model in which int8 units cost time, every DDPG episode is within a latency limit by the
    model (the wall tries the remaining units at their fastest levels, not at 2-bit weights), and the agent teaches
    the model what it timed. Judged by MACs, as before, most episodes are not."""
    import dataclasses

    def timed(p: Policy):
        m = ev(p)
        return dataclasses.replace(m, latency_source="measured", latency_rel=model.predict_rel(p))

    ev = FakeEvaluator(space)
    config = SearchConfig(budget="latency<=50%", sampler="ddpg", trials=12)
    by_macs = run_search(space, InlinePool(ev), ev.base(), out=tmp_path / "macs",
                         config=replace(config, storage=optuna.storages.InMemoryStorage()))
    model = _LatencyModel(space)
    assert sum(model.predict_rel(r.policy) > 0.5 for r in by_macs.completed()) >= 6
    result = run_search(space, InlinePool(timed), ev.base(), out=tmp_path / "lut",
                        config=replace(config, storage=optuna.storages.InMemoryStorage()), latency_model=model)
    rows = result.completed()
    assert len(rows) == 12 and len(model.timed) == 12
    for row in rows:
        assert row.latency_predicted == pytest.approx(model.predict_rel(row.policy))
        assert row.latency_predicted <= 0.5 + 1e-9 and row.feasible


def test_the_progress_line_stays_one_line_when_piped(capsys) -> None:
    display = LiveDisplay()
    display(SearchProgress(done=24, total=24, feasible=24, best_accuracy=0.9792, front=4, elapsed=45.0, eta=0.0))
    display.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines == ["trials 24/24  feasible 24  best within budget 0.9792  front 4  elapsed 45s  ETA 0s"]


@pytest.mark.parametrize("sampler", ["tpe", "qmc"])
def test_a_new_budgeted_study_starts_from_uniform_policies_within_the_budget(space: SearchSpace, tmp_path: Path,
                                                                           sampler: str) -> None:
    from squeezer.search.baselines import budget_starts
    from squeezer.search.budget import Budget

    ev = FakeEvaluator(space)
    starts = budget_starts(space, Budget.parse(BUDGET), ev.base(), most=4)
    assert starts and len(starts) <= 4
    kinds = [p.meta.get("knob") for p in starts]
    assert len(set(kinds)) == len(kinds)  # one per knob (and one of all knobs), each different
    def search(trials: int):  # stored in tmp_path: the second call resumes the first
        return run_search(space, InlinePool(ev), ev.base(), out=tmp_path,
                          config=SearchConfig(budget=BUDGET, sampler=sampler, trials=trials))

    first = sorted(search(16).completed(), key=lambda r: r.number)[:len(starts)]
    assert [r.policy.to_params() for r in first] == [p.to_params() for p in starts]
    assert all(r.feasible for r in first)
    resumed = search(24).completed()  # asked for more, the study goes on from where it was, not from the start
    assert len(resumed) == 24
    assert sum(r.policy.to_params() == starts[0].to_params() for r in resumed) == 1


class _Predicting:
    """A latency model that only predicts: a search that does not repair judges its starts by it alone."""

    def __init__(self, predict) -> None:
        self.predict_rel = predict

    def record(self, p: Policy, measured_rel: float) -> None:
        pass


def test_budget_starts_judge_a_latency_limit_by_the_latency_table_when_the_search_has_one(space: SearchSpace,
                                                                                       tmp_path: Path) -> None:
    """MACs cannot see that int8 units run slower than float ones on small inputs, so a start chosen by MACs can be
    far over a latency limit."""
    from squeezer.search.baselines import budget_starts
    from squeezer.search.budget import Budget

    base_macs = space.baseline().macs

    def int8_is_slow(policy: Policy) -> float:  # a stand-in for LatencyTable.predict_rel
        slow = any(c.w_bits <= 8 for c in policy.layers.values())
        return space.predict(policy.layers).macs / base_macs * (2.0 if slow else 1.0)

    def has_int8(policy: Policy) -> bool:
        return any(c.w_bits <= 8 for c in policy.layers.values())

    budget, base = Budget.parse("latency<=60%"), FakeEvaluator(space).base()
    by_macs = budget_starts(space, budget, base, most=4)
    by_table = budget_starts(space, budget, base, most=4, latency=int8_is_slow)
    assert any(has_int8(p) and int8_is_slow(p) > 0.6 for p in by_macs)
    assert by_table and all(int8_is_slow(p) <= 0.6 for p in by_table)
    ev = FakeEvaluator(space)  # and a search given the table's prediction starts from those
    config = SearchConfig(budget="latency<=60%", trials=16, storage=optuna.storages.InMemoryStorage())
    result = run_search(space, InlinePool(ev), ev.base(), out=tmp_path, config=config,
                        latency_model=_Predicting(int8_is_slow))
    first = sorted(result.completed(), key=lambda r: r.number)[:len(by_table)]
    assert [r.policy.to_params() for r in first] == [p.to_params() for p in by_table]
