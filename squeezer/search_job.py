"""The search job: load model and data, build the space, the evaluator pool and the study, search, write the front."""
from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from optuna.trial import TrialState

from squeezer.datasets import load_data, recovery_on
from squeezer.devices import check_device
from squeezer.evaluators.accuracy import score
from squeezer.evaluators.data import DataConfig, FileSplit
from squeezer.evaluators.evaluate import Evaluator
from squeezer.evaluators.latency import LatencyTable
from squeezer.evaluators.measurement import Measurement
from squeezer.evaluators.pool import PoolConfig, make_pool
from squeezer.evaluators.ray_cluster import resolve_address
from squeezer.evaluators.settings import EvalSettings, LatencyConfig, RecoveryConfig
from squeezer.models import resolve_source, save_checkpoint, weights_preprocessing, weights_ref
from squeezer.plots import write_front_files
from squeezer.policies.policy import Policy
from squeezer.progress import LiveDisplay, progress_bar
from squeezer.run_folder import BASE_FILE, RUN_FILE, abs_ref, check_run, read_run, saved_inputs, write_run
from squeezer.search.config import RunConfig, SearchConfig
from squeezer.search.latency_margin import prediction_error
from squeezer.search.records import TrialRecord
from squeezer.search.run_lock import holding_folder
from squeezer.search.storage import banner, study_name, write_storage_file
from squeezer.search.study import dashboard_command, preload_storage, run_search
from squeezer.search.study_check import check_study_files, holds_trials
from squeezer.spaces.space import SearchSpace

log = logging.getLogger(__name__)

__all__ = ["SearchSummary", "closest_to_budget", "failure_counts", "search_policies"]


def _build_latency_table(pool: Any, net: Any, bundle: Any, settings: EvalSettings, space_: SearchSpace,
                         cache: Path | None, progress: bool) -> LatencyTable:
    """Time every lookup-table entry the search can need before it starts (a few minutes once per machine and
    model; a resumed search finds them cached), so predictions during the search cost microseconds; returns the
    table. A one-worker local pool's own evaluator does it (its table is then the one it predicts from); otherwise
    one is made here and the workers read the table from disk (with --latency measure, the table only serves
    repair and the agent)."""
    evaluator = getattr(pool, "evaluator", None)
    if evaluator is None or evaluator.meter is None:
        evaluator = Evaluator(net, bundle, settings, space=space_, cache_dir=cache)
    if not progress:
        return evaluator.build_latency_table(space_)
    bar, _ = progress_bar(1, "latency table", loss=False)  # the total is known once the cache is read

    def report(done: int, total: int) -> None:
        bar.update(bar.task_ids[0], completed=done, total=total)

    with bar:
        return evaluator.build_latency_table(space_, report)


@dataclass
class SearchSummary:
    """What a finished (or resumed) search produced, for the face to render."""

    out: Path
    base: Measurement
    budget: str
    metric_x: str
    front: list[TrialRecord]
    completed: int
    failed: int
    seconds: float
    interrupted: int = 0  # trials a stopped search left unfinished, queued again (not counted as failed)
    files: list[Path] = field(default_factory=list)
    failures: list[tuple[str, int]] = field(default_factory=list)  # the commonest reasons trials failed, and how often
    closest: dict[str, Any] | None = None  # with no feasible trial: the one nearest the budget, and by how much
    latency_check: dict[str, float] | None = None  # the latency table's predictions vs the candidates timed
    dashboard: str | None = None  # the optuna-dashboard command that opens the study
    checkpoint_accuracy: float | None = None  # the model file's own validation accuracy, as saved (before recovery)
    study: str | None = None  # in a shared storage: which study, where, and the dashboard command


def _say(line: str | None, progress: bool) -> None:
    """Where the search runs, told to the user at its start (the summary repeats it at the end) and to the log."""
    if line:
        log.info(line)
        if progress:
            print(f"squeezer search: {line}", file=sys.stderr, flush=True)


