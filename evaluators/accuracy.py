"""Recovering a compressed model's accuracy cheaply, then scoring it on the validation split.

Pruning or quantizing shifts every activation after the changed layer, so BatchNorm running statistics recorded on
the original model are wrong; re-estimating them (a few forward passes, no gradients) recovers most of the lost
accuracy at ~1% of a fine-tune's cost, which is why "bn" is the default. "finetune" and "kd" spend a few SGD steps
(plain, or distilled from the uncompressed model) for a closer estimate of what a full fine-tune would reach;
either may also match the uncompressed model's intermediate features (FitNets hints, attention transfer), and with
`unlabelled` neither reads a label: the uncompressed model labels the images.
All batches and seeds are fixed, so evaluating one policy twice gives identical numbers.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from squeezer.evaluators.data import Batches, DataBundle
from squeezer.evaluators.finetune import FitConfig, evaluate, fit
from squeezer.evaluators.settings import RecoveryConfig

__all__ = ["recalibrate_bn", "recover", "score"]


def _recalibratable(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorms that run as modules; those folded inside a quantized layer are constants of its weights."""
    folded: set[int] = set()
    for module in model.modules():
        bn = getattr(module, "bn", None)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and hasattr(module, "w_bits"):
            folded.add(id(bn))
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and id(m) not in folded]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Batches, *, batches: int = 20, batch_size: int = 64, seed: int = 0,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Reset BN running statistics and re-estimate them as a cumulative average over `batches` train batches.

    Only the BatchNorms are put in train mode (dropout and everything else stay in eval), and no gradient is taken.
    """
    bns = _recalibratable(model)
    if not bns:
        return model
    model.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch weighs the same
        bn.train()
    try:
        # the deterministic transform: statistics of augmented crops would not be those the model is scored on
        for x, _ in data.batches(batch_size, shuffle=True, seed=seed, limit=batches, augment=False):
            model(x.to(device))
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.eval()
    return model


def recover(model: nn.Module, config: RecoveryConfig, data: DataBundle, *, teacher: nn.Module | None = None,
            seed: int = 0, device: str | torch.device = "cpu", steps: int | None = None,
            on_step: Callable[[int, float], None] | None = None,
            on_terms: Callable[[int, Mapping[str, float]], None] | None = None) -> nn.Module:
    """Recover accuracy on the train split as `config` says (none, bn, finetune, kd); returns the model in eval
    mode. `teacher` is the unchanged model (kd, feature matching, unlabelled fine-tunes); `steps` replaces the
    config's fine-tune steps; `on_step` and `on_terms` are `fit`'s."""
    mode = config.mode
    model.to(device)
    if mode == "none":
        return model.eval()
    if mode == "bn":  # reads images only, never labels
        return recalibrate_bn(model, data.train, batches=config.bn_batches, batch_size=config.batch_size, seed=seed,
                              device=device)
    if config.uses_teacher and teacher is None:
        raise ValueError(f"recovery {mode!r} with these settings needs the uncompressed model as teacher")
    fit_config = FitConfig(steps=config.finetune_steps if steps is None else steps, batch_size=config.batch_size,
                           lr=config.finetune_lr, seed=seed, kd_weight=config.kd_weight if mode == "kd" else 0.0,
                           kd_temperature=config.kd_temperature, hint_weight=config.hint_weight,
                           at_weight=config.at_weight, hint_layers=config.hint_layers,
                           unlabelled=config.unlabelled)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fit(model, data.train, fit_config, teacher=teacher if config.uses_teacher else None, device=device,
                   on_step=on_step, on_terms=on_terms)


def score(model: nn.Module, data: DataBundle, *, batch_size: int = 256,
          device: str | torch.device = "cpu") -> tuple[float, float]:
    """(top-1, mean cross-entropy) on the validation split: the search never sees the test split."""
    return evaluate(model, data.val, batch_size=batch_size, device=device)
