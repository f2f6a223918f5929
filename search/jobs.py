"""The user's jobs as functions: train, space, search, front, apply, report, demo.

The CLI and `import squeezer` both call these; they only wire the packages together (load model and data, build
the space, the evaluator pool and the study) and return data that the face renders.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from squeezer.evaluators.baseline import TrainResult, resolve_model, train_baseline
from squeezer.evaluators.data import load_data
from squeezer.evaluators.measurement import Measurement
from squeezer.spaces.knobs import KNOBS, SpaceConfig
from squeezer.spaces.space import SearchSpace

log = logging.getLogger(__name__)

__all__ = ["train", "space", "search", "front", "apply", "report", "demo", "SearchSummary", "FrontSummary",
           "ApplySummary", "DemoSummary"]


def _progress_bar(total: int, label: str, *, loss: bool = True):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total}")]
    columns += [TextColumn("loss {task.fields[loss]:.3f}")] if loss else []
    progress = Progress(*columns, TimeRemainingColumn(), transient=True)
    task = progress.add_task(label, total=total, loss=float("nan"))
    return progress, lambda step, loss=float("nan"): progress.update(task, completed=step, loss=loss)


def _build_latency_table(pool: Any, net: Any, bundle: Any, settings: Any, space_: SearchSpace, cache: Path,
                         progress: bool) -> Any:
    """Time every lookup-table entry the search can need before it starts (a few minutes once per machine and
    model; a resumed search finds them cached), so predictions during the search cost microseconds; returns the
    table. A one-worker local pool's own evaluator does it; otherwise one is made here and the workers read the
    table from disk (with --latency measure, the table only serves repair)."""
    from squeezer.evaluators.evaluate import Evaluator

    evaluator = getattr(pool, "evaluator", None)
    if evaluator is None or evaluator.table is None:
        mode = settings.latency if settings.latency in ("predict", "hybrid") else "predict"
        evaluator = Evaluator(net, bundle, replace(settings, latency=mode), cache_dir=cache)
    if not progress:
        evaluator.build_latency_table(space_)
        return evaluator.table
    bar, _ = _progress_bar(1, "latency table", loss=False)  # the total is known once the cache is read

    def report(done: int, total: int) -> None:
        bar.update(bar.task_ids[0], completed=done, total=total)

    with bar:
        evaluator.build_latency_table(space_, report)
    return evaluator.table


def train(*, model: str = "resnet20", data: str = "digits", out: str | Path = "runs/resnet20.pt", steps: int = 300,
          lr: float = 0.05, seed: int = 0, device: str = "cpu", progress: bool = False) -> TrainResult:
    """Train a baseline checkpoint (seconds on the bundled digits) that every other job accepts as --model."""
    _check_device(device)
    if not progress:
        return train_baseline(model, data, out=out, steps=steps, lr=lr, seed=seed, device=device)
    bar, update = _progress_bar(steps, f"training {model}")
    with bar:
        return train_baseline(model, data, out=out, steps=steps, lr=lr, seed=seed, device=device, on_step=update)


def space(model: str, *, data: str = "digits", knobs: tuple[str, ...] | None = None,
          include: tuple[str, ...] | None = None, exclude: tuple[str, ...] | None = None,
          **config: Any) -> SearchSpace:
    """The search space of `model` on inputs shaped like `data`'s, optionally restricted."""
    bundle = load_data(data)
    net = resolve_model(model, bundle)
    options: dict[str, Any] = dict(config)
    if knobs:
        options["knobs"] = _knob_list(knobs)
    if include:
        options["include"] = tuple(include)
    if exclude:
        options["exclude"] = tuple(exclude)
    return SearchSpace.from_model(net, bundle.example_inputs(), SpaceConfig(**options))


def _check_device(device: str, cluster: bool = False) -> None:
    """`cluster`: evaluations run in a Ray cluster, whose GPUs the pool checks (this machine may have none)."""
    import torch

    if device == "cuda" and not cluster and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA GPU is visible: use --device cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: use cpu or cuda")