def _base_measurement(pool: Any, fingerprint: str) -> Measurement:
    """The unchanged model measured by the pool itself, so base and candidates share hardware and settings."""
    pool.submit(-1, Policy(fingerprint=fingerprint))
    while True:
        for key, outcome in pool.wait(timeout=None):
            if key == -1:
                if not isinstance(outcome, Measurement) and outcome.reason.startswith("non-finite"):
                    # data is checked when loaded, so what is left is the model: NaN weights, or an overflow
                    raise ValueError(f"the unchanged model gives a {outcome.reason[:80]}: check its weights for NaN "
                                     "or infinity")
                if not isinstance(outcome, Measurement):
                    raise RuntimeError(f"the unchanged model could not be evaluated: {outcome.reason}")
                return outcome


def search_policies(*, model: Any, data: Any = "digits", out: str | Path, budget: str | None = None,
                    trials: int | None = None, search: SearchConfig | None = None,
                    recovery: RecoveryConfig | str = "bn", latency: LatencyConfig | str = "measure",
                    pool: PoolConfig | None = None, device: str = "cpu", weights: str | None = None,
                    trust_pickle: bool = False, progress: bool = False,
                    data_config: DataConfig | None = None) -> SearchSummary:
    """Search compression policies of `model` within `budget`; re-running with the same `out` resumes.

    `model` and `data` are references (strings, as on the command line), or from Python an nn.Module and image and
    label tensors (an (x, y) pair, or a dict of pairs under 'train', 'val', 'test'), saved into `out`. `budget`
    and `trials`, when given, replace those of `search` (the sampler, objective, knobs, repair, promotion, seed
    and storage: SearchConfig). `recovery` and `latency` are a mode ("kd", "predict") or a whole config; `pool`
    says how many workers evaluate, where (local processes, Ray, a cluster), and on which Ray node latency is timed
    (by default one worker per core, or per GPU with device 'cuda'). `weights` is a state_dict for the
    architecture `model` names, or a torchvision model's pretrained weights by name (from the local hub cache),
    recorded in the run; a pickled model file (and the run's base.pt made from one) loads only with
    `trust_pickle`. `data_config` says how the data is read (preprocessing, the validation samples scored, loader
    processes, the model's class order, a folder of unlabelled images to recover on: recovery is then unlabelled);
    a resumed run reads it as recorded unless told otherwise.
    """
    config = replace(search or SearchConfig(), **{k: v for k, v in (("budget", budget), ("trials", trials))
                                                  if v is not None})
    pool_config = pool or PoolConfig()
    check_device(device, cluster=bool(resolve_address(pool_config.ray_address)))
    parsed = config.parsed_budget
    if not parsed.limits:
        raise ValueError("the budget is empty: pass a limit such as --budget 'macs<=50%'")
    settings = EvalSettings(recovery=RecoveryConfig(mode=recovery) if isinstance(recovery, str) else recovery,
                            latency=LatencyConfig(mode=latency) if isinstance(latency, str) else latency,
                            device=device, seed=config.seed)
    if settings.recovery.matches_features and settings.recovery.mode not in ("finetune", "kd"):
        raise ValueError(f"hint and attention-transfer weights train the compressed model, which recovery "
                         f"{settings.recovery.mode!r} does not: use --recovery kd or finetune")
    if "latency" in parsed.metrics and settings.latency.mode == "none":
        raise ValueError("the budget limits latency but --latency none measures none: use --latency measure")
    out = Path(out)
    # One writer per run folder, decided before anything is written; the lock holds until the search ends.
    with holding_folder(out):
        check_study_files(out, config.storage)
        return _search(model=model, data=data, out=out, config=config, settings=settings, pool_config=pool_config,
                       weights=weights, trust_pickle=trust_pickle, progress=progress, data_config=data_config)


