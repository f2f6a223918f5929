"""What every applier may need besides the model and the policy, gathered in one small record."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from squeezer.spaces.space import SearchSpace


@dataclass
class ApplyContext:
    """Inputs shared by the appliers of one `apply_policy` call.

    `reference` is the untouched model (block distillation reproduces its activations); `calibration` is a few
    input batches (activation ranges, BN, distillation); `importance` ranks channels for pruning: "l1", "l2"
    (magnitude) or "bn" (BatchNorm scale); `distill_steps` adds Adam steps after the closed-form fit of each swapped
    block (0, the default: the fit alone, see policies/blocks.py). `memo` keeps what appliers derive from
    `reference` alone (the pruning's channel ranking): a caller applying many policies to one model passes the same
    dictionary each time, and must pass a new one for another model.
    """

    space: SearchSpace
    example_inputs: torch.Tensor
    reference: nn.Module
    calibration: list[torch.Tensor] = field(default_factory=list)
    importance: str = "l2"
    distill_steps: int = 0
    seed: int = 0
    memo: dict[str, Any] = field(default_factory=dict)
