"""run_search: the search loop over an Optuna study, resumable from storage alone.

The loop keeps `workers` proposals in flight in the evaluator pool (one more queued when they are processes), tells
each outcome as it lands, and writes each trial's policy file from its record. The sampler works on an in-memory
copy of the study that writes each trial through to storage (working_copy.py). Everything needed to resume or report
is in storage: re-running the same call counts the finished trials toward `trials`, and re-asks (same params) the
trials a killed run left RUNNING.
"""
from __future__ import annotations

import importlib
import os
import socket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from squeezer.evaluators.latency import MachineLock
from squeezer.evaluators.measurement import Measurement, Outcome
from squeezer.policies.policy import Policy
from squeezer.search.baselines import budget_starts
from squeezer.search.budget import BudgetError
from squeezer.search.config import SearchConfig, SearchError, check_resume, search_record
from squeezer.search.latency_margin import timed
from squeezer.search.objectives import Objective, make_objective
from squeezer.search.optuna_searcher import SAMPLERS, LatencyModel, OptunaSearcher, make_sampler
from squeezer.search.pareto import StudyResult, front_rows
from squeezer.search.records import STALE_ATTR, Driver, TrialRecord, promoted_key, queue_attrs
from squeezer.search.run_lock import holding_folder
from squeezer.search.sqlite_storage import open_sqlite
from squeezer.search.searcher import EvalPool, Searcher, write_record
from squeezer.search.study_check import check_study_files
from squeezer.search.storage import (STUDY_PREFIX, DirectStudy, check_driver, dashboard_command, is_shared,
                                     open_shared, study_name)
from squeezer.search.working_copy import WorkingCopy
from squeezer.spaces.knobs import PRUNE

__all__ = ["run_search", "open_study", "make_searcher", "preload_storage", "dashboard_command", "metric_names",
           "SearchError", "STUDY_PREFIX"]

def resolve_storage(storage: str | BaseStorage | None, out: Path) -> BaseStorage | str:
    """None or 'sqlite' -> `out/study.db` (SQLite, WAL mode); 'journal' -> a journal file `out/study.log`; URLs
    (e.g. postgresql://) and storage objects as given.

    Both survive a killed process (transactions / appends). The search writes each trial through a WorkingCopy
    (one call when asked, a few when told), so neither is written once per parameter.
    """
    if storage == "journal":
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

        path = str(Path(out).resolve() / "study.log")
        # A killed writer leaves its lock file behind; a write holds it only briefly, so a short grace period
        # finds it stale (Optuna's default grace would stall every resume after a kill).
        return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileSymlinkLock(path, grace_period=3)))
    if is_shared(storage):
        check_driver(storage)  # type: ignore[arg-type]
    if storage is None or storage == "sqlite":
        storage = f"sqlite:///{Path(out).resolve() / 'study.db'}"
    if isinstance(storage, str) and storage.startswith("sqlite:"):
        return open_sqlite(storage)
    return open_shared(storage) if is_shared(storage) else storage  # type: ignore[arg-type]


def preload_storage(storage: str | BaseStorage | None = None) -> threading.Thread | None:
    """Import what opening an RDB storage needs (SQLAlchemy, alembic, Optuna's table models) on a daemon thread.

    Those imports are most of a short search's orchestration (benchmarks/search_orchestration.py). A search job
    starts this before it loads data, model and evaluators, so the imports overlap that work instead of delaying
    the first trial; opening the storage later waits for whatever is left (Python's import lock). The thread holds the
    machine lock as torch work does, so it never runs beside a latency timing run.
    """
    if storage == "journal" or (storage is not None and not isinstance(storage, str)):
        return None

    def load() -> None:
        try:
            with MachineLock().compute():
                for module in ("sqlalchemy.orm", "alembic.migration", "optuna.storages._rdb.models"):
                    importlib.import_module(module)
        except Exception:  # noqa: BLE001  (the storage's own import reports any real problem, in the caller's thread)
            pass

    thread = threading.Thread(target=load, name="squeezer-storage-imports", daemon=True)
    thread.start()
    return thread


