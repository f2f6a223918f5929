"""Low-rank decomposition: a layer becomes a short chain of thinner layers (SVD, Tucker-2 or CP).

Ranks and layer layout come from `spaces.lowrank_shapes`, the same arithmetic the space predicts costs with, so the
MACs of the built chain are exactly the predicted ones. A search applies many policies to the same weights, so each
weight tensor is decomposed once at full rank (cached by a hash of its bytes) and only truncated per rank.
"""
from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator

import tensorly as tl
import torch
from tensorly.decomposition import parafac
from torch import nn

from squeezer.policies.context import ApplyContext
from squeezer.policies.policy import Policy
from squeezer.spaces import lowrank_shapes as shapes
from squeezer.spaces.graph import LayerInfo
from squeezer.spaces.knobs import RANK

__all__ = ["apply_lowrank", "decompose", "clear_cache"]

CACHE_SIZE = 256  # weight tensors; a ResNet-50 has ~54 decomposable layers
_cache: OrderedDict[tuple, Any] = OrderedDict()

CP_ITERATIONS = 30  # ALS sweeps for the largest-rank CP; more barely lowers the error of a conv kernel
SINGLE_THREAD_NUMEL = 1 << 20  # CP of kernels up to this size runs on one thread (see _parafac_context)
CP_REFINE = 5  # ALS sweeps that re-fit a truncated CP (dropped components leave the rest slightly off)


def clear_cache() -> None:
    """Forget all cached decompositions (e.g. to time a cold apply)."""
    _cache.clear()


def apply_lowrank(model: nn.Module, policy: Policy, ctx: ApplyContext) -> nn.Module:
    """Replace every unit with rank < 1 by its factor layers (in place; returns the model)."""
    config = ctx.space.config
    for name, choice in policy.layers.items():
        if choice.rank >= 1.0 or name not in ctx.space.units:
            continue
        info = ctx.space.units[name].layer
        largest = max((r for r in ctx.space.choices(name, RANK) if r < 1.0), default=choice.rank)
        module = model.get_submodule(name)
        factored = decompose(module, info, choice.rank, config.round_to, config.decomposition, largest=largest)
        set_submodule(model, name, factored)
    return model


