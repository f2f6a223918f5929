"""Training a baseline from scratch: the checkpoint the demo compresses and any job accepts as --model."""
from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from squeezer.datasets import load_data
from squeezer.evaluators.accuracy import recalibrate_bn
from squeezer.evaluators.data import DataBundle, DataConfig
from squeezer.evaluators.finetune import FitConfig, evaluate, fit
from squeezer.devices import check_device
from squeezer.models import (ModelError, check_outputs, load_source, replaced_head, save_checkpoint,
                             weights_preprocessing)
from squeezer.progress import progress_bar


@dataclass(frozen=True)
class TrainResult:
    path: Path
    val_accuracy: float
    test_accuracy: float
    seconds: float


def train_baseline(model: str = "resnet20", data: str | DataBundle = "digits", *, out: str | Path,
                   steps: int = 300, lr: float = 0.05, seed: int = 0, device: str = "cpu",
                   weights: str | Path | None = None, trust_pickle: bool = False, replace_head: bool = False,
                   on_step: Callable[[int, float], None] | None = None,
                   data_config: DataConfig = DataConfig()) -> TrainResult:
    """Train a model on `data` (from scratch, or from `weights` or a checkpoint) and save a checkpoint that every
    other job accepts. `replace_head` first puts a fresh classifier sized for the data's classes in place of the
    model's own (a pretrained model fine-tuned on other classes)."""
    implied = weights_preprocessing(model, str(weights)) if weights is not None else None  # pretrained transforms
    bundle = data if isinstance(data, DataBundle) else load_data(data, config=data_config, implied=implied)
    bundle = bundle.for_device(device)
    torch.manual_seed(seed)
    net, recipe = load_source(model, num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                              weights=weights, trust_pickle=trust_pickle)
    if replace_head:
        if recipe is not None and "arch" not in recipe:  # its recipe (base and policy) cannot say so
            raise ModelError(f"--replace-head needs an architecture or its checkpoint, and {model!r} is a compressed "
                             "model: replace the head of the model it was compressed from, then search again")
        head = replaced_head(net, bundle.example_inputs(2), bundle.num_classes)
        if recipe is not None:
            recipe = {**recipe, "num_classes": bundle.num_classes, "head": head}
    check_outputs(net, bundle, name=model)
    start = time.perf_counter()
    fit(net, bundle.train, FitConfig(steps=steps, lr=lr, seed=seed), device=device, on_step=on_step)
    # BatchNorm statistics of the final weights ("precise BN"): running averages lag the weights, and with a small
    # momentum (torchvision's MobileNetV3: 0.01) a short training left them near their initial values and the model
    # scored at chance in eval mode.
    recalibrate_bn(net, bundle.train, batches=50, seed=seed, device=device)
    seconds = time.perf_counter() - start
    net.cpu()
    val, _ = evaluate(net, bundle.val)
    test, _ = evaluate(net, bundle.test)
    path = save_checkpoint(net, out, recipe=recipe, num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                           data=bundle.name, val_accuracy=val, test_accuracy=test, steps=steps,
                           **bundle.preprocessing())
    return TrainResult(Path(path), val, test, seconds)


def default_out(model: str) -> Path:
    """Where `train` saves a checkpoint when not told: runs/NAME.pt, NAME being the model reference's last part
    (a zoo or torchvision name, a builder's function, a file's stem), never the model file itself."""
    tail = re.split(r"[/\\:]", model.rstrip("/\\"))[-1]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(tail).stem if tail.endswith((".pt", ".pth")) else tail) or "model"
    out = Path("runs") / f"{name}.pt"
    if Path(model).is_file() and out.resolve() == Path(model).resolve():
        out = out.with_name(f"{name}-trained.pt")
    return out


def train(*, model: str = "resnet20", data: str = "digits", out: str | Path | None = None, steps: int = 300,
          lr: float = 0.05, seed: int = 0, device: str = "cpu", weights: str | Path | None = None,
          trust_pickle: bool = False, replace_head: bool = False, progress: bool = False,
          data_config: DataConfig = DataConfig()) -> TrainResult:
    """Train a baseline checkpoint (seconds on the bundled digits) that every other job accepts as --model, saved
    to `out` (default: `default_out(model)`, e.g. runs/resnet20.pt).

    The checkpoint is the architecture's name and a state_dict, so it loads without unpickling code; a model that
    came from a pickle (`trust_pickle`) names no architecture and is saved pickled, needing trust_pickle again."""
    check_device(device)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    out = default_out(model) if out is None else out
    run = functools.partial(train_baseline, model, data, out=out, steps=steps, lr=lr, seed=seed, device=device,
                            weights=weights, trust_pickle=trust_pickle, replace_head=replace_head,
                            data_config=data_config)
    if not progress:
        return run()
    bar, update = progress_bar(steps, f"training {model}")
    with bar:
        return run(on_step=update)