def _search(*, model: Any, data: Any, out: Path, config: SearchConfig, settings: EvalSettings,
            pool_config: PoolConfig, weights: str | None, trust_pickle: bool, progress: bool,
            data_config: DataConfig | None) -> SearchSummary:
    """The search itself, with the run folder's lock held."""
    parsed = config.parsed_budget
    given = model if isinstance(model, torch.nn.Module) else None  # searched as given: its file here is a pickle
    # A folder holding the settings of a search stopped before its first trial starts afresh: no trial to lose.
    started = holds_trials(out, config.storage)
    if not started and (out / RUN_FILE).is_file():
        log.info("%s holds no trial of the search recorded there: starting afresh", out)
    model, data = saved_inputs(model, data, out)
    preload_storage(config.storage)  # the storage's imports overlap loading data, model and evaluators
    data_config, split = _data_settings(out, data, data_config or DataConfig()) if started else (
        data_config or DataConfig(), None)
    settings = replace(settings, recovery=recovery_on(settings.recovery, data_config))
    # a pretrained torchvision model's own transforms, for an image folder given no preprocessing
    implied = weights_preprocessing(model, str(weights)) if isinstance(model, str) and weights else None
    bundle = load_data(data, config=data_config, split=split, implied=implied)
    base_path = out / BASE_FILE
    resuming = started and base_path.is_file()  # the exact model searched: its weights, whatever `model` builds now
    source = str(base_path) if resuming else (model if given is None else given)
    net, recipe = resolve_source(source, bundle, weights=None if resuming else weights, trust_pickle=trust_pickle)
    before = read_run(out) if (out / RUN_FILE).is_file() else None
    # a resumed run searches the space it recorded (rounding, prune grid) unless told otherwise
    config = config.resumed(before.search if before is not None else None)
    # the one trace of the model: every evaluator of this process, and every worker, is handed this space
    space_ = SearchSpace.from_model(net, bundle.example_inputs(), config.space)
    recorded = weights_ref(model, weights) if isinstance(model, str) else None
    if recorded is None and resuming and before is not None:
        recorded = before.weights  # a resume without --weights keeps the weights the run recorded
    run = RunConfig(model=abs_ref(model), data=abs_ref(data), fingerprint=space_.fingerprint, weights=recorded,
                    search=config, eval=settings, data_config=replace(data_config, preprocess=bundle.preprocess),
                    data_split=bundle.file_split)
    if started:
        check_run(out, run)
    start = time.perf_counter()
    # The base a search compares with is recovered as every candidate is (e.g. BatchNorm re-estimated on the
    # seed's batches), so it differs a little from the model file's own accuracy; both are shown.
    checkpoint_accuracy = score(net, bundle, device=settings.device)[0]
    net.cpu()
    pool_config = replace(pool_config, cache_dir=pool_config.cache_dir or out / "cache")
    where = banner(storage=config.storage, name=study_name(out=out, storage=config.storage, study=config.study))
    evaluators = make_pool(net, bundle, settings, config=pool_config, space=space_)
    try:
        base = _base_measurement(evaluators, space_.fingerprint)
        parsed.check_reachable(space_, base)
        # where the search runs, said once its inputs are known good: a refused search says one line, its reason
        _say(where, progress)
        _say(getattr(evaluators, "description", None), progress)
        _warn_if_untrained(base, bundle, model, data)
        write_run(out, run)
        write_storage_file(out, storage=config.storage,
                           name=study_name(out=out, storage=config.storage, study=config.study))
        # Repair and the agent's action wall judge a latency limit by the lookup table (int8 units can be slower than
        # float ones, which MACs cannot see), so such a search builds the table even when every candidate is timed.
        judges_latency = (config.repair or config.sampler == "ddpg") and "latency" in parsed.metrics
        table = None
        if (settings.latency.mode in ("predict", "hybrid") or judges_latency) and not pool_config.latency_resource:
            table = _build_latency_table(evaluators, net, bundle, settings, space_, pool_config.cache_dir, progress)
        if not resuming:
            save_checkpoint(net, base_path, recipe=recipe, data=bundle.name, accuracy=base.accuracy)
        promote_fn = None
        if config.promote:
            fine = Evaluator(net, bundle, replace(settings, recovery=replace(settings.recovery, mode="kd"),
                                                  latency=LatencyConfig(mode="none")),
                             space=space_, cache_dir=pool_config.cache_dir)
            promote_fn = fine.evaluate
        display = LiveDisplay() if progress else None
        try:
            result = run_search(space_, evaluators, base, out=out, config=config, workers=evaluators.workers,
                                on_progress=display, promote_fn=promote_fn, latency_model=table)
        finally:
            if display is not None:
                display.close()
    finally:
        evaluators.close()
    metric_x = result.attrs.get("cost_metric", "macs")
    files = write_front_files(result, out, metric_x)
    failed, interrupted = failure_counts(result.rows)
    front = result.front(metric_x)
    return SearchSummary(out=out, base=base, budget=str(parsed), metric_x=metric_x, front=front,
                         completed=sum(r.state == TrialState.COMPLETE for r in result.rows),
                         failed=sum(failed.values()), interrupted=interrupted, seconds=time.perf_counter() - start,
                         files=files, failures=failed.most_common(3),
                         closest=None if front else closest_to_budget(result.rows, parsed, repair=config.repair),
                         latency_check=prediction_error(result.rows),
                         dashboard=dashboard_command(config.storage, out), checkpoint_accuracy=checkpoint_accuracy,
                         study=where)


