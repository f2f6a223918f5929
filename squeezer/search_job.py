"""The search job: load model and data, build the space, the evaluator pool and the study, search, write the front."""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from optuna.trial import TrialState

from squeezer.datasets import load_data
from squeezer.devices import check_device
from squeezer.evaluators.evaluate import EvalSettings, Evaluator
from squeezer.evaluators.measurement import Measurement
from squeezer.evaluators.pool import make_pool
from squeezer.models import resolve_model, save_checkpoint
from squeezer.plots import write_front_files
from squeezer.policies.policy import Policy
from squeezer.progress import LiveDisplay, progress_bar
from squeezer.run_folder import BASE_FILE, abs_ref, check_run, saved_inputs, write_run
from squeezer.search.budget import Budget
from squeezer.search.latency_margin import prediction_error
from squeezer.search.records import TrialRecord
from squeezer.search.study import preload_storage, run_search
from squeezer.spaces.knobs import KNOBS, SpaceConfig
from squeezer.spaces.space import SearchSpace

log = logging.getLogger(__name__)

__all__ = ["SearchSummary", "closest_to_budget", "knob_list", "search_policies"]


def _build_latency_table(pool: Any, net: Any, bundle: Any, settings: Any, space_: SearchSpace, cache: Path,
                         progress: bool) -> Any:
    """Time every lookup-table entry the search can need before it starts (a few minutes once per machine and
    model; a resumed search finds them cached), so predictions during the search cost microseconds; returns the
    table. A one-worker local pool's own evaluator does it; otherwise one is made here and the workers read the
    table from disk (with --latency measure, the table only serves repair)."""
    evaluator = getattr(pool, "evaluator", None)
    if evaluator is None or evaluator.table is None:
        mode = settings.latency if settings.latency in ("predict", "hybrid") else "predict"
        evaluator = Evaluator(net, bundle, replace(settings, latency=mode), cache_dir=cache)
    if not progress:
        evaluator.build_latency_table(space_)
        return evaluator.table
    bar, _ = progress_bar(1, "latency table", loss=False)  # the total is known once the cache is read

    def report(done: int, total: int) -> None:
        bar.update(bar.task_ids[0], completed=done, total=total)

    with bar:
        evaluator.build_latency_table(space_, report)
    return evaluator.table


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
    files: list[Path] = field(default_factory=list)
    failures: list[tuple[str, int]] = field(default_factory=list)  # the commonest reasons trials failed, and how often
    closest: dict[str, Any] | None = None  # with no feasible trial: the one nearest the budget, and by how much
    latency_check: dict[str, float] | None = None  # the latency table's predictions vs the candidates timed


def knob_list(knobs: tuple[str, ...] | None) -> tuple[str, ...]:
    if not knobs:
        return KNOBS
    bad = [k for k in knobs if k not in KNOBS]
    if bad:
        raise ValueError(f"unknown knob {bad[0]!r}: choose from {', '.join(KNOBS)}")
    return tuple(knobs)


def _base_measurement(pool: Any, fingerprint: str) -> Measurement:
    """The unchanged model measured by the pool itself, so base and candidates share hardware and settings."""
    pool.submit(-1, Policy(fingerprint=fingerprint))
    while True:
        for key, outcome in pool.wait(timeout=None):
            if key == -1:
                if not isinstance(outcome, Measurement):
                    raise RuntimeError(f"the unchanged model could not be evaluated: {outcome.reason}")
                return outcome


