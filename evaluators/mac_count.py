"""MACs counted in one plain forward pass with fvcore's formulas, trusted once they match fvcore's traced count.

fvcore counts by tracing the whole model with torch.jit, which costs as much as a good part of a cheap evaluation's
forward passes. Applying a policy changes the shapes a model's ops run on, and swaps units for
the convolutions and linears squeezer builds, but not which other ops the model runs. So `mac_counter` compares the
two counts once, on the base model; where they agree, each applied model is counted by `forward_macs`, which records
the shapes of every conv/linear/matmul a batch-1 forward runs and prices them as fvcore's handles do (much quicker).
Where they do not (an einsum, or attention fvcore does not count as this pass does), fvcore counts every model.
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from collections import Counter
from typing import Any, Callable, Collection

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from squeezer.evaluators.attention_macs import DISPATCH_RULES
from squeezer.evaluators.cost import count_macs
from squeezer.spaces.attention import explicit_attention

with warnings.catch_warnings():  # fvcore.nn scripts its focal loss at import: torch's deprecation note on every run
    warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)
    from fvcore.nn.jit_handles import conv_flop_count

__all__ = ["forward_macs", "mac_counter", "MacCount"]

MacCount = Callable[[nn.Module, torch.Tensor], "tuple[int, dict[str, int]]"]
log = logging.getLogger(__name__)
aten = torch.ops.aten


def _shape(t: Any) -> list[int]:
    return list(t.shape)


def _conv(args: tuple, out: torch.Tensor) -> int:
    x, w, transposed = args[0], args[1], bool(args[6])
    return int(conv_flop_count(_shape(x), _shape(w), _shape(out), transposed=transposed))


def _addmm(args: tuple, out: torch.Tensor) -> int:
    (batch, inner), outer = _shape(args[1]), _shape(args[2])[1]
    return batch * inner * outer


def _mm(args: tuple, out: torch.Tensor) -> int:
    return math.prod(_shape(args[0])) * _shape(args[1])[-1]


def _bmm(args: tuple, out: torch.Tensor) -> int:
    n, c, t = _shape(args[0])
    return n * c * t * _shape(args[1])[-1]


# fvcore's counted ops (cost._analysis) as a forward reaches the dispatcher: linear, matmul and einsum arrive as
# mm/addmm/bmm, priced as fvcore prices linear and matmul (an einsum fvcore prices by its best contraction path,
# which mac_counter's comparison catches); fused attention kernels as evaluators/attention_macs.py prices them.
RULES: dict[Any, Callable[[tuple, torch.Tensor], int]] = {
    aten.convolution.default: _conv, aten._convolution.default: _conv,
    aten.addmm.default: _addmm, aten.mm.default: _mm, aten.bmm.default: _bmm, **DISPATCH_RULES,
}


class _Recorder(TorchDispatchMode):
    """Prices each counted op as it runs and books it to every module on the call stack (fvcore's by_module)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.total = 0
        self.per_module: Counter[str] = Counter()

    def enter(self, name: str) -> None:  # a forward pre-hook: a called module is booked, with 0 MACs at least
        self.stack.append(name)
        self.per_module[name] += 0

    def leave(self) -> None:  # a forward hook: returning the popped name would replace the module's output
        self.stack.pop()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        rule = RULES.get(func)
        if rule is not None:
            macs = rule(args, out)
            self.total += macs
            for name in self.stack:
                self.per_module[name] += macs
        return out


def forward_macs(model: nn.Module, example_inputs: torch.Tensor,
                 names: Collection[str] | None = None) -> tuple[int, dict[str, int]]:
    """(total MACs per sample, MACs per module name) from one forward of one sample.

    `names`: the modules whose own MACs the caller needs (default: every module). Each watched module costs two
    Python hooks in the pass, which can double its time; the total is counted either way.
    """
    recorder = _Recorder()
    handles = []
    for name, module in model.named_modules():
        if names is not None and name not in names:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: recorder.enter(name)))
        handles.append(module.register_forward_hook(lambda m, a, o: recorder.leave()))
    x = example_inputs[:1]
    try:
        with torch.no_grad(), recorder:
            model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return recorder.total, dict(recorder.per_module)


def mac_counter(base: nn.Module, example_inputs: torch.Tensor, watch: Collection[str] | None = None) -> MacCount:
    """The counter to use for models applied from `base`: `forward_macs` if it matches fvcore there, else fvcore.

    `watch`: the only modules whose own MACs the caller reads (the space's units, for BOPs); the forward pass then
    hooks just those, and the total is still every op's.
    """
    # Compared in the form applied models take (spaces/attention.py): a fused encoder layer books its Linears'
    # MACs to the layer, where the explicit form books them to each Linear, as every applied model does.
    base = explicit_attention(base)
    traced = count_macs(base, example_inputs)
    try:
        forward = forward_macs(base, example_inputs)
    except Exception as exc:  # noqa: BLE001  (an op the dispatch mode cannot run through: fvcore it is)
        log.info("MACs are counted by fvcore's trace: a forward pass under the counter failed (%s)", exc)
        return count_macs
    # fvcore also books MACs to containers no forward calls (a ModuleList of layers), which no unit is: compared
    # are the modules the forward pass ran.
    if forward[0] == traced[0] and all(forward[1][name] == macs for name, macs in traced[1].items()
                                       if name in forward[1]):
        return forward_macs if watch is None else functools.partial(forward_macs, names=frozenset(watch))
    log.info("MACs are counted by fvcore's trace: a forward pass counts %d on the base model, fvcore %d",
             forward[0], traced[0])
    return count_macs
