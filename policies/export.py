"""ONNX export of a (possibly compressed) model, so the runtime we time is the runtime we ship.

Quantized layers leave as standard QDQ with integer weights (policies/onnx_pack.py), BatchNorm folded first, so the
file's size is the size the search reports. An adaptive average pooling from a size the exporter refuses (not a
multiple of its output) leaves as the same averages written as two small matrix products (`FixedAdaptiveAvgPool`).
"""
from __future__ import annotations

import io
import math
import warnings
from copy import deepcopy
from pathlib import Path

import torch
from torch import nn

from squeezer.policies.lowrank import set_submodule
from squeezer.policies.onnx_pack import pack_constants
from squeezer.policies.quantize import fold_batchnorm
from squeezer.spaces.attention import explicit_attention
from squeezer.spaces.export_check import ADAPTIVE_AVG, uneven_adaptive_pools

OPSET = 17


class ExportError(ValueError):
    """A model the ONNX exporter refused; the message is one line naming the cause."""


class FixedAdaptiveAvgPool(nn.Module):
    """An adaptive average pooling at one input size, as a product with an averaging matrix per pooled dimension:
    output cell o of a dimension averages inputs floor(o*I/O) .. ceil((o+1)*I/O) - 1, PyTorch's own windows, so the
    result equals the pooling's wherever the exporter cannot take it."""

    def __init__(self, in_size: tuple[int, ...], out_size: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = len(in_size)
        for d, (i, o) in enumerate(zip(in_size, out_size)):
            weights = torch.zeros(o, i)
            for cell in range(o):
                start, end = (cell * i) // o, math.ceil((cell + 1) * i / o)
                weights[cell, start:end] = 1.0 / (end - start)
            self.register_buffer(f"avg{d}", weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for d in range(self.dims):
            axis = x.dim() - self.dims + d
            x = torch.matmul(getattr(self, f"avg{d}"), x.transpose(axis, -2)).transpose(axis, -2)
        return x


def exportable(model: nn.Module, example_inputs: torch.Tensor) -> nn.Module:
    """`model`, or a copy of it with each adaptive average pooling the exporter refuses at this input size written
    as `FixedAdaptiveAvgPool` (the same averages)."""
    uneven = [p for p in uneven_adaptive_pools(model, example_inputs)
              if isinstance(model.get_submodule(p.name), ADAPTIVE_AVG)]
    if not uneven:
        return model
    copy = deepcopy(model)
    for pool in uneven:
        set_submodule(copy, pool.name, FixedAdaptiveAvgPool(pool.in_size, pool.out_size).to(example_inputs.device))
    return copy


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: str | Path | None = None) -> bytes:
    """Export with the TorchScript exporter (far quicker than the dynamo one for small CNNs) and a dynamic batch axis.

    Returns the serialized model; also writes it to `path` when given. A refusal is an ExportError, in one line.
    nn.MultiheadAttention has no export of its fused kernel: a model that still holds one (an unapplied base) is
    exported in its explicit form, the same function in matmuls.
    """
    model = exportable(fold_batchnorm(explicit_attention(model).eval(), example_inputs), example_inputs)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example_inputs,), buffer, dynamo=False, opset_version=OPSET,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        except Exception as exc:  # the exporter's own error is many lines of its internals
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ExportError(f"the model cannot be exported to ONNX ({type(exc).__name__}: {first[:200]}): "
                              "rewrite or exclude the operation it names") from exc
    data = pack_constants(buffer.getvalue())
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data


def with_metadata(onnx_bytes: bytes, props: dict[str, object]) -> bytes:
    """The ONNX model with `props` in its metadata (values as JSON), e.g. how its inputs are preprocessed, so the
    file that is deployed carries what the deployer needs."""
    import json

    import onnx

    model = onnx.load_from_string(onnx_bytes)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    return model.SerializeToString()
