"""MACs of PyTorch's fused attention kernels, priced as their explicit form is (spaces/attention.py).

A model that still holds nn.MultiheadAttention or nn.TransformerEncoderLayer (a base model, before any policy is
applied) runs them as one fused op: `_native_multi_head_attention`, `_transformer_encoder_layer_fwd`, or
`scaled_dot_product_attention` after `F.linear` projections. Neither fvcore nor a dispatch-level count knows these
ops, so the base model would be priced without its attention while its applied copies (rewritten as Linears and
matmuls) are priced with it. These prices are the Linears' and matmuls' of that explicit form, so the two agree.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

__all__ = ["sdpa_macs", "mha_macs", "encoder_layer_macs", "JIT_HANDLES", "DISPATCH_RULES"]


def sdpa_macs(q: Sequence[int], k: Sequence[int], v: Sequence[int]) -> int:
    """QK^T and AV of q (..., L, E), k (..., S, E) and v (..., S, Ev)."""
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def mha_macs(q: Sequence[int], k: Sequence[int], embed_dim: int) -> int:
    """q/k/v/out projections and the two matmuls of a packed attention on (batch, tokens, embed_dim) inputs."""
    batch, length, keys = q[0], q[1], k[1]
    return batch * embed_dim * embed_dim * (2 * length + 2 * keys) + 2 * batch * length * keys * embed_dim


def encoder_layer_macs(src: Sequence[int], embed_dim: int, ffn: int) -> int:
    """A fused encoder layer: its self-attention and its two feed-forward Linears."""
    return mha_macs(src, src, embed_dim) + 2 * src[0] * src[1] * embed_dim * ffn


def _jit_shape(value: Any) -> list[int]:
    return list(value.type().sizes())


def _jit_int(value: Any) -> int:
    return int(value.toIValue())


# fvcore handles: (inputs, outputs) of a traced node -> MACs; the arguments are the ops' schemas'.
JIT_HANDLES: dict[str, Callable[[list, list], int]] = {
    "aten::scaled_dot_product_attention": lambda i, o: sdpa_macs(*(_jit_shape(v) for v in i[:3])),
    "aten::_native_multi_head_attention": lambda i, o: mha_macs(_jit_shape(i[0]), _jit_shape(i[1]), _jit_int(i[3])),
    "aten::_transformer_encoder_layer_fwd": lambda i, o: encoder_layer_macs(_jit_shape(i[0]), _jit_int(i[1]),
                                                                            _jit_shape(i[14])[0]),
}


def _sdpa(args: tuple, out: Any) -> int:
    return sdpa_macs(*(list(t.shape) for t in args[:3]))


def _mha(args: tuple, out: Any) -> int:
    return mha_macs(list(args[0].shape), list(args[1].shape), int(args[3]))


def _encoder_layer(args: tuple, out: Any) -> int:
    return encoder_layer_macs(list(args[0].shape), int(args[1]), int(args[14].shape[0]))


_SDPA_KERNELS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_fused_attention_overrideable")

# The same ops as a forward pass reaches the dispatcher (scaled_dot_product_attention arrives as the kernel it
# picked; its math fallback arrives as bmm, which is counted already).
DISPATCH_RULES: dict[Any, Callable[[tuple, Any], int]] = {
    **{getattr(torch.ops.aten, name).default: _sdpa for name in _SDPA_KERNELS if hasattr(torch.ops.aten, name)},
    torch.ops.aten._native_multi_head_attention.default: _mha,
    torch.ops.aten._transformer_encoder_layer_fwd.default: _encoder_layer,
}