# ---- the run folder -------------------------------------------------------------------------------------------
RUN_FILE = "run.json"


def _abs_ref(ref: str) -> str:
    """Model/data references that are files or folders are stored absolute, so a run folder can be used anywhere."""
    path = Path(ref)
    return str(path.resolve()) if path.exists() else ref


def _read_run(run: str | Path) -> dict[str, Any]:
    path = Path(run) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a squeezer run folder (no {RUN_FILE}): pass the --out "
                                "folder of a `squeezer search`")
    return json.loads(path.read_text())


def _write_run(out: Path, settings: dict[str, Any]) -> None:
    """Record the run's settings (after `_check_run` has refused a folder holding another study)."""
    path = out / RUN_FILE
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


# ---- search ---------------------------------------------------------------------------------------------------------
BASE_FILE = "base.pt"  # the exact base model a run searched (a torchvision name alone would re-initialise)
X_METRICS = {"macs": "macs", "latency": "latency", "latency_ms": "latency", "size": "size", "size_mb": "size",
             "bops": "bops", "params": "params"}


@dataclass
class SearchSummary:
    """What a finished (or resumed) search produced, for the face to render."""

    out: Path
    base: Measurement
    budget: str
    metric_x: str
    front: list[dict[str, Any]]
    completed: int
    failed: int
    seconds: float
    files: list[Path] = field(default_factory=list)
    failures: list[tuple[str, int]] = field(default_factory=list)  # the commonest reasons trials failed, and how often
    closest: dict[str, Any] | None = None  # with no feasible trial: the one nearest the budget, and by how much
    latency_check: dict[str, float] | None = None  # the latency table's predictions vs the candidates timed


def _knob_list(knobs: tuple[str, ...] | None) -> tuple[str, ...]:
    if not knobs:
        return KNOBS
    bad = [k for k in knobs if k not in KNOBS]
    if bad:
        raise ValueError(f"unknown knob {bad[0]!r}: choose from {', '.join(KNOBS)}")
    return tuple(knobs)


def _base_measurement(pool: Any, fingerprint: str) -> Measurement:
    """The unchanged model measured by the pool itself, so base and candidates share hardware and settings."""
    from squeezer.policies.policy import Policy

    pool.submit(-1, Policy(fingerprint=fingerprint))
    while True:
        for key, outcome in pool.wait(timeout=None):
            if key == -1:
                if not isinstance(outcome, Measurement):
                    raise RuntimeError(f"the unchanged model could not be evaluated: {outcome.reason}")
                return outcome


def _saved_inputs(model: Any, data: Any, out: Path) -> tuple[str, str]:
    """A model (nn.Module) or data (image and label tensors) given in memory through the Python API, saved into the
    run folder so the workers, a resumed search and `apply` find it by path like any other reference. Files are
    named by their content: a folder holding another study keeps its own."""
    import hashlib
    import io

    import torch

    from squeezer.evaluators.data import image_splits

    def save_once(obj: Any, stem: str) -> str:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        path = out / f"{stem}-{hashlib.sha1(buffer.getvalue()).hexdigest()[:12]}.pt"
        if not path.is_file():
            out.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buffer.getvalue())
        return str(path)

    if isinstance(model, torch.nn.Module):
        model = save_once(model, "model")
    if not isinstance(data, str):
        data = save_once(image_splits(data, "the data given"), "data")
    return model, data


