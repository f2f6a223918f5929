"""Training loops: the baseline `squeezer train` and the short fine-tunes (optionally distilled) of recovery."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from squeezer.evaluators.data import Batches
from squeezer.evaluators.feature_match import FeatureMatch


@dataclass(frozen=True)
class FitConfig:
    """Steps, optimiser and distillation settings of one fit.

    kd_weight > 0 mixes Hinton distillation from a teacher into the loss: kd_weight * T^2 * KL(student/T,
    teacher/T) + (1 - kd_weight) * cross-entropy. hint_weight and at_weight add the teacher's intermediate features
    (`FeatureMatch` on `hint_layers`): + hint_weight * hint + at_weight * attention transfer. `unlabelled`: the
    labels are never read; the cross-entropy's targets are the teacher's top classes.
    """

    steps: int = 500
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    kd_weight: float = 0.0
    kd_temperature: float = 4.0
    seed: int = 0
    hint_weight: float = 0.0
    at_weight: float = 0.0
    hint_layers: tuple[str, ...] = ()
    unlabelled: bool = False


def fit(model: nn.Module, data: Batches, config: FitConfig = FitConfig(), *, teacher: nn.Module | None = None,
        device: str | torch.device = "cpu", on_step: Callable[[int, float], None] | None = None,
        on_terms: Callable[[int, Mapping[str, float]], None] | None = None) -> nn.Module:
    """SGD with a cosine schedule for `config.steps` steps over seeded shuffled epochs (augmented, where the split
    augments); returns the model. `on_terms` gets each step's loss terms by name (ce, and kd, hint, at where on)."""
    device = torch.device(device)
    features = config.hint_weight > 0 or config.at_weight > 0
    if teacher is None and (features or config.unlabelled):
        raise ValueError("feature matching and unlabelled fine-tuning need the unchanged model as teacher")
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    with contextlib.ExitStack() as stack:
        match = None
        if features:
            assert teacher is not None
            match = stack.enter_context(FeatureMatch(model, teacher, data.head(2).to(device),
                                                     layers=config.hint_layers))
        model.train()
        params = [*model.parameters(), *(match.parameters() if match is not None else ())]
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                              nesterov=True)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, config.steps))))
        step, epoch = 0, 0
        while step < config.steps:
            for x, y in data.batches(config.batch_size, shuffle=True, seed=config.seed + epoch):
                if step >= config.steps:
                    break
                loss, terms = _loss(model, teacher, match, x.to(device, non_blocking=True),
                                    None if config.unlabelled else y, config, device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if on_step is not None:
                    on_step(step, float(loss.detach()))
                if on_terms is not None:
                    on_terms(step, {k: float(v.detach()) for k, v in terms.items()})
            epoch += 1
    return model.eval()


def _loss(model: nn.Module, teacher: nn.Module | None, match: FeatureMatch | None, x: torch.Tensor,
          y: torch.Tensor | None, config: FitConfig, device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
    """One batch's loss and its terms; `y` None: the teacher's top classes are the targets (labels never read)."""
    logits = model(x)
    wants_teacher = teacher is not None and (config.kd_weight > 0 or match is not None or y is None)
    with torch.no_grad():
        taught = teacher(x) if wants_teacher else None  # type: ignore[misc]
    target = taught.argmax(1) if y is None else y.to(device, non_blocking=True)  # type: ignore[union-attr]
    terms = {"ce": F.cross_entropy(logits, target)}
    loss = terms["ce"]
    if taught is not None and config.kd_weight > 0:
        t = config.kd_temperature
        terms["kd"] = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(taught / t, dim=1), log_target=True,
                               reduction="batchmean") * t ** 2
        loss = config.kd_weight * terms["kd"] + (1 - config.kd_weight) * loss
    if match is not None:
        terms["hint"], terms["at"] = match.losses()
        loss = loss + config.hint_weight * terms["hint"] + config.at_weight * terms["at"]
    return loss, terms


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
