"""Training loops: the baseline `squeezer train` and the short fine-tunes (optionally distilled) of recovery."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from squeezer.evaluators.data import Batches


@dataclass(frozen=True)
class FitConfig:
    """Steps, optimiser and distillation settings of one fit.

    kd_weight > 0 mixes Hinton distillation from a teacher into the loss: kd_weight * T^2 * KL(student/T,
    teacher/T) + (1 - kd_weight) * cross-entropy.
    """

    steps: int = 500
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    kd_weight: float = 0.0
    kd_temperature: float = 4.0
    seed: int = 0


def fit(model: nn.Module, data: Batches, config: FitConfig = FitConfig(), *, teacher: nn.Module | None = None,
        device: str | torch.device = "cpu", on_step: Callable[[int, float], None] | None = None) -> nn.Module:
    """SGD with a cosine schedule for `config.steps` steps over seeded shuffled epochs (augmented, where the split
    augments); returns the model."""
    device = torch.device(device)
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, config.steps))))
    step, epoch = 0, 0
    while step < config.steps:
        for x, y in data.batches(config.batch_size, shuffle=True, seed=config.seed + epoch):
            if step >= config.steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None and config.kd_weight > 0:
                with torch.no_grad():
                    soft = F.log_softmax(teacher(x) / config.kd_temperature, dim=1)
                kd = F.kl_div(F.log_softmax(logits / config.kd_temperature, dim=1), soft, log_target=True,
                              reduction="batchmean") * config.kd_temperature ** 2
                loss = config.kd_weight * kd + (1 - config.kd_weight) * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if on_step is not None:
                on_step(step, float(loss.detach()))
        epoch += 1
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, data: Batches, *, batch_size: int = 256,
             device: str | torch.device = "cpu") -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) of `model` on a split, in eval mode."""
    device = torch.device(device)
    model.to(device).eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in data.batches(batch_size, augment=False):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    return correct / max(1, n), loss / max(1, n)