def search_policies(*, model: Any, data: Any = "digits", budget: str, out: str | Path, trials: int = 50,
           sampler: str = "tpe", workers: int | None = None, storage: str | None = None,
           ray_address: str | None = None,
           device: str = "cpu", objective: str = "multi", recovery: str = "bn", latency: str = "measure",
           knobs: tuple[str, ...] | None = None, repair: bool = False, promote: int = 0, seed: int = 0,
           backend: str = "auto", latency_on: str | None = None, progress: bool = False,
           settings: dict[str, Any] | None = None) -> SearchSummary:
    """Search compression policies of `model` within `budget`; re-running with the same `out` resumes.

    `model` and `data` are references (strings, as on the command line), or from Python an nn.Module and image and
    label tensors (an (x, y) pair, or a dict of pairs under 'train', 'val', 'test'), saved into `out`.
    `settings` overrides EvalSettings fields (e.g. fewer latency runs for a quick demo); `latency_on` names the
    custom Ray resource of the node that times latency (the target device). `workers` defaults to one per core
    (one per GPU with device 'cuda'), in a local Ray when Ray is installed (`backend`), or to one per core (GPU) of
    the cluster `ray_address` names.
    """
    check_device(device, cluster=bool(ray_address))
    parsed = Budget.parse(budget)
    if not parsed.limits:
        raise ValueError("the budget is empty: pass a limit such as --budget 'macs<=50%'")
    if "latency" in parsed.metrics and latency == "none":
        raise ValueError("the budget limits latency but --latency none measures none: use --latency measure")
    chosen = knob_list(knobs)
    eval_settings = EvalSettings(recovery=recovery, latency=latency, device=device, seed=seed, **(settings or {}))
    out = Path(out)
    model, data = saved_inputs(model, data, out)
    preload_storage(storage)  # the storage's imports overlap loading data, model and evaluators
    bundle = load_data(data)
    base_path = out / BASE_FILE
    net = resolve_model(str(base_path) if base_path.is_file() else model, bundle)
    example = bundle.example_inputs()
    space_ = SearchSpace.from_model(net, example, SpaceConfig(knobs=chosen))
    run_settings = {"model": abs_ref(model), "data": abs_ref(data), "fingerprint": space_.fingerprint,
                    "budget": str(parsed), "objective": objective, "knobs": list(chosen), "sampler": sampler,
                    "seed": seed, "eval": {k: v for k, v in eval_settings.__dict__.items()}}
    check_run(out, run_settings)
    start = time.perf_counter()
    pool = make_pool(net, bundle, eval_settings, workers=workers, backend=backend, ray_address=ray_address,
                     latency_resource=latency_on, cache_dir=out / "cache")
    try:
        base = _base_measurement(pool, space_.fingerprint)
        parsed.check_reachable(space_, base)
        _warn_if_untrained(base, bundle, model, data)
        write_run(out, run_settings)
        # Repair and the agent's action wall judge a latency limit by the lookup table (int8 units can be slower than
        # float ones, which MACs cannot see), so such a search builds the table even when every candidate is timed.
        latency_model = table = None
        judges_latency = (repair or sampler == "ddpg") and "latency" in parsed.metrics
        if (latency in ("predict", "hybrid") or judges_latency) and latency_on is None:
            table = _build_latency_table(pool, net, bundle, eval_settings, space_, out / "cache", progress)
            latency_model = table if judges_latency else None
        if not base_path.is_file():
            save_checkpoint(net, base_path, data=bundle.name, accuracy=base.accuracy)
        promote_fn = None
        if promote:
            fine = Evaluator(net, bundle, replace(eval_settings, recovery="kd", latency="none"),
                             cache_dir=out / "cache")
            promote_fn = fine.evaluate
        display = LiveDisplay() if progress else None
        try:
            result = run_search(space_, pool, parsed, base, out=out, sampler=sampler, trials=trials,
                                workers=pool.workers, storage=storage, objective=objective, repair=repair, seed=seed,
                                on_progress=display, promote_top_k=promote, promote_fn=promote_fn, check=False,
                                latency_model=latency_model,
                                start_latency=table.predict_rel if table is not None else None)
        finally:
            if display is not None:
                display.close()
    finally:
        pool.close()
    metric_x = result.attrs.get("cost_metric", "macs")
    files = write_front_files(result, out, metric_x)
    states = [r.state for r in result.rows]
    reasons = Counter(r.fail_reason or "no reason recorded" for r in result.rows if r.state == TrialState.FAIL)
    front = result.front(metric_x)
    return SearchSummary(out=out, base=base, budget=str(parsed), metric_x=metric_x, front=front,
                         completed=states.count(TrialState.COMPLETE), failed=states.count(TrialState.FAIL),
                         seconds=time.perf_counter() - start, files=files, failures=reasons.most_common(3),
                         closest=None if front else closest_to_budget(result.rows, parsed, repair=repair),
                         latency_check=prediction_error(result.rows))


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
