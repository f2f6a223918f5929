"""Attention as squeezer sees it: nn.MultiheadAttention rewritten as four Linears and two explicit matmuls.

PyTorch's attention keeps its q/k/v projections in one bare `in_proj_weight`, runs them (and its out projection)
through a fused kernel or `F.linear`, and insists on `num_heads * head_dim == embed_dim`. So its projections are
no layers a hook sees, its matmuls are priced by no counter, its heads cannot be removed, and the fused kernel has
no ONNX export. `HeadAttention` computes the same function from separate `q_proj`/`k_proj`/`v_proj`/`out_proj`
Linears (each then a unit every knob reaches) with `head_dim` kept apart from the embedding width, so whole heads
can be removed. `explicit_attention` makes the rewrite on a copy, weights copied exactly; the space checks that the
copy computes what the model did before it analyses it.

The attention itself is a unit of kind "attention": its MACs are the two matmuls (QK^T and AV), and its one knob
is `heads`, the share of heads removed, which also narrows the four projections.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from squeezer.spaces.graph import ChannelGroup, LayerInfo, SpaceError
from squeezer.spaces.lowrank_shapes import kept_channels

__all__ = ["HeadAttention", "explicit_attention", "checked_rewrite", "attention_layers", "with_attention",
           "protect_attention", "attention_macs", "kept_heads", "head_cuts", "ATTENTION", "PROJECTIONS"]

ATTENTION = "attention"  # the LayerInfo kind of an attention's matmuls
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class HeadAttention(nn.Module):
    """nn.MultiheadAttention's forward (same arguments, same outputs) over separate projection Linears.

    It keeps the attributes nn.TransformerEncoderLayer reads before choosing its fused path, with `in_proj_bias`
    None, so that layer takes its plain path and calls this module (a fused layer would skip it).
    """

    def __init__(self, *, embed_dim: int, num_heads: int, head_dim: int, kdim: int, vdim: int, bias: bool,
                 batch_first: bool, dropout: float) -> None:
        super().__init__()
        width = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim, self.vdim, self.batch_first, self.dropout = kdim, vdim, batch_first, dropout
        self._qkv_same_embed_dim = False
        self.q_proj = nn.Linear(embed_dim, width, bias=bias)
        self.k_proj = nn.Linear(kdim, width, bias=bias)
        self.v_proj = nn.Linear(vdim, width, bias=bias)
        self.out_proj = nn.Linear(width, embed_dim, bias=bias)
        self.register_parameter("in_proj_weight", None)
        self.register_parameter("in_proj_bias", None)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "HeadAttention":
        """The same attention with `mha`'s weights copied exactly."""
        new = cls(embed_dim=mha.embed_dim, num_heads=mha.num_heads, head_dim=mha.head_dim, kdim=mha.kdim,
                  vdim=mha.vdim, bias=mha.in_proj_bias is not None, batch_first=mha.batch_first,
                  dropout=mha.dropout)
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().split(e)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().split(e) if mha.in_proj_bias is not None else (None,) * 3
        with torch.no_grad():
            for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if new.out_proj.bias is not None:
                if mha.out_proj.bias is None:
                    new.out_proj.bias.zero_()
                else:
                    new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new.to(mha.out_proj.weight.device, mha.out_proj.weight.dtype)

    def _mask(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """A boolean mask (True: not attended) as an additive float mask, as nn.MultiheadAttention reads it."""
        if mask is None or mask.is_floating_point():
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")  # as nn.MultiheadAttention
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:  # (tokens, batch, features) -> (batch, tokens, features)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, length = query.shape[0], query.shape[1]
        q = self.q_proj(query).reshape(b, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).reshape(b, key.shape[1], -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).reshape(b, value.shape[1], -1, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        mask = self._mask(attn_mask, scores.dtype)
        if mask is not None:
            scores = scores + (mask.reshape(b, -1, *mask.shape[-2:]) if mask.dim() == 3 else mask)
        padding = self._mask(key_padding_mask, scores.dtype)
        if padding is not None:
            scores = scores + padding[:, None, None, :]
        weights = torch.softmax(scores, dim=-1)
        attended = F.dropout(weights, p=self.dropout) if self.training and self.dropout > 0 else weights
        out = self.out_proj(torch.matmul(attended, v).transpose(1, 2).flatten(2))
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights if batched else weights.squeeze(0)


def _convertible(mha: nn.MultiheadAttention) -> bool:
    """Bias on key/value and an added zero-attention row have no separate projection to put them in."""
    return mha.bias_k is None and mha.bias_v is None and not mha.add_zero_attn


def explicit_attention(model: nn.Module) -> nn.Module:
    """`model` itself when it holds no nn.MultiheadAttention to rewrite, else a deep copy with each rewritten as a
    HeadAttention (the model passed in is never changed: its state dict is what a user saves and reloads)."""
    if not any(isinstance(m, nn.MultiheadAttention) and _convertible(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention) and _convertible(child):
                setattr(parent, name, HeadAttention.from_mha(child))
        if isinstance(parent, nn.TransformerEncoder):
            parent.use_nested_tensor = False  # its nested-tensor path reads the fused in_proj weights
    return model


def _flat(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat(v)]
    return []


def checked_rewrite(model: nn.Module, example_inputs: torch.Tensor) -> nn.Module:
    """`explicit_attention(model)`, refused with a SpaceError unless it gives `model`'s outputs on the inputs."""
    rewritten = explicit_attention(model)
    if rewritten is model:
        return model
    with torch.no_grad():
        try:
            want, got = _flat(model.eval()(example_inputs)), _flat(rewritten.eval()(example_inputs))
        except Exception as exc:  # noqa: BLE001  (one line naming the cause, as every SpaceError)
            raise SpaceError(f"the model fails on inputs of shape {tuple(example_inputs.shape)} "
                             f"({type(exc).__name__}): pass inputs the model accepts") from None
    same = len(want) == len(got) and all(
        w.shape == g.shape and torch.allclose(w, g, rtol=1e-4, atol=1e-5 * max(1.0, float(w.abs().max())))
        for w, g in zip(want, got) if w.is_floating_point())
    if not same:
        raise SpaceError("rewriting nn.MultiheadAttention as separate projections changed the model's outputs: "
                         "exclude the attention's layers or report the model")
    return rewritten


@dataclass
class _Seen:
    queries: int
    keys: int


def attention_layers(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, LayerInfo]:
    """Each HeadAttention that a forward pass on `example_inputs` runs, as a unit of kind ATTENTION: in_channels
    is the width of q and k, out_channels that of v (heads x head_dim), positions the query tokens, and in_hw
    (key tokens, 1). A module called twice keeps its first call."""
    seen: dict[str, _Seen] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, HeadAttention):
            def hook(m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
                query = args[0] if args else kwargs["query"]
                key = args[1] if len(args) > 1 else kwargs["key"]
                axis = 1 if m.batch_first and query.dim() == 3 else 0
                seen.setdefault(name, _Seen(int(query.shape[axis]), int(key.shape[axis])))
            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    if not hooks:
        return {}
    try:
        with torch.no_grad():
            model.eval()(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, s in seen.items():
        module = model.get_submodule(name)
        width = module.num_heads * module.head_dim
        out[name] = LayerInfo(name, ATTENTION, width, width, (1, 1), (1, 1), module.num_heads, (s.keys, 1),
                              (s.queries, 1), s.queries, False, False)
    return out


def with_attention(layers: list[LayerInfo], attention: dict[str, LayerInfo]) -> list[LayerInfo]:
    """The traced layers with each attention unit placed just before its first projection that ran."""
    out, placed = [], set()
    for info in layers:
        owner = info.name.rpartition(".")[0]
        if owner in attention and owner not in placed:
            out.append(attention[owner])
            placed.add(owner)
        out.append(info)
    return out + [info for name, info in attention.items() if name not in placed]


def protect_attention(groups: list[ChannelGroup], layers: list[LayerInfo]) -> list[ChannelGroup]:
    """Channel groups that an attention's projections write or read, made unprunable: the q/k/v outputs are
    removed by whole heads (the heads knob), and the width the attention reads and writes back is the residual
    stream, stored also in class tokens, position embeddings and norms that no channel pruning reaches."""
    names = {info.name for info in layers if info.kind == ATTENTION}
    heads = {f"{a}.{p}" for a in names for p in PROJECTIONS[:3]}
    stream_in, stream_out = heads, {f"{a}.out_proj" for a in names}
    out = []
    for g in groups:
        if g.prunable and heads & set(g.producers):
            g = dataclasses.replace(g, prunable=False, note="attention heads: pruned whole by the heads knob")
        elif g.prunable and (stream_out & set(g.producers) or stream_in & set(g.consumers)):
            g = dataclasses.replace(g, prunable=False, note="the embedding width attention reads and writes: kept")
        out.append(g)
    return out


def attention_macs(info: LayerInfo, cin: int, cout: int) -> int:
    """MACs of QK^T (query tokens x key tokens x q/k width) and of AV (the same with the v width)."""
    return info.positions * info.in_hw[0] * (cin + cout)


def kept_heads(info: LayerInfo, ratio: float) -> int:
    """Heads left after removing `ratio` of them (rounded up, at least one)."""
    return kept_channels(info.groups, ratio, 1)


def head_cuts(info: LayerInfo, ratio: float) -> dict[str, tuple[int, int]]:
    """Unit -> (output, input) indices it loses when `ratio` of the attention's heads go: q, k and v lose their
    rows of the removed heads, out_proj its columns, the matmuls both widths."""
    head_dim = info.out_channels // info.groups
    gone = (info.groups - kept_heads(info, ratio)) * head_dim
    if not gone:
        return {}
    cuts = {f"{info.name}.{p}": (gone, 0) for p in PROJECTIONS[:3]}
    cuts[f"{info.name}.out_proj"] = (0, gone)
    cuts[info.name] = (gone, gone)
    return cuts
