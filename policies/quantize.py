"""Quantization: weights on a w_bits grid per output channel, layer inputs on an a_bits grid per tensor.

Everything is fake quantization with torch's own ops, so the model still runs (and trains) in float while the
ONNX export carries int8 QuantizeLinear/DequantizeLinear pairs: the runtime sees the bit widths. Values on a b-bit
grid (b <= 8) are exactly representable in int8, so one QDQ form serves every width.

A layer whose weights *and* inputs are quantized also quantizes its output to 8 bits, with any BatchNorm right
after it folded in and a ReLU/ReLU6 right after it absorbed into the output range. That gives ONNX Runtime the
DQ -> Conv -> Q pattern it fuses into QLinearConv/QGemm (int8 kernels); without it the runtime dequantizes and runs
the float convolution, slower than no quantization at all (benchmarks/int8_latency.py).

8-bit weights need care. ONNX Runtime's uint8 x int8 kernels on AVX2 / AVX-512 CPUs without VNNI add pairs of
products in int16, which saturates for full-range int8 weights (255 * 127 * 2 > 2^15): logits move and some
predictions flip against the torch model. `WEIGHT8` picks the way
out. "reduce" (default, ORT's own `reduce_range`): int8 weights on a 7-bit grid (|q| <= 63), which cannot saturate,
so the fast kernels stay exact on every CPU. "uint8": the full 255-level grid as uint8 around zero point 128, exact
8 bits but run by uint8 x uint8 kernels, which are slower than fp32 where int8 weights are faster
(benchmarks/RESULTS.md). Widths up to 7 bits cannot saturate and are unaffected. (On tiny inputs even int8 weights
can be slower than fp32: the convolutions are too small to repay the Q/DQ around the float residual adds.)
"""
from __future__ import annotations

from collections import defaultdict
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from squeezer.policies.context import ApplyContext
from squeezer.policies.forward import run_hooked
from squeezer.policies.lowrank import set_submodule
from squeezer.policies.policy import Policy
from squeezer.spaces.knobs import FLOAT_BITS

__all__ = ["QuantizedLayer", "apply_quantize", "fold_batchnorm", "weight_scale", "weight_qmax", "activation_qparams"]

WEIGHT8 = "reduce"  # how 8-bit weights are stored: "reduce" (int8, 7-bit grid) or "uint8" (full grid); see above

OUTPUT_BITS = 8
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WRAPPED = (*_CONVS, nn.Linear)
SAMPLE_SIZE = 1 << 16  # activation values kept per layer to search a clipping range for widths below 8 bits
TIE_NUDGE = 2.0 ** -14  # relative widening of input scales; see QuantizedLayer.set_input_range
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(15))  # 1.0 .. 0.3 of the observed range


def weight_qmax(bits: int) -> int:
    """The largest integer weight magnitude at `bits`: 2^(bits-1) - 1, or 63 for reduced-range 8-bit weights."""
    if bits == 8 and WEIGHT8 == "reduce":
        return 63
    if WEIGHT8 not in ("reduce", "uint8"):
        raise ValueError(f"WEIGHT8 must be 'reduce' or 'uint8', got {WEIGHT8!r}")
    return 2 ** (bits - 1) - 1


def weight_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scale: the largest |w| of each channel maps to `weight_qmax(bits)`."""
    qmax = weight_qmax(bits)
    amax = weight.detach().flatten(1).abs().amax(1)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).float()


def activation_qparams(lo: float, hi: float, bits: int, widen: float = 0.0) -> tuple[float, int]:
    """(scale, zero point) of an asymmetric `bits`-wide grid covering [lo, hi] and 0 (so ReLU zeros stay exact).

    `widen` stretches the scale by that fraction (layer inputs use TIE_NUDGE, see `QuantizedLayer.set_input_range`).
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    levels = 2 ** bits - 1
    scale = (hi - lo) / levels * (1.0 + widen) if hi > lo else 1.0
    zero = int(min(levels, max(0, round(-lo / scale))))
    return float(scale), zero