def decompose(module: nn.Module, info: LayerInfo, ratio: float, round_to: int, method: str = "tucker", *,
              largest: float | None = None) -> nn.Sequential:
    """The factor layers of `module` (its current, possibly pruned, shape) at rank `ratio`.

    `largest` is the largest rank ratio this layer may be asked for; CP decomposes once at that rank and truncates.
    """
    if isinstance(module, nn.Linear):
        return _svd_linear(module, ratio, round_to)
    if isinstance(module, nn.Embedding):
        return _svd_embedding(module, ratio, round_to)
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        raise TypeError(f"cannot decompose {type(module).__name__} (groups={getattr(module, 'groups', '-')}): "
                        "only Linear and ungrouped Conv2d layers have a rank knob")
    if shapes.is_svd(info):
        return _svd_conv1x1(module, ratio, round_to)
    if method == "cp":
        return _cp_conv(module, ratio, round_to, max(ratio, largest or ratio))
    return _tucker_conv(module, ratio, round_to)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` (setattr on its parent)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# ---- SVD: Linear and 1x1 convolutions ----------------------------------------------------------------------------
def _svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) with second @ first ≈ weight (out x in), the singular values split evenly between them."""
    u, s, vh = _cached(weight, "svd", lambda w: torch.linalg.svd(w.double(), full_matrices=False))
    root = s[:r].sqrt()
    first = (root[:, None] * vh[:r]).to(weight.dtype)
    second = (u[:, :r] * root[None, :]).to(weight.dtype)
    return first, second


def _svd_linear(layer: nn.Linear, ratio: float, round_to: int) -> nn.Sequential:
    w = layer.weight.detach()
    r = shapes.svd_rank(layer.in_features, layer.out_features, ratio, round_to)
    first, second = _svd_factors(w, r)
    a = nn.Linear(layer.in_features, r, bias=False)
    b = nn.Linear(r, layer.out_features, bias=layer.bias is not None)
    _load(a, first)
    _load(b, second, layer.bias)
    return nn.Sequential(a, b).to(w.device)


def _svd_embedding(table: nn.Embedding, ratio: float, round_to: int) -> nn.Sequential:
    """A narrower table looked up as before, then a Linear back to the embedding width (table = rows @ weight.T)."""
    w = table.weight.detach()
    r = shapes.svd_rank(table.embedding_dim, table.num_embeddings, ratio, round_to)
    first, second = _svd_factors(w.T, r)  # second @ first ~ table.T: (dim x r) @ (r x rows)
    rows = nn.Embedding(table.num_embeddings, r, padding_idx=table.padding_idx, max_norm=table.max_norm,
                        norm_type=table.norm_type, scale_grad_by_freq=table.scale_grad_by_freq, sparse=table.sparse)
    b = nn.Linear(r, table.embedding_dim, bias=False)
    _load(rows, first.T)
    _load(b, second)
    return nn.Sequential(rows, b).to(w.device)


def _svd_conv1x1(conv: nn.Conv2d, ratio: float, round_to: int) -> nn.Sequential:
    w = conv.weight.detach()
    cout, cin = w.shape[:2]
    r = shapes.svd_rank(cin, cout, ratio, round_to)
    first, second = _svd_factors(w.flatten(1), r)
    # The stride (and any padding: zeros stay zeros without a bias) belongs to the first factor, so both run at
    # output resolution, as lowrank_cost counts them.
    a = nn.Conv2d(cin, r, 1, conv.stride, conv.padding, bias=False, padding_mode=conv.padding_mode)
    b = nn.Conv2d(r, cout, 1, bias=conv.bias is not None)
    _load(a, first[:, :, None, None])
    _load(b, second[:, :, None, None], conv.bias)
    return nn.Sequential(a, b).to(w.device)


# ---- Tucker-2: k x k convolutions ----------------------------------------------------------------------------------
def _hosvd_factors(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors of the output- and input-channel unfoldings of a conv kernel, strongest first.

    Only the left vectors are needed, so they come from the small Gram matrix (eigh) instead of a full SVD of the
    wide unfolding, which is much slower on wide kernels.
    """
    def leading(mode: int) -> torch.Tensor:
        with tl.backend_context("pytorch"):
            unfolded = tl.unfold(w.double(), mode)
        values, vectors = torch.linalg.eigh(unfolded @ unfolded.T)
        return vectors.flip(1)  # eigh sorts ascending

    return leading(0), leading(1)


def _tucker_conv(conv: nn.Conv2d, ratio: float, round_to: int) -> nn.Sequential:
    w = conv.weight.detach()
    cout, cin = w.shape[:2]
    r_in, r_out = shapes.tucker_ranks(cin, cout, ratio, round_to)
    u_out, u_in = _cached(w, "hosvd", _hosvd_factors)
    u_out, u_in = _columns(u_out, r_out), _columns(u_in, r_in)
    with tl.backend_context("pytorch"):
        core = tl.tenalg.multi_mode_dot(w.double(), [u_out.T, u_in.T], modes=[0, 1])  # r_out x r_in x kh x kw
    # The input projection runs at input resolution; zero padding commutes with it (no bias), so the core keeps the
    # original stride, padding and dilation.
    a = nn.Conv2d(cin, r_in, 1, bias=False)
    core_conv = nn.Conv2d(r_in, r_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False,
                          padding_mode=conv.padding_mode)
    b = nn.Conv2d(r_out, cout, 1, bias=conv.bias is not None)
    _load(a, u_in.T[:, :, None, None].to(w.dtype))
    _load(core_conv, core.to(w.dtype))
    _load(b, u_out[:, :, None, None].to(w.dtype), conv.bias)
    return nn.Sequential(a, core_conv, b).to(w.device)


# ---- CP: k x k convolutions as 1x1 -> (kh x 1) depthwise -> (1 x kw) depthwise -> 1x1 ---------------------------
def _cp_full(w: torch.Tensor, rank: int) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    """CP of `w` at `rank`, components sorted by weight (strongest first) so any prefix is a lower-rank CP."""
    with _parafac_context(w.numel()):
        weights, factors = parafac(w.float(), rank, n_iter_max=CP_ITERATIONS, init="svd", normalize_factors=True,
                                   random_state=0, tol=1e-7)
    order = torch.argsort(weights, descending=True)
    return rank, weights[order], [f[:, order] for f in factors]


@contextmanager
def _parafac_context(numel: int) -> Iterator[None]:
    """PyTorch backend, a memory-lean MTTKRP and (for small kernels) one thread for tensorly's parafac, restored after.

    ALS on a small kernel is hundreds of tiny matmuls: on a busy machine threads wait on each other far longer than
    the matmuls take; kernels above SINGLE_THREAD_NUMEL keep every thread, their matmuls are big enough to share.

    tensorly's default MTTKRP materialises the Khatri-Rao product of the other factors: for the 3-long spatial
    modes of a 512-channel kernel that is a 786k x R matrix per ALS step (slow, and large). `_mttkrp` contracts the
    largest other mode first with one matmul instead. Registering it is tensorly's documented way to swap MTTKRP.
    """
    backend = tl.tenalg.current_backend()
    original = backend.unfolding_dot_khatri_rao
    backend.register_method("unfolding_dot_khatri_rao", _mttkrp)
    threads = torch.get_num_threads()
    if numel <= SINGLE_THREAD_NUMEL:
        torch.set_num_threads(1)
    try:
        with tl.backend_context("pytorch"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tensorly warns when a rank exceeds the kernel's spatial size: harmless
            yield
    finally:
        torch.set_num_threads(threads)
        backend.register_method("unfolding_dot_khatri_rao", original)


def _mttkrp(tensor: torch.Tensor, cp_tensor: tuple, mode: int) -> torch.Tensor:
    """unfold(tensor, mode) @ khatri_rao(other factors), without forming the Khatri-Rao product."""
    weights, factors = cp_tensor
    others = [i for i in range(tensor.ndim) if i != mode]
    first = max(others, key=lambda i: tensor.shape[i])
    t = torch.tensordot(tensor, factors[first], dims=([first], [0]))  # remaining modes in order, then rank
    axes = [i for i in range(tensor.ndim) if i != first]
    for i in others:
        if i == first:
            continue
        ax = axes.index(i)
        shape = [1] * t.ndim
        shape[ax], shape[-1] = factors[i].shape
        t = (t * factors[i].reshape(shape)).sum(ax)
        axes.pop(ax)
    return t * weights if weights is not None else t


def _cp_truncated(w: torch.Tensor, r: int, largest: int) -> list[torch.Tensor]:
    """Rank-r CP factors (output, input, vertical, horizontal); the weights are folded into the output factor.

    The full decomposition is cached per `largest` rank, so the factors of a rank never depend on what was applied
    before (a cache hit gives exactly what a cold apply computes).
    """
    largest = max(r, largest)
    cached = _cached(w, f"cp{largest}", lambda t: _cp_full(t, largest))
    weights, factors = cached[1][:r], [f[:, :r] for f in cached[2]]
    if r < largest:
        with _parafac_context(w.numel()):
            weights, factors = parafac(w.float(), r, n_iter_max=CP_REFINE, init=tl.cp_tensor.CPTensor(
                (weights, factors)), normalize_factors=True, tol=1e-7)
    out, inp, vert, horiz = factors
    return [out * weights[None, :], inp, vert, horiz]


def _cp_conv(conv: nn.Conv2d, ratio: float, round_to: int, largest_ratio: float) -> nn.Sequential:
    w = conv.weight.detach()
    cout, cin = w.shape[:2]
    r = shapes.cp_rank(cin, cout, ratio, round_to)
    largest = shapes.cp_rank(cin, cout, largest_ratio, round_to)
    out, inp, vert, horiz = _cp_truncated(w, r, max(r, largest))
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, _pair_padding(conv), conv.dilation
    a = nn.Conv2d(cin, r, 1, bias=False)
    v = nn.Conv2d(r, r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=r, bias=False, padding_mode=conv.padding_mode)
    h = nn.Conv2d(r, r, (1, kw), (1, sw), (0, pw), (1, dw), groups=r, bias=False, padding_mode=conv.padding_mode)
    b = nn.Conv2d(r, cout, 1, bias=conv.bias is not None)
    _load(a, inp.T[:, :, None, None].to(w.dtype))
    _load(v, vert.T[:, None, :, None].to(w.dtype))
    _load(h, horiz.T[:, None, None, :].to(w.dtype))
    _load(b, out[:, :, None, None].to(w.dtype), conv.bias)
    return nn.Sequential(a, v, h, b).to(w.device)


def _pair_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):  # "same" (stride 1) or "valid"
        if conv.padding == "valid":
            return 0, 0
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError("padding='same' with an even kernel pads asymmetrically: CP cannot split it")
        return total[0] // 2, total[1] // 2
    return tuple(conv.padding)  # type: ignore[return-value]


# ---- helpers -------------------------------------------------------------------------------------------------------
def _columns(u: torch.Tensor, r: int) -> torch.Tensor:
    """The first r columns, zero-padded when the tensor has fewer (a rank above the kernel's own rank)."""
    if u.shape[1] >= r:
        return u[:, :r]
    return torch.cat([u, u.new_zeros(u.shape[0], r - u.shape[1])], dim=1)


def _load(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(layer.weight.shape))
        if bias is not None:
            layer.bias.copy_(bias.detach())


def _key(weight: torch.Tensor, method: str) -> tuple:
    data = weight.detach().to("cpu", torch.float32).contiguous().numpy()
    return method, tuple(weight.shape), hashlib.blake2b(data.data, digest_size=16).hexdigest()


def _store(key: tuple, value: Any) -> None:
    _cache[key] = value
    _cache.move_to_end(key)
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)


def _cached(weight: torch.Tensor, method: str, compute: Any) -> Any:
    """`compute(weight)` through the LRU cache keyed by the weight's bytes and the method."""
    key = _key(weight, method)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    value = compute(weight.detach())
    _store(key, value)
    return value
