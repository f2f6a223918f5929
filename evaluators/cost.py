"""Measured cost of an applied model: MACs counted by fvcore (or mac_count's pass that matches it), parameters and
bit-weighted size/BOPs.

`SearchSpace.predict` estimates the same numbers from shapes; measuring them on the model that was actually built
catches an applier that removed less (or more) than the space promised, so the search is scored on what exists.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable

import torch
from torch import nn

from squeezer.evaluators.attention_macs import JIT_HANDLES
from squeezer.policies.policy import Policy
from squeezer.policies.quantize import QuantizedLayer
from squeezer.spaces.knobs import FLOAT_BITS, quantizer_bits, storage_bits
from squeezer.spaces.space import SearchSpace

__all__ = ["measure_cost", "count_macs"]

MB = 1e6


def _analysis(model: nn.Module, example_inputs: torch.Tensor) -> Any:
    """An fvcore FlopCountAnalysis that counts only multiply-adds of conv/linear/matmul and of PyTorch's fused
    attention (one MAC = one "flop")."""
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn import jit_handles as h

    analysis = FlopCountAnalysis(model, (example_inputs[:1],))
    analysis.clear_op_handles()
    analysis.set_op_handle("aten::_convolution", h.conv_flop_jit, "aten::linear", h.linear_flop_jit,
                           "aten::addmm", h.addmm_flop_jit, "aten::matmul", h.matmul_flop_jit,
                           "aten::mm", h.matmul_flop_jit, "aten::bmm", h.bmm_flop_jit,
                           "aten::einsum", h.einsum_flop_jit, "aten::lstm", _recurrent_flop_jit,
                           "aten::gru", _recurrent_flop_jit, "aten::rnn_tanh", _recurrent_flop_jit,
                           "aten::rnn_relu", _recurrent_flop_jit, **JIT_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return analysis


def _recurrent_flop_jit(inputs: list, outputs: list) -> int:
    """MACs of a traced RNN/LSTM/GRU (fvcore counts none): each weight matrix once per step of every sequence, i.e.
    the positions of its input (all but the feature dimension) times the elements of its 2-d weights."""
    x = inputs[0].type().sizes()
    weights = [v.type().sizes() for v in inputs[2].node().inputs()]
    matrices = sum(w[0] * w[1] for w in weights if w is not None and len(w) == 2)
    return (math.prod(x) // x[-1]) * matrices if x else 0


def _quiet(fn: Any) -> Any:
    """Run fvcore with its warnings and log lines silenced (they name every add and pool it does not count)."""
    logger = logging.getLogger("fvcore")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    finally:
        logger.setLevel(level)


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, dict[str, int]]:
    """(total MACs per sample, MACs per module name) of `model` traced on one sample."""
    model = model.eval()

    def run() -> tuple[int, dict[str, int]]:
        analysis = _analysis(model, example_inputs)
        with torch.no_grad():
            return int(analysis.total()), {k: int(v) for k, v in analysis.by_module().items()}

    return _quiet(run)


def _unit_of(name: str, units: list[str]) -> str | None:
    """The unit a module belongs to: the longest unit name equal to or a parent of `name`."""
    best = None
    for unit in units:
        if (name == unit or name.startswith(unit + ".")) and (best is None or len(unit) > len(best)):
            best = unit
    return best


def measure_cost(model: nn.Module, example_inputs: torch.Tensor, policy: Policy, space: SearchSpace,
                 count: Callable[[nn.Module, torch.Tensor], tuple[int, dict[str, int]]] = count_macs) -> dict[str, Any]:
    """macs, params, bops and size_mb of an applied model, per sample.

    `count` is fvcore's traced count unless the caller holds a cheaper one that agrees with it (mac_count.mac_counter).

    A unit's MACs are everything traced under its module name (a decomposed unit is an nn.Sequential there, a
    quantized one a QuantizedLayer wrapping the original), weighted by its w_bits x a_bits for BOPs; MACs outside
    every unit count at 32 x 32. Size counts what the exported file stores: the weights of a unit's Conv/Linear at the
    bits its w_bits is stored in (the file's integer container, `storage_bits`), a bias at 32 bits, each quantized
    layer's scales and zero points (`quantizer_bits`, the same rule `SearchSpace.predict` prices), all else at 32.
    """
    example_inputs = example_inputs[:1].to(next(model.parameters()).device)
    total, per_module = count(model, example_inputs)
    units = list(space.units)
    bits = {u: (c.w_bits, c.a_bits) for u, c in policy.layers.items()}
    bops, in_units = 0.0, 0
    # A unit inside another (an attention's projections inside the attention) is booked under both names: the
    # outer unit's own MACs are what is left once its inner units' are taken out.
    nested = {u: _unit_of(u.rpartition(".")[0], units) for u in units}
    own = dict.fromkeys(units, 0)
    for unit in units:
        own[unit] += per_module.get(unit, 0)
        if nested[unit] is not None:
            own[nested[unit]] -= per_module.get(unit, 0)
    for unit in units:
        macs = own[unit]
        w, a = bits.get(unit, (FLOAT_BITS, FLOAT_BITS))
        bops += macs * w * a
        in_units += macs
    bops += max(0, total - in_units) * FLOAT_BITS * FLOAT_BITS

    seen: set[int] = set()
    size_bits = 0.0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):  # the layers quantization wraps
            unit = _unit_of(name, units)
            w_bits = bits.get(unit, (FLOAT_BITS, FLOAT_BITS))[0] if unit else FLOAT_BITS
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    size_bits += p.numel() * (storage_bits(w_bits) if p is module.weight else FLOAT_BITS)
        elif isinstance(module, QuantizedLayer):
            size_bits += quantizer_bits(out_channels=module.layer.weight.shape[0], w_bits=module.w_bits,
                                        a_bits=module.a_bits, int8_output=module.quantize_output)
    params = 0
    for p in model.parameters():
        params += p.numel()
        if id(p) not in seen:
            seen.add(id(p))
            size_bits += p.numel() * FLOAT_BITS
    return {"macs": total, "params": params, "bops": float(bops), "size_mb": size_bits / 8 / MB}