def search(*, model: Any, data: Any = "digits", budget: str, out: str | Path, trials: int = 50,
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
    from squeezer.evaluators.evaluate import EvalSettings
    from squeezer.evaluators.pool import make_pool
    from squeezer.evaluators.zoo import save_checkpoint
    from squeezer.search.budget import Budget
    from squeezer.search.latency_margin import prediction_error
    from squeezer.search.study import preload_storage, run_search

    _check_device(device, cluster=bool(ray_address))
    parsed = Budget.parse(budget)
    if not parsed.limits:
        raise ValueError("the budget is empty: pass a limit such as --budget 'macs<=50%'")
    if "latency" in parsed.metrics and latency == "none":
        raise ValueError("the budget limits latency but --latency none measures none: use --latency measure")
    chosen = _knob_list(knobs)
    eval_settings = EvalSettings(recovery=recovery, latency=latency, device=device, seed=seed, **(settings or {}))
    out = Path(out)
    model, data = _saved_inputs(model, data, out)
    preload_storage(storage)  # the storage's imports overlap loading data, model and evaluators
    bundle = load_data(data)
    base_path = out / BASE_FILE
    net = resolve_model(str(base_path) if base_path.is_file() else model, bundle)
    example = bundle.example_inputs()
    space_ = SearchSpace.from_model(net, example, SpaceConfig(knobs=chosen))
    run_settings = {"model": _abs_ref(model), "data": _abs_ref(data), "fingerprint": space_.fingerprint,
                    "budget": str(parsed), "objective": objective, "knobs": list(chosen), "sampler": sampler,
                    "seed": seed, "eval": {k: v for k, v in eval_settings.__dict__.items()}}
    _check_run(out, run_settings)
    start = time.perf_counter()
    pool = make_pool(net, bundle, eval_settings, workers=workers, backend=backend, ray_address=ray_address,
                     latency_resource=latency_on, cache_dir=out / "cache")
    try:
        base = _base_measurement(pool, space_.fingerprint)
        parsed.check_reachable(space_, base)
        _warn_if_untrained(base, bundle, model, data)
        _write_run(out, run_settings)
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
            from squeezer.evaluators.evaluate import Evaluator

            fine = Evaluator(net, bundle, replace(eval_settings, recovery="kd", latency="none"),
                             cache_dir=out / "cache")
            promote_fn = fine.evaluate
        result = run_search(space_, pool, parsed, base, out=out, sampler=sampler, trials=trials,
                            workers=pool.workers,
                            storage=storage, objective=objective, repair=repair, seed=seed, progress=progress,
                            promote_top_k=promote, promote_fn=promote_fn, check=False, latency_model=latency_model,
                            start_latency=table.predict_rel if table is not None else None)
    finally:
        pool.close()
    metric_x = result.attrs.get("cost_metric", "macs")
    files = _write_front_files(result, out, metric_x)
    states = [r["state"] for r in result.rows]
    reasons = Counter(r.get("fail_reason") or "no reason recorded" for r in result.rows if r["state"] == "FAIL")
    front = result.front(metric_x)
    return SearchSummary(out=out, base=base, budget=str(parsed), metric_x=metric_x, front=front,
                         completed=states.count("COMPLETE"), failed=states.count("FAIL"),
                         seconds=time.perf_counter() - start, files=files, failures=reasons.most_common(3),
                         closest=None if front else closest_to_budget(result.rows, parsed, repair=repair),
                         latency_check=prediction_error(result.rows))


def closest_to_budget(rows: list[dict[str, Any]], budget: Any, *, repair: bool) -> dict[str, Any] | None:
    """The completed trial whose worst limit is exceeded least, with each limit it exceeds and by how much (a
    constraint is the excess over the limit as a fraction of it), and what to try next."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r.get("constraints")]
    if not done:
        return None
    best = min(done, key=lambda r: max(r["constraints"]))
    over = {lim.text: c for lim, c in zip(budget.limits, best["constraints"]) if c > 0}
    hint = "loosen the budget or search longer" if repair else \
        "loosen the budget, search longer, or pass --repair to shrink each candidate into the budget"
    return {"number": best["number"], "accuracy": best.get("accuracy"), "over": over, "hint": hint}


def _warn_if_untrained(base: Measurement, bundle: Any, model: str, data: str) -> None:
    """Say so when the unchanged model is no better than always answering the commonest class: a model reference
    that builds an architecture (a zoo, torchvision or module:function name) is untrained unless the function loads
    weights, and every candidate of such a model scores at chance too."""
    import torch

    majority = float(torch.bincount(bundle.val.y).max()) / max(1, len(bundle.val))
    if base.accuracy <= majority + 0.02:
        log.warning("the unchanged model scores %.3f on the validation split of %s, no better than always answering "
                    "its commonest class (%.3f): is it trained? Search a trained checkpoint, e.g. `squeezer train "
                    "--model %s --data %s --out model.pt` first", base.accuracy, bundle.name, majority, model, data)


def _check_run(out: Path, settings: dict[str, Any]) -> None:
    """Refuse early (before any evaluation) to resume a folder holding a different study."""
    path = out / RUN_FILE
    if path.is_file():
        _write_run_check(json.loads(path.read_text()), settings, out)


def _write_run_check(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    for key in ("fingerprint", "budget", "objective", "knobs", "sampler"):
        if old.get(key) != new.get(key):
            raise FileExistsError(
                f"output folder {str(out)!r} holds a different study ({key} {old.get(key)!r} there, "
                f"{new.get(key)!r} now): choose another --out or delete the folder")
    if "eval" in old:  # trials scored another way would share one front with the new ones
        there, now = _scoring(old["eval"]), _scoring(new["eval"])
        changed = [k for k in sorted(set(there) | set(now)) if there.get(k) != now.get(k)]
        if changed:
            diff = ", ".join(f"{k} {there.get(k)!r} there, {now.get(k)!r} now" for k in changed)
            raise FileExistsError(
                f"output folder {str(out)!r} holds a study scored with other evaluation settings ({diff}): resume "
                "with the settings it was started with, or choose another --out")


def _scoring(settings: dict[str, Any]) -> dict[str, Any]:
    from squeezer.evaluators.evaluate import EvalSettings

    known = set(EvalSettings.__dataclass_fields__)
    return EvalSettings(**{k: v for k, v in settings.items() if k in known}).scoring()


def _write_front_files(result: Any, out: Path, metric_x: str) -> list[Path]:
    from squeezer.search.report import write_front_html, write_front_png

    files = list(result.write_front(out, metric_x=metric_x))
    if result.completed():
        files += [write_front_html(result, out, metric_x=metric_x), write_front_png(result, out, metric_x=metric_x)]
    return files


# ---- front ----------------------------------------------------------------------------------------------------------
@dataclass
class FrontSummary:
    out: Path
    base: Measurement | None
    budget: str
    metric_x: str
    front: list[dict[str, Any]]
    completed: int
    under: str | None = None
    best_under: dict[str, Any] | None = None
    files: list[Path] = field(default_factory=list)
    closest: dict[str, Any] | None = None  # with no feasible trial: the one nearest the budget (closest_to_budget)
    latency_check: dict[str, float] | None = None  # the latency table's predictions vs the candidates timed


def _load_result(run: str | Path) -> Any:
    from squeezer.search.pareto import StudyResult

    folder = Path(run)
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist: pass the --out folder of a `squeezer search`")
    return StudyResult.load(folder)


def front(run: str | Path, *, x: str | None = None, under: str | None = None) -> FrontSummary:
    """The run's Pareto front (accuracy vs `x` as a fraction of the base), written as csv/json/html/png."""
    from squeezer.search.latency_margin import prediction_error

    result = _load_result(run)
    if x is not None and x not in X_METRICS:
        raise ValueError(f"unknown cost axis {x!r}: choose from macs, latency_ms, size_mb, bops, params")
    metric_x = X_METRICS[x] if x else result.attrs.get("cost_metric", "macs")
    best = result.best_under(under) if under else None
    files = _write_front_files(result, Path(run), metric_x)
    rows = result.front(metric_x)
    closest = None if rows else closest_to_budget(result.rows, result.budget,
                                                  repair=bool(result.attrs.get("settings", {}).get("repair")))
    return FrontSummary(out=Path(run), base=result.base, budget=str(result.budget), metric_x=metric_x,
                        front=rows, completed=len(result.completed()), under=under, best_under=best, files=files,
                        closest=closest, latency_check=prediction_error(result.rows))


# ---- apply ----------------------------------------------------------------------------------------------------------
@dataclass
class ApplySummary:
    """The compressed model as saved, its measurement now, and what the search recorded for it (if it came from one)."""

    out: Path
    onnx: Path | None
    policy: str
    measured: Measurement
    recorded: dict[str, Any] | None
    base: Measurement | None
    test_accuracy: float
    finetuned: bool
    inputs: dict[str, Any] = field(default_factory=dict)  # how raw images are preprocessed (DataBundle.preprocessing)


def _trial_policy(result: Any, run: Path, trial: int) -> tuple[Any, dict[str, Any]]:
    from squeezer.policies.policy import Policy

    row = next((r for r in result.rows if r["number"] == trial), None)
    if row is None or "policy" not in row:
        numbers = [r["number"] for r in result.completed()]
        shown = f"{min(numbers)}..{max(numbers)}" if numbers else "none yet"
        raise LookupError(f"trial {trial} is not a finished trial of {str(run)!r} (trials {shown}): pick one from "
                          f"`squeezer front {run}`")
    if row["state"] != "COMPLETE":
        raise LookupError(f"trial {trial} of {str(run)!r} did not complete ({row.get('fail_reason', row['state'])}): "
                          f"pick one from `squeezer front {run}`")
    return Policy.from_json(row["policy"]), row


def apply(run: str | Path | None = None, *, trial: int | None = None, policy: str | Path | None = None,
          model: str | None = None, data: str | None = None, out: str | Path, onnx: str | Path | None = None,
          finetune_steps: int = 0, device: str = "cpu", latency: bool = True,
          progress: bool = False) -> ApplySummary:
    """Apply a found policy to a fresh copy of the model, recover it as the search did, re-measure and save it."""
    from squeezer.evaluators.evaluate import EvalSettings, Evaluator
    from squeezer.evaluators.train import FitConfig, evaluate, fit
    from squeezer.evaluators.zoo import save_checkpoint
    from squeezer.policies.export import export_onnx, with_metadata
    from squeezer.policies.policy import Policy

    _check_device(device)
    if (trial is None) == (policy is None):
        raise ValueError("pass exactly one of --trial N (with a run folder) or --policy FILE")
    settings: dict[str, Any] = {}
    recorded = None
    result = _load_result(run) if run is not None else None
    if run is not None:
        info = _read_run(run)
        settings = dict(info.get("eval", {}))
        base_file = Path(run) / BASE_FILE
        model = model or (str(base_file) if base_file.is_file() else info["model"])
        data = data or info["data"]
    if trial is not None:
        if run is None:
            raise ValueError("--trial needs the run folder it belongs to: squeezer apply RUN --trial N --out FILE")
        chosen, recorded = _trial_policy(result, Path(run), trial)
    else:
        chosen = Policy.load(policy)
    if model is None:
        raise ValueError("no model to apply the policy to: pass a run folder or --model")
    data = data or "digits"
    settings.update(device=device, latency="measure" if latency else "none")
    known = set(EvalSettings.__dataclass_fields__)
    eval_settings = EvalSettings(**{k: v for k, v in settings.items() if k in known})
    bundle = load_data(data)
    net = resolve_model(model, bundle)
    evaluator = Evaluator(net, bundle, eval_settings)
    chosen.validate(evaluator.space)
    compressed = evaluator.compress(chosen)
    if finetune_steps > 0:
        config = FitConfig(steps=finetune_steps, batch_size=eval_settings.batch_size, lr=eval_settings.finetune_lr,
                           seed=eval_settings.seed, kd_weight=eval_settings.kd_weight,
                           kd_temperature=eval_settings.kd_temperature)  # distilled as the run's kd recovery is
        if progress:
            bar, update = _progress_bar(finetune_steps, "fine-tuning")
            with bar:
                compressed = fit(compressed, bundle.train, config, teacher=evaluator.base_model, device=device,
                                 on_step=update).eval()
        else:
            compressed = fit(compressed, bundle.train, config, teacher=evaluator.base_model, device=device).eval()
    measured = evaluator.measure(compressed, chosen, latency=latency)
    if not isinstance(measured, Measurement):
        raise RuntimeError(f"the compressed model could not be measured: {measured.reason}")
    test_accuracy, _ = evaluate(compressed, bundle.test, device=device)
    compressed = compressed.cpu().eval()
    out_path = save_checkpoint(compressed, out, data=bundle.name, policy=chosen.to_json(),
                               val_accuracy=measured.accuracy, test_accuracy=test_accuracy, **bundle.preprocessing())
    onnx_path = None
    if onnx is not None:
        onnx_path = Path(onnx)
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        onnx_path.write_bytes(with_metadata(export_onnx(compressed, bundle.example_inputs()), bundle.preprocessing()))
    base = result.base if result is not None else None
    if base is None:  # no search recorded it: measure the unchanged model the same way
        base = evaluator.measure(evaluator.base_model, Policy(fingerprint=evaluator.space.fingerprint),
                                 latency=latency)
    return ApplySummary(out=Path(out_path), onnx=onnx_path, policy=chosen.summary(), measured=measured,
                        recorded=recorded, base=base if isinstance(base, Measurement) else None,
                        test_accuracy=test_accuracy, finetuned=finetune_steps > 0, inputs=bundle.preprocessing())


# ---- report ---------------------------------------------------------------------------------------------------------
def report(run: str | Path, *, trial: int | None = None, x: str | None = None) -> Path:
    """One HTML page about a run: settings, hardware, front, a trial's per-unit policy, accuracy by trial."""
    from squeezer.search.report import write_report

    result = _load_result(run)
    if trial is not None and not any(r["number"] == trial for r in result.completed()):
        raise LookupError(f"trial {trial} is not a finished trial of {str(run)!r}: pick one from "
                          f"`squeezer front {run}`")
    metric_x = X_METRICS.get(x or "", result.attrs.get("cost_metric", "macs"))
    return write_report(result, Path(run), metric_x=metric_x, trial=trial)


# ---- demo -----------------------------------------------------------------------------------------------------------
DEMO_BUDGET = "macs<=50%"
# Pruning and weight bits: the pair that pays off on a model this small (8x8 inputs). Every knob is one
# `--knobs` away in `squeezer search`; on 8x8 digits, 4-bit activations and depthwise swaps mostly cost accuracy.
DEMO_KNOBS = ("prune", "w_bits")
# Short but honest: every candidate is distilled from the base for 30 steps (a 50%-pruned ResNet-20 scores 0.68 on
# digits after BN recalibration alone, 0.97 after this); latency is timed as in every search (the meter's floor:
# 30 warm-up runs, then 3 repetitions of 200 runs interleaved with the reference).
DEMO_SETTINGS = {"finetune_steps": 30}


@dataclass
class DemoSummary:
    trained: TrainResult | None
    search: SearchSummary
    applied: ApplySummary | None


def demo(*, out: str | Path = "runs/demo", trials: int = 24, workers: int | None = None, sampler: str = "tpe",
         budget: str = DEMO_BUDGET, progress: bool = False, on_stage: Any = None) -> DemoSummary:
    """The whole story on bundled data in a few minutes: train ResNet-20 on digits (once), search pruning and
    weight bits under half the MACs, then apply the most accurate policy of the front and re-measure it."""
    out = Path(out)
    say = on_stage or (lambda text: None)
    checkpoint = out / "resnet20.pt"
    trained = None
    if not checkpoint.is_file():
        say("training ResNet-20 on the bundled digits")
        trained = train(model="resnet20", data="digits", out=checkpoint, progress=progress)
    say(f"searching {trials} policies under {budget}")
    summary = search(model=str(checkpoint), data="digits", budget=budget, out=out / "search", trials=trials,
                     sampler=sampler, workers=workers, recovery="kd", knobs=DEMO_KNOBS, repair=True,
                     progress=progress, settings=DEMO_SETTINGS)
    applied = None
    if summary.front:
        best = max(summary.front, key=lambda r: r["accuracy"])
        say(f"applying trial {best['number']}, the most accurate on the front")
        applied = apply(out / "search", trial=best["number"], out=out / "compressed.pt", onnx=out / "compressed.onnx")
    return DemoSummary(trained=trained, search=summary, applied=applied)