def failure_counts(rows: list[TrialRecord]) -> tuple[Counter[str], int]:
    """The failed trials by reason, and how many trials a stopped search interrupted: those were queued again
    (and re-run by a resumed search), so they are no failure of their policy."""
    failed = [r for r in rows if r.state == TrialState.FAIL]
    return Counter(r.fail_reason or "no reason recorded" for r in failed if not r.stale), sum(r.stale for r in failed)


def _data_settings(out: Path, data: str, given: DataConfig) -> tuple[DataConfig, FileSplit | None]:
    """The data settings and file division of a run folder that already searched this data (a resumed search reads
    the same images the same way), else those given and none."""
    if not (out / RUN_FILE).is_file():
        return given, None
    recorded = read_run(out)
    if recorded.data != abs_ref(data):
        return given, None
    return given.resumed(recorded.data_config), recorded.data_split


def closest_to_budget(rows: list[TrialRecord], budget: Any, *, repair: bool) -> dict[str, Any] | None:
    """The completed trial whose worst limit is exceeded least, with each limit it exceeds and by how much (a
    constraint is the excess over the limit as a fraction of it), and what to try next."""
    done = [r for r in rows if r.state == TrialState.COMPLETE and r.constraints]
    if not done:
        return None
    best = min(done, key=lambda r: max(r.constraints or ()))
    over = {lim.text: c for lim, c in zip(budget.limits, best.constraints or ()) if c > 0}
    hint = "loosen the budget or search longer" if repair else \
        "loosen the budget, search longer, or pass --repair to shrink each candidate into the budget"
    return {"number": best.number, "accuracy": best.accuracy, "over": over, "hint": hint}


def _warn_if_untrained(base: Measurement, bundle: Any, model: str, data: str) -> None:
    """Say so when the unchanged model is no better than always answering the commonest class: a model reference
    that builds an architecture (a zoo, torchvision or module:function name) is untrained unless the function loads
    weights, and every candidate of such a model scores at chance too."""
    majority = float(torch.bincount(bundle.val.y).max()) / max(1, len(bundle.val))
    if base.accuracy <= majority + 0.02:
        log.warning("the unchanged model scores %.3f on the validation split of %s, no better than always answering "
                    "its commonest class (%.3f): is it trained? Search a trained checkpoint, e.g. `squeezer train "
                    "--model %s --data %s --out model.pt` first", base.accuracy, bundle.name, majority, model, data)