def open_study(*, out: Path, config: SearchConfig, objective: Objective, fingerprint: str,
               workers: int = 1) -> tuple[optuna.Study, WorkingCopy | DirectStudy]:
    """Create or load the run's study; refuse to resume one made for another model, budget, sampler or knob set
    (by `check_resume`, the check a run folder's run.json passes too).

    Returns the study and its working copy (the in-memory study the searcher uses, written through to storage); in
    a shared storage, where other drivers add trials too, the searcher works on the stored study itself.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    check_study_files(out, config.storage)
    sampler, seed = config.sampler, config.seed
    if sampler == "ddpg":
        sampler_obj: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)  # params come fixed
    else:
        sampler_obj = make_sampler(sampler, objective=objective, seed=seed, trials=config.trials)
    resolved = resolve_storage(config.storage, out)
    backend = optuna.storages.get_storage(resolved)  # what create_study would wrap it in; the copy writes there
    name = study_name(out=out, storage=config.storage, study=config.study)
    study = optuna.create_study(storage=backend, study_name=name,
                                directions=objective.directions, sampler=sampler_obj, load_if_exists=True)
    # the cost metric as the objective resolved it (the budget's first metric when the config names none)
    record = {**search_record(config, fingerprint), "cost_metric": objective.cost_metric}
    attrs = study.user_attrs
    if "fingerprint" in attrs:
        check_resume(attrs, record, out=out)
    else:
        # "settings" is what reports and fronts read (and the number of workers, which no record holds)
        settings = {"trials": config.trials, "workers": workers, "repair": config.repair,
                    "promote_top_k": config.promote}
        # "constraints" names each entry of a trial's constraint list (its limit), for whoever reads the study
        for key, value in {**record, "settings": settings, "base": objective.base.metrics(),
                           "hardware": dict(objective.base.hardware), "created": time.time(),
                           "constraints": [limit.text for limit in objective.budget.limits]}.items():
            study.set_user_attr(key, value)
    names = metric_names(objective)
    if study.metric_names != names:  # Optuna's tools label the objectives by these (studies made before lack them)
        with warnings.catch_warnings():  # experimental in Optuna's eyes, and what optuna-dashboard reads
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    shared = is_shared(config.storage)
    requeue_stale(study, shared=shared)
    return study, DirectStudy(study) if shared else WorkingCopy(study, backend, study.sampler)


def metric_names(objective: Objective) -> list[str]:
    """The names of the study's objective values, as Optuna's tools show them."""
    if objective.kind == "multi":
        return ["accuracy", f"{objective.cost_metric}_of_base"]
    return ["accuracy_penalised"]  # an infeasible trial's value is pushed below every feasible one


def make_searcher(name: str, study: optuna.Study, space: Any, objective: Objective, *, seed: int = 0,
                  repair: bool = False, latency_model: LatencyModel | None = None) -> Searcher:
    """The searcher called `name`: an Optuna sampler (see SAMPLERS) or 'ddpg' (the AMC-style agent).

    `latency_model` (predicts a policy's latency relative to the base, and learns from timed ones) lets repair
    and the agent's action wall judge a latency limit by it instead of by MACs."""
    if name == "ddpg":
        from squeezer.search.amc_agent import AmcAgent

        return AmcAgent(study, space, objective, seed=seed, latency_model=latency_model)
    if name not in SAMPLERS:
        raise SearchError(f"unknown sampler {name!r}: choose from {', '.join([*SAMPLERS, 'ddpg'])}")
    return OptunaSearcher(study, space, objective, name=name, repair=repair, latency_model=latency_model)


def requeue_stale(study: optuna.Study, *, shared: bool = False) -> list[int]:
    """Fail the RUNNING trials whose driver is gone and enqueue their params again; returns their numbers. In a
    `shared` storage a trial of a driver on another host is left to it: from here it cannot be told dead."""
    host = socket.gethostname()
    stale = []
    for ft in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = TrialRecord.from_trial(ft)
        owner = record.driver
        if shared and (owner is None or owner.host != host):  # another driver's, or being asked right now
            continue
        if owner is not None and owner.host == host and _alive(owner.pid):
            continue
        # A trial killed while being asked may hold only some params; an enqueued one keeps all in fixed_params.
        params = {**ft.system_attrs.get("fixed_params", {}), **ft.params}
        study.enqueue_trial(params, skip_if_exists=False, user_attrs=queue_attrs(
            ddpg_actions=record.ddpg_actions, ddpg_target=record.ddpg_target, requeued_from=ft.number))
        trial = optuna.trial.Trial(study, ft._trial_id)
        trial.set_user_attr(STALE_ATTR, True)
        study.tell(trial, state=TrialState.FAIL)
        stale.append(ft.number)
    return stale


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def finished_count(study: optuna.Study) -> int:
    """Trials that consumed an evaluation: COMPLETE, and FAIL not marked stale."""
    n = 0
    for ft in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        n += not TrialRecord.from_trial(ft).stale
    return n


def claimed_count(study: optuna.Study) -> int:
    """Trials of a shared study that count toward `trials`: finished ones (as finished_count) and running ones, of
    every driver, so that drivers sharing a study stop together at its total rather than each running `trials`."""
    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    return finished_count(study) + running


def run_search(space: Any, pool: EvalPool, base: Measurement, *, out: str | Path,
               config: SearchConfig = SearchConfig(), workers: int = 1,
               on_progress: Callable[[SearchProgress], None] | None = None,
               promote_fn: Callable[[Policy], Outcome] | None = None,
               latency_model: LatencyModel | None = None) -> StudyResult:
    """Search `space` for policies within `config.budget`, evaluating them in `pool`; resumable by re-running.

    `base` is the unchanged model's measurement (relative limits and cost fractions refer to it). After the
    search, the `config.promote` most accurate front trials are re-evaluated with `promote_fn` (e.g. a fine-tune).
    The caller owns `pool` (`workers` evaluations at once) and closes it. `latency_model` (e.g. a `LatencyTable`)
    judges a latency limit for the uniform starts of a new study, for repair and for the agent's action wall
    (without one, latency is judged by its MACs proxy), and this loop records each candidate timed into it, once.
    The run folder's lock is held throughout: another search on `out` is refused (run_lock.py).
    """
    with holding_folder(out):
        return _search(space, pool, base, out=Path(out), config=config, workers=workers, on_progress=on_progress,
                       promote_fn=promote_fn, latency_model=latency_model)


def _search(space: Any, pool: EvalPool, base: Measurement, *, out: Path, config: SearchConfig, workers: int,
            on_progress: Callable[[SearchProgress], None] | None, promote_fn: Callable[[Policy], Outcome] | None,
            latency_model: LatencyModel | None) -> StudyResult:
    budget = config.parsed_budget
    if workers < 1:
        raise SearchError(f"workers must be at least 1, got {workers}")
    # the space searched is what the study records: its rounding and prune grid, whatever the config left unset
    config = replace(config, channel_round=space.config.round_to, prune_grid=space.config.grid(PRUNE))
    if budget.limits:
        budget.check_reachable(space, base)
    obj = make_objective(config.objective, budget=budget, base=base, cost_metric=config.cost_metric)
    stored, work = open_study(out=out, config=config, objective=obj, fingerprint=space.fingerprint, workers=workers)
    study = work.study  # in memory; `work` writes each trial through to `stored`
    searcher = make_searcher(config.sampler, study, space, obj, seed=config.seed, repair=config.repair,
                             latency_model=latency_model)
    trials = config.trials
    if isinstance(searcher, OptunaSearcher) and not study.get_trials(deepcopy=False):  # a new study
        latency = latency_model.predict_rel if latency_model is not None else None
        for policy in budget_starts(space, budget, base, most=trials // 4, latency=latency):
            searcher.enqueue(policy)
    driver = Driver(run=uuid.uuid4().hex[:12], pid=os.getpid(), host=socket.gethostname())
    rows = [r for r in map(TrialRecord.from_trial, study.get_trials(deepcopy=False)) if r.completed]
    done = finished_count(study)
    start, started_with = time.perf_counter(), done
    in_flight: dict[int, Any] = {}
    # Workers outside this process get one policy queued ahead, so a worker that finishes starts the next one while
    # the driver records the last and asks the sampler (otherwise each worker idles for that). A pool that
    # evaluates in this process (one local worker) does so inside wait(): there is nothing to overlap, and a thread
    # would not help (torch runs slower off the main thread, by far more than the driver's work it would hide;
    # benchmarks/RESULTS.md).
    depth = workers if getattr(pool, "in_process", False) else workers + 1
    lock = MachineLock()  # the driver's own CPU work never runs beside a latency timing run on this machine
    shared = isinstance(work, DirectStudy)  # other drivers take trials too: count what the stored study holds
    while True:
        while len(in_flight) < depth and (claimed_count(study) if shared else done + len(in_flight)) < trials:
            with lock.compute():
                proposal = searcher.ask()
                proposal.record = replace(proposal.record, driver=driver)
                write_record(proposal.trial, proposal.record)
                proposal.policy.save(out / proposal.record.policy_file)  # the user's copy of the stored policy
                work.begin(proposal.trial)
            pool.submit(proposal.trial_number, proposal.policy)
            in_flight[proposal.trial_number] = proposal
        if not in_flight:
            break
        for key, outcome in pool.wait(timeout=None):
            proposal = in_flight.pop(key)
            with lock.compute():
                if latency_model is not None and timed(outcome):
                    latency_model.record(proposal.policy, outcome.latency_rel)  # type: ignore[union-attr]
                record = searcher.tell(proposal, outcome)
                work.finish(proposal.trial)
            done += 1
            if record.completed:
                rows.append(record)
            if on_progress is not None:
                on_progress(_stats(rows, done, trials, start, started_with))
    if config.promote and promote_fn is not None:
        promote(stored, promote_fn, obj, k=config.promote)
    return StudyResult.from_study(stored, trials=study.get_trials(deepcopy=False))  # the copy holds what is stored


def promote(study: optuna.Study, promote_fn: Callable[[Policy], Outcome], objective: Objective, *, k: int) -> None:
    """Re-evaluate the k most accurate front trials at high fidelity.

    A finished Optuna trial is read-only, so the new numbers go into the study's user attrs (`promoted_key`);
    StudyResult shows them in place of the cheap ones, which it keeps as the record's `cheap`.
    """
    result = StudyResult.from_study(study)
    for row in sorted(result.front(), key=lambda r: -r.accuracy)[:k]:
        key = promoted_key(row.number)
        if key in study.user_attrs or row.policy is None:
            continue
        outcome = promote_fn(row.policy)
        again = TrialRecord(number=row.number, state=TrialState.COMPLETE)
        if isinstance(outcome, Measurement):
            again = again.measured(outcome, constraints=objective.constraints(outcome),
                                   cost_frac=objective.cost(outcome), fidelity="finetune")
        else:
            again = again.failed(getattr(outcome, "reason", str(outcome)))
        study.set_user_attr(key, again.metrics_attr())


@dataclass(frozen=True)
class SearchProgress:
    """Where a running search stands, handed to the caller's progress callback after each finished trial."""

    done: int
    total: int
    feasible: int
    best_accuracy: float | None
    front: int
    elapsed: float
    eta: float | None


def _stats(rows: list[TrialRecord], done: int, total: int, start: float, started_with: int) -> SearchProgress:
    feasible = [r for r in rows if r.feasible]
    elapsed = time.perf_counter() - start
    rate = (done - started_with) / elapsed if elapsed > 0 else 0.0
    return SearchProgress(done=done, total=total, feasible=len(feasible),
                          best_accuracy=max((r.accuracy for r in feasible), default=None),
                          front=len(front_rows(rows)), elapsed=elapsed,
                          eta=(total - done) / rate if rate > 0 else None)


__all__ += ["requeue_stale", "finished_count", "promote", "BudgetError", "SearchProgress"]
