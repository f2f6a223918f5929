"""ONNX export of a (possibly compressed) model, so the runtime we time is the runtime we ship.

Quantized layers leave as standard QDQ with integer weights (policies/onnx_pack.py), BatchNorm folded first, so the
file's size is the size the search reports.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from squeezer.policies.onnx_pack import pack_constants
from squeezer.policies.quantize import fold_batchnorm
from squeezer.spaces.attention import explicit_attention

OPSET = 17


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: str | Path | None = None) -> bytes:
    """Export with the TorchScript exporter (far quicker than the dynamo one for small CNNs) and a dynamic batch axis.

    Returns the serialized model; also writes it to `path` when given. nn.MultiheadAttention has no export of its
    fused kernel: a model that still holds one (an unapplied base) is exported in its explicit form, the same
    function in matmuls.
    """
    model = fold_batchnorm(explicit_attention(model).eval(), example_inputs)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example_inputs,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
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
