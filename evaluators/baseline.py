"""Resolving a (model, data) pair into a ready model, and training the baseline the demo compresses."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from squeezer.evaluators.accuracy import recalibrate_bn
from squeezer.evaluators.data import DataBundle, load_data
from squeezer.evaluators.train import FitConfig, evaluate, fit
from squeezer.evaluators.zoo import ModelError, is_checkpoint, load_checkpoint, load_model, save_checkpoint


def resolve_model(ref: str, data: DataBundle) -> nn.Module:
    """The model for `ref`, shaped for `data` (classes, input channels), checked to run on its inputs."""
    if is_checkpoint(ref) and ":" not in Path(ref).name:
        model, _ = load_checkpoint(ref)
    else:
        model = load_model(ref, num_classes=data.num_classes, in_channels=data.in_channels)
    model.eval()
    try:
        with torch.no_grad():
            out = model(data.example_inputs(2))
    except Exception as exc:
        raise ModelError(f"model {ref!r} does not accept {data.name} inputs of shape {tuple(data.input_shape)} "
                         f"({type(exc).__name__}): pass a model built for this data") from None
    if out.dim() != 2 or out.shape[1] != data.num_classes:
        raise ModelError(f"model {ref!r} outputs {tuple(out.shape)} but {data.name} has {data.num_classes} "
                         "classes: pass a model built for this data")
    return model


@dataclass(frozen=True)
class TrainResult:
    path: Path
    val_accuracy: float
    test_accuracy: float
    seconds: float


def train_baseline(model: str = "resnet20", data: str | DataBundle = "digits", *, out: str | Path,
                   steps: int = 300, lr: float = 0.05, seed: int = 0, device: str = "cpu",
                   on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train a model from scratch on `data` and save a checkpoint that every other job accepts."""
    bundle = data if isinstance(data, DataBundle) else load_data(data)
    torch.manual_seed(seed)
    net = load_model(model, num_classes=bundle.num_classes, in_channels=bundle.in_channels)
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
    arch = model if not is_checkpoint(model) else None
    path = save_checkpoint(net, out, arch=arch, num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                           data=bundle.name, val_accuracy=val, test_accuracy=test, steps=steps,
                           **bundle.preprocessing())
    return TrainResult(Path(path), val, test, seconds)
