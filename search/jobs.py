"""The user's jobs as functions: train, space, search, front, apply, report, demo.

The CLI and `import squeezer` both call these; they only wire the packages together (load model and data, build
the space, the evaluator pool and the study) and return data that the face renders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from squeezer.evaluators.baseline import TrainResult, resolve_model, train_baseline
from squeezer.evaluators.data import load_data
from squeezer.spaces.knobs import KNOBS, SpaceConfig
from squeezer.spaces.space import SearchSpace


def _progress_bar(total: int, label: str):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), transient=True)
    task = progress.add_task(label, total=total, loss=float("nan"))
    return progress, lambda step, loss: progress.update(task, completed=step, loss=loss)


def train(*, model: str = "resnet20", data: str = "digits", out: str | Path = "runs/resnet20.pt", steps: int = 600,
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
        bad = [k for k in knobs if k not in KNOBS]
        if bad:
            raise ValueError(f"unknown knob {bad[0]!r}: choose from {', '.join(KNOBS)}")
        options["knobs"] = tuple(knobs)
    if include:
        options["include"] = tuple(include)
    if exclude:
        options["exclude"] = tuple(exclude)
    return SearchSpace.from_model(net, bundle.example_inputs(), SpaceConfig(**options))


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA GPU is visible: use --device cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: use cpu or cuda")
