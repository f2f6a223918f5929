"""Training a baseline from scratch: the checkpoint the demo compresses and any job accepts as --model."""
from __future__ import annotations

import functools
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
from squeezer.models import load_source, save_checkpoint
from squeezer.progress import progress_bar


@dataclass(frozen=True)
class TrainResult:
    path: Path
    val_accuracy: float
    test_accuracy: float
    seconds: float


def train_baseline(model: str = "resnet20", data: str | DataBundle = "digits", *, out: str | Path,
                   steps: int = 300, lr: float = 0.05, seed: int = 0, device: str = "cpu",
                   weights: str | Path | None = None, trust_pickle: bool = False,
                   on_step: Callable[[int, float], None] | None = None,
                   data_config: DataConfig = DataConfig()) -> TrainResult:
    """Train a model on `data` (from scratch, or from `weights` or a checkpoint) and save a checkpoint that every
    other job accepts."""
    bundle = (data if isinstance(data, DataBundle) else load_data(data, config=data_config)).for_device(device)
    torch.manual_seed(seed)
    net, recipe = load_source(model, num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                              weights=weights, trust_pickle=trust_pickle)
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


def train(*, model: str = "resnet20", data: str = "digits", out: str | Path = "runs/resnet20.pt", steps: int = 300,
          lr: float = 0.05, seed: int = 0, device: str = "cpu", weights: str | Path | None = None,
          trust_pickle: bool = False, progress: bool = False, data_config: DataConfig = DataConfig()) -> TrainResult:
    """Train a baseline checkpoint (seconds on the bundled digits) that every other job accepts as --model.

    The checkpoint is the architecture's name and a state_dict, so it loads without unpickling code; a model that
    came from a pickle (`trust_pickle`) names no architecture and is saved pickled, needing trust_pickle again."""
    check_device(device)
    run = functools.partial(train_baseline, model, data, out=out, steps=steps, lr=lr, seed=seed, device=device,
                            weights=weights, trust_pickle=trust_pickle, data_config=data_config)
    if not progress:
        return run()
    bar, update = progress_bar(steps, f"training {model}")
    with bar:
        return run(on_step=update)