class QuantizedLayer(nn.Module):
    """A Conv2d/Linear with weights on a `w_bits` grid and its input (optionally output) fake-quantized.

    The wrapped layer keeps its parameters (the weights already rounded to the grid), so parameter counts and
    MAC counts are those of the layer. `bn` is a BatchNorm folded into the layer (eval-mode statistics), as an
    int8 runtime would fold it.
    """

    def __init__(self, layer: nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear, w_bits: int, a_bits: int) -> None:
        super().__init__()
        if not isinstance(layer, _WRAPPED):
            raise TypeError(f"QuantizedLayer wraps Conv1d/2d/3d or Linear, got {type(layer).__name__}")
        self.layer = layer
        self.w_bits, self.a_bits = int(w_bits), int(a_bits)
        self.bn: nn.BatchNorm2d | None = None
        self.observing = False  # True while calibrating: no activation quantization
        self.quantize_output = False
        weight = layer.weight.detach()
        scale = weight_scale(weight, self.w_bits) if self.w_bits < FLOAT_BITS else torch.ones(weight.shape[0])
        if self.w_bits < FLOAT_BITS:
            qmax = weight_qmax(self.w_bits)
            view = scale.view(-1, *[1] * (weight.dim() - 1)).to(weight)
            with torch.no_grad():
                layer.weight.copy_(torch.clamp(torch.round(weight / view), -qmax, qmax) * view)
        self.register_buffer("w_scale", scale.to(weight.device))
        # Full-range 8-bit weights travel as uint8 around zero point 128 (the same grid as int8); see module docs.
        unsigned = self.w_bits == 8 and WEIGHT8 == "uint8"
        self.w_range = (0, 255) if unsigned else (-128, 127)
        zero = 128 if unsigned else 0
        self.register_buffer("w_zero", torch.full((weight.shape[0],), zero, dtype=torch.int32, device=weight.device))
        for prefix in ("in", "out"):
            self.register_buffer(f"{prefix}_scale", torch.tensor(1.0, device=weight.device))
            self.register_buffer(f"{prefix}_zero", torch.tensor(0, dtype=torch.int32, device=weight.device))
        self.register_buffer("in_lo", torch.tensor(float("-inf"), device=weight.device))
        self.register_buffer("in_hi", torch.tensor(float("inf"), device=weight.device))

    # ---- configuration --------------------------------------------------------------------------------------------
    def set_input_range(self, lo: float, hi: float) -> None:
        # Below 8 bits the scale is widened by TIE_NUDGE: the clipped range is then an exact rational multiple of the
        # grid the values already lie on (the previous layer's 8-bit output range times 0.4, say), which puts values
        # exactly halfway between two levels. torch's fake quantization multiplies by 1/scale where ONNX Runtime
        # divides, so such ties round apart, and most logits move by whole steps at low widths. At 8 bits
        # the range is the previous output range itself (no ties), and equal scales let ORT drop the Q/DQ pair.
        scale, zero = activation_qparams(lo, hi, self.a_bits, widen=TIE_NUDGE if self.a_bits < 8 else 0.0)
        self.in_scale.fill_(scale)
        self.in_zero.fill_(zero)
        self.in_lo.fill_((0 - zero) * scale)
        self.in_hi.fill_((2 ** self.a_bits - 1 - zero) * scale)

    def set_output_range(self, lo: float, hi: float) -> None:
        scale, zero = activation_qparams(lo, hi, OUTPUT_BITS)
        self.out_scale.fill_(scale)
        self.out_zero.fill_(zero)
        self.quantize_output = True

    # ---- forward --------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits < FLOAT_BITS and not self.observing:
            if self.a_bits < 8:  # 2^a_bits levels, carried by the uint8 QDQ pair the runtime understands
                x = torch.clamp(x, self.in_lo, self.in_hi)
            x = torch.fake_quantize_per_tensor_affine(x, self.in_scale, self.in_zero, 0, 255)
        weight, bias, scale = self._folded()
        if self.w_bits < FLOAT_BITS:
            weight = torch.fake_quantize_per_channel_affine(weight, scale, self.w_zero, 0, *self.w_range)
        if bias is not None and self.quantize_output and not self.observing:
            bias = self._int32_bias(bias, scale)
        if isinstance(self.layer, _CONVS):
            y = self.layer._conv_forward(x, weight, bias)
        else:
            y = F.linear(x, weight, bias)
        if self.quantize_output and not self.observing:
            y = torch.fake_quantize_per_tensor_affine(y, self.out_scale, self.out_zero, 0, 255)
        return y

    def _int32_bias(self, bias: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
        """The bias rounded to the int32 grid (input scale x weight scale) an int8 kernel adds it on.

        ONNX Runtime rounds a float bias so when it fuses QLinearConv/QGemm; at 4 bits that grid is coarse enough to
        move outputs across rounding boundaries, so the torch model rounds the same way (gradients pass straight).
        """
        step = self.in_scale * w_scale
        return bias + (torch.round(bias / step) * step - bias).detach()

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Weight, bias and weight scale with the BatchNorm folded in (a per-channel rescale keeps the grid)."""
        weight, bias = self.layer.weight, self.layer.bias
        if self.bn is None:
            return weight, bias, self.w_scale
        bn = self.bn
        k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        weight = weight * k.view(-1, *[1] * (weight.dim() - 1))
        bias = bn.bias - bn.running_mean * k + (bias * k if bias is not None else 0)
        scale = (self.w_scale * k.detach().abs()).clamp_min(torch.finfo(torch.float32).tiny)
        return weight, bias, scale

    def extra_repr(self) -> str:
        bn = ", bn folded" if self.bn is not None else ""
        out = ", int8 output" if self.quantize_output else ""
        return f"w_bits={self.w_bits}, a_bits={self.a_bits}{bn}{out}"


# ---- the applier --------------------------------------------------------------------------------------------------
def apply_quantize(model: nn.Module, policy: Policy, ctx: ApplyContext, *, int8_outputs: bool = True) -> nn.Module:
    """Wrap every Conv2d/Linear implementing a unit with w_bits or a_bits < 32 in a QuantizedLayer (in place).

    Activation ranges are calibrated on `ctx.calibration` (or the example input) after the weights are rounded,
    so they see the model as deployed. `int8_outputs` adds the output quantization that int8 runtimes need.
    """
    targets: dict[nn.Module, tuple[str, int, int]] = {}
    for name, choice in policy.layers.items():
        if name in ctx.space.units and (choice.w_bits < FLOAT_BITS or choice.a_bits < FLOAT_BITS):
            for path, layer in _implementing_layers(model, name):
                targets[layer] = (path, choice.w_bits, choice.a_bits)
    if not targets:
        return model
    int8 = {m for m, (_, w, a) in targets.items() if int8_outputs and w < FLOAT_BITS and a < FLOAT_BITS}
    follows = _successors(model, int8, ctx.example_inputs) if int8 else {}
    module_names = {m: n for n, m in model.named_modules()}
    wrappers: dict[QuantizedLayer, _Follow | None] = {}
    for layer, (path, w_bits, a_bits) in targets.items():
        wrapper = QuantizedLayer(layer, w_bits, a_bits)
        follow = follows.get(layer)
        if follow is not None and follow.bn is not None:
            wrapper.bn = follow.bn
            set_submodule(model, module_names[follow.bn], nn.Identity())
        set_submodule(model, path, wrapper)
        wrappers[wrapper] = follow if layer in int8 else None
    if any(w.a_bits < FLOAT_BITS for w in wrappers):
        _calibrate(model, wrappers, ctx.calibration or [ctx.example_inputs])
    return model


def fold_batchnorm(model: nn.Module, example_inputs: torch.Tensor) -> nn.Module:
    """A copy of `model` with each BatchNorm that alone follows a quantized layer folded into it, for export.

    Int8 layers fold theirs when applied; a weight-only or activation-only layer keeps its BatchNorm while the model
    is recovered (recalibration and fine-tuning update it), so it is folded only here. The folded weight lies on the
    same grid rescaled per channel, so the file stores one integer weight and one scale per channel and no
    BatchNorm, as the size metric counts it.
    """
    loose = {m for m in model.modules() if isinstance(m, QuantizedLayer) and m.bn is None}
    if not loose or not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return model
    follows = _successors(model, loose, example_inputs)
    if not any(f.bn is not None for f in follows.values()):
        return model
    memo: dict[int, Any] = {}
    copy = deepcopy(model, memo)
    names = {m: n for n, m in copy.named_modules()}
    for layer, follow in follows.items():
        if follow.bn is not None:
            bn = memo[id(follow.bn)]
            memo[id(layer)].bn = bn
            set_submodule(copy, names[bn], nn.Identity())
    return copy


def _implementing_layers(model: nn.Module, name: str) -> Iterator[tuple[str, nn.Module]]:
    """The layer at `name`, or the layers of the module that replaced it (rank or block swap), however nested (a Fire
    block's expand holds two)."""
    module = model.get_submodule(name)
    if isinstance(module, _WRAPPED):
        yield name, module
    elif isinstance(module, nn.Sequential):
        for path, sub in module.named_modules():
            if isinstance(sub, _WRAPPED):
                yield f"{name}.{path}", sub


@dataclass
class _Follow:
    """What consumes a layer's output: a BatchNorm to fold, then the clamp of a ReLU-like activation."""

    bn: nn.BatchNorm2d | None = None
    lo: float = float("-inf")
    hi: float = float("inf")


def _successors(model: nn.Module, layers: set[nn.Module], x: torch.Tensor) -> dict[nn.Module, _Follow]:
    """For each layer, the BatchNorm that alone consumes its output and the ReLU/ReLU6 that alone follows.

    Read off the autograd graph of one forward pass, so it works for any model without tracing its code.
    """
    out_node: dict[nn.Module, list] = defaultdict(list)
    in_node: dict[nn.Module, list] = defaultdict(list)

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            out_node[module].append(output.grad_fn)
            in_node[module].append(inputs[0].grad_fn if isinstance(inputs[0], torch.Tensor) else None)

    watched = [m for m in model.modules() if m in layers or isinstance(m, nn.BatchNorm2d)]
    handles = [m.register_forward_hook(hook) for m in watched]
    try:
        with torch.enable_grad():
            x = x.detach().clone()
            output = model.eval()(x.requires_grad_(True) if x.is_floating_point() else x)  # token ids carry no grad
    finally:
        for h in handles:
            h.remove()
    consumers: dict[Any, list] = defaultdict(list)
    stack = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
    seen = set(stack)
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            consumers[nxt].append(node)
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    bn_by_input = {in_node[m][0]: m for m in watched
                   if isinstance(m, nn.BatchNorm2d) and len(out_node[m]) == 1 and in_node[m][0] is not None}

    follows = {}
    for layer in layers:
        if len(out_node[layer]) != 1 or out_node[layer][0] is None:
            continue  # called more than once (shared) or not at all: leave as is
        node, follow = out_node[layer][0], _Follow()
        users = consumers[node]
        bn = bn_by_input.get(node)
        conv = isinstance(layer, nn.Conv2d) or isinstance(getattr(layer, "layer", None), nn.Conv2d)
        if conv and bn is not None and len(users) == 1 and users[0] is out_node[bn][0]:
            follow.bn, node = bn, out_node[bn][0]
            users = consumers[node]
        if len(users) == 1:
            follow.lo, follow.hi = _clamp_of(users[0])
        follows[layer] = follow
    return follows


def _clamp_of(node: Any) -> tuple[float, float]:
    """The output range an activation node clamps to (ReLU, ReLU6/Hardtanh), else unbounded."""
    kind = type(node).__name__
    if kind.startswith("ReluBackward"):
        return 0.0, float("inf")
    if kind.startswith("HardtanhBackward"):
        return float(node._saved_min_val), float(node._saved_max_val)
    return float("-inf"), float("inf")


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


# ---- calibration ----------------------------------------------------------------------------------------------------
class _Range:
    """Running min/max of a tensor stream, plus a strided sample to search a clipping range on."""

    def __init__(self) -> None:
        self.lo, self.hi = float("inf"), float("-inf")
        self.samples: list[torch.Tensor] = []
        self.kept = 0

    def update(self, t: torch.Tensor, sample: bool) -> None:
        t = t.detach()
        self.lo, self.hi = min(self.lo, float(t.min())), max(self.hi, float(t.max()))
        if sample and self.kept < SAMPLE_SIZE:
            flat = t.flatten()
            step = max(1, flat.numel() // 4096)
            part = flat[::step][: SAMPLE_SIZE - self.kept].float().cpu()
            self.samples.append(part)
            self.kept += part.numel()


def _calibrate(model: nn.Module, wrappers: dict[QuantizedLayer, _Follow | None], batches: list[torch.Tensor]) -> None:
    """Observe each wrapper's input (and output) range on the batches, then set its quantization grids."""
    inputs = {w: _Range() for w in wrappers}
    outputs = {w: _Range() for w, f in wrappers.items() if f is not None}

    def hook(module: QuantizedLayer, args: tuple, output: torch.Tensor) -> None:
        if module.a_bits < FLOAT_BITS:
            inputs[module].update(args[0], sample=module.a_bits < 8)
        if module in outputs:
            outputs[module].update(output, sample=False)

    for w in wrappers:
        w.observing = True
    try:
        run_hooked(model, [(w, hook) for w in wrappers], batches)
    finally:
        for w in wrappers:
            w.observing = False
    for w, rng in inputs.items():
        if w.a_bits < FLOAT_BITS and rng.hi >= rng.lo:
            w.set_input_range(*_clip_range(rng, w.a_bits))
    for w, rng in outputs.items():
        follow = wrappers[w]
        if rng.hi >= rng.lo:
            # An absorbed ReLU/ReLU6 clamps the range, so the int8 output already holds the activation's result.
            w.set_output_range(max(rng.lo, follow.lo), min(rng.hi, follow.hi))


def _clip_range(rng: _Range, bits: int) -> tuple[float, float]:
    """Min/max at 8 bits; below 8, the shrunk range with the least quantization error on the sample."""
    if bits >= 8 or not rng.samples:
        return rng.lo, rng.hi
    sample = torch.cat(rng.samples)
    best, best_err = (rng.lo, rng.hi), float("inf")
    for ratio in CLIP_RATIOS:
        lo, hi = rng.lo * ratio, rng.hi * ratio
        scale, zero = activation_qparams(lo, hi, bits)
        q = torch.clamp(torch.round(sample / scale) + zero, 0, 2 ** bits - 1)
        err = float(((q - zero) * scale - sample).pow(2).mean())
        if err < best_err:
            best, best_err = (lo, hi), err
    return best
