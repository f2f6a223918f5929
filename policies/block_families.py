"""The compact-block families, built from the convolution they replace and initialised in closed form.

Each block is linear, as the convolution it replaces is: the host model's own BatchNorm and activation still follow
it, and a nonlinearity inside would keep the block from reproducing the convolution at any capacity and rule out
the closed-form starts. Each start is the best the family allows from the weights alone:
- spatial k x 1 -> 1 x k: truncated SVD of the kernel unfolded as (cin*kh) x (cout*kw), exact at full rank;
- bottleneck 1x1 -> k x k -> 1x1: Tucker-2 (HOSVD) with one width on both sides;
- inverted residual: expand replicates each input channel `e` times, the depthwise kernels and the projection are
  the rank-e SVD of each input channel's (cout x kh*kw) kernel slice (dwsep is e = 1), exact once e >= kh*kw;
- Fire: squeeze onto the leading input-channel subspace of the kernel (Tucker-1), k x k expand the projected kernel
  of the second half of the outputs, 1x1 expand the projected centre tap of the first half;
- grouped 1x1 + shuffle: the dwsep start with the first grouped 1x1 the identity and the last one the block
  diagonal of the dwsep pointwise weights, in shuffled order (the data fit then re-solves it).
`heads` names the last convolution(s) of a block, which the applier re-solves by least squares on calibration data.
"""
from __future__ import annotations

import torch
from torch import nn

from squeezer.spaces.block_shapes import BOTTLENECK, FIRE, INVRES, SHUFFLE, SPATIAL, BlockChoice, widths

__all__ = ["ChannelShuffle", "FireExpand", "family_block", "heads"]


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: channel i*(C/g) + j moves to j*g + i (reshape, transpose, reshape)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (self.groups, -1)).transpose(1, 2).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class FireExpand(nn.Module):
    """Fire's expand: a 1x1 and a k x k convolution of the squeezed input, concatenated (1x1 outputs first)."""

    def __init__(self, e1: nn.Conv2d, e3: nn.Conv2d) -> None:
        super().__init__()
        self.e1, self.e3 = e1, e3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.e1(x), self.e3(x)], dim=1)


def family_block(conv: nn.Conv2d, choice: BlockChoice, round_to: int) -> nn.Sequential:
    """The block of `choice` replacing `conv` (same stride, padding, dilation, padding mode; its bias on the last
    layer), initialised in closed form from `conv`'s weights."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise TypeError(f"a {choice.family} swap needs an ungrouped Conv2d, got {conv!r}")
    w = conv.weight.detach().double()
    build = {INVRES: _invres, FIRE: _fire, SHUFFLE: _shuffle, SPATIAL: _spatial, BOTTLENECK: _bottleneck}
    width = widths(choice, conv.in_channels, conv.out_channels, round_to)
    with torch.no_grad():
        block = build[choice.family](conv, w, width)
    return block.to(conv.weight.device, conv.weight.dtype).eval()


def heads(block: nn.Module) -> list[tuple[nn.Conv2d, slice]]:
    """The block's last convolution(s) and the output channels each produces."""
    last = block[-1]
    if isinstance(last, FireExpand):
        c1 = last.e1.out_channels
        return [(last.e1, slice(0, c1)), (last.e3, slice(c1, c1 + last.e3.out_channels))]
    return [(last, slice(0, last.out_channels))]


# ---- builders ----------------------------------------------------------------------------------------------------
def _geometry(conv: nn.Conv2d, cin: int, cout: int, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """A conv with `conv`'s kernel, stride, padding, dilation and padding mode."""
    return nn.Conv2d(cin, cout, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups=groups,
                     bias=bias, padding_mode=conv.padding_mode)


def _pointwise(cin: int, cout: int, weight: torch.Tensor, groups: int = 1, bias: torch.Tensor | None = None,
               stride: tuple[int, int] | int = 1) -> nn.Conv2d:
    layer = nn.Conv2d(cin, cout, 1, stride, groups=groups, bias=bias is not None)
    layer.weight.copy_(weight.reshape(layer.weight.shape))
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


def _identity_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    bn.running_var.fill_(1.0 - bn.eps)  # with the default affine weights: exactly the identity in eval mode
    return bn


def _bias(conv: nn.Conv2d) -> torch.Tensor | None:
    return conv.bias.detach() if conv.bias is not None else None


def _leading(matrix: torch.Tensor, r: int) -> torch.Tensor:
    """The r leading left singular vectors of `matrix` (rows x anything), zero columns beyond its rank."""
    values, vectors = torch.linalg.eigh(matrix @ matrix.T)
    vectors = vectors.flip(1)[:, :r]
    if vectors.shape[1] < r:
        vectors = torch.cat([vectors, vectors.new_zeros(len(vectors), r - vectors.shape[1])], dim=1)
    return vectors


def _slice_svd(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input channel c, the rank-r SVD of its (cout x kh*kw) kernel slice: (kernels cin x r x k, mixing
    cin x cout x r), the singular values split evenly, zero beyond the slice's rank."""
    cout, cin, kh, kw = w.shape
    slices = w.permute(1, 0, 2, 3).reshape(cin, cout, kh * kw)
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)
    n = min(r, s.shape[1])
    root = s[:, :n].sqrt()
    kernels = w.new_zeros(cin, r, kh * kw)
    mixing = w.new_zeros(cin, cout, r)
    kernels[:, :n] = root[:, :, None] * vh[:, :n]
    mixing[:, :, :n] = u[:, :, :n] * root[:, None, :]
    return kernels, mixing


def _invres(conv: nn.Conv2d, w: torch.Tensor, mid: int) -> nn.Sequential:
    cout, cin, kh, kw = w.shape
    if mid % cin == 0:
        e = mid // cin
        expand = torch.eye(cin, dtype=w.dtype).repeat_interleave(e, dim=0)  # mid channel c*e + j copies input c
        kernels, mixing = _slice_svd(w, e)
    else:  # a narrowing expansion: the kernel's leading input directions, one depthwise kernel each
        basis = _leading(w.transpose(0, 1).reshape(cin, -1), mid)  # cin x mid
        expand = basis.T
        kernels, mixing = _slice_svd(torch.einsum("oikl,is->oskl", w, basis), 1)
    depthwise = _geometry(conv, mid, mid, groups=mid)
    depthwise.weight.copy_(kernels.reshape(mid, 1, kh, kw))
    project = mixing.permute(1, 0, 2).reshape(cout, mid)
    return nn.Sequential(_pointwise(cin, mid, expand), depthwise, _identity_bn(mid),
                         _pointwise(mid, cout, project, bias=_bias(conv)))


def _fire(conv: nn.Conv2d, w: torch.Tensor, squeeze: int) -> nn.Sequential:
    cout, cin, kh, kw = w.shape
    c1 = cout // 2
    basis = _leading(w.transpose(0, 1).reshape(cin, -1), squeeze)  # cin x squeeze
    projected = torch.einsum("oikl,is->oskl", w, basis)  # cout x squeeze x kh x kw
    e1 = _pointwise(squeeze, c1, projected[:c1, :, (kh - 1) // 2, (kw - 1) // 2], stride=conv.stride,
                    bias=_bias(conv)[:c1] if conv.bias is not None else None)
    e3 = _geometry(conv, squeeze, cout - c1, bias=conv.bias is not None)
    e3.weight.copy_(projected[c1:])
    if conv.bias is not None:
        e3.bias.copy_(conv.bias.detach()[c1:])
    return nn.Sequential(_pointwise(cin, squeeze, basis.T), FireExpand(e1, e3))


def _shuffle(conv: nn.Conv2d, w: torch.Tensor, groups: int) -> nn.Sequential:
    cout, cin, kh, kw = w.shape
    kernels, mixing = _slice_svd(w, 1)  # the dwsep start: cin x 1 x k, cin x cout x 1
    order = torch.arange(cin).reshape(groups, cin // groups).T.reshape(-1)  # shuffled position j holds order[j]
    depthwise = _geometry(conv, cin, cin, groups=cin)
    depthwise.weight.copy_(kernels[order].reshape(cin, 1, kh, kw))
    dense = mixing[order, :, 0].T  # cout x cin, in shuffled order
    per_out, per_in = cout // groups, cin // groups
    last = torch.stack([dense[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] for g in range(groups)])
    first = torch.eye(per_in, dtype=w.dtype).repeat(groups, 1)  # the identity, block by block
    return nn.Sequential(_pointwise(cin, cin, first, groups=groups), ChannelShuffle(groups), depthwise,
                         _identity_bn(cin), _pointwise(cin, cout, last, groups=groups, bias=_bias(conv)))


def _spatial(conv: nn.Conv2d, w: torch.Tensor, rank: int) -> nn.Sequential:
    cout, cin, kh, kw = w.shape
    matrix = w.permute(1, 2, 0, 3).reshape(cin * kh, cout * kw)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    n = min(rank, len(s))
    root = s[:n].sqrt()
    vertical_w = w.new_zeros(rank, cin, kh, 1)
    horizontal_w = w.new_zeros(cout, rank, 1, kw)
    vertical_w[:n] = (u[:, :n] * root).T.reshape(n, cin, kh, 1)
    horizontal_w[:, :n] = (root[:, None] * vh[:n]).reshape(n, cout, kw).permute(1, 0, 2)[:, :, None, :]
    pad, stride, dilation = conv.padding, conv.stride, conv.dilation
    split = isinstance(pad, str)  # "same"/"valid" apply per direction as they are
    vertical = nn.Conv2d(cin, rank, (kh, 1), (stride[0], 1), pad if split else (pad[0], 0), (dilation[0], 1),
                         bias=False, padding_mode=conv.padding_mode)
    horizontal = nn.Conv2d(rank, cout, (1, kw), (1, stride[1]), pad if split else (0, pad[1]), (1, dilation[1]),
                           bias=conv.bias is not None, padding_mode=conv.padding_mode)
    vertical.weight.copy_(vertical_w)
    horizontal.weight.copy_(horizontal_w)
    if conv.bias is not None:
        horizontal.bias.copy_(conv.bias.detach())
    return nn.Sequential(vertical, horizontal)


def _bottleneck(conv: nn.Conv2d, w: torch.Tensor, width: int) -> nn.Sequential:
    cout, cin, kh, kw = w.shape
    u_out = _leading(w.reshape(cout, -1), width)  # cout x width
    u_in = _leading(w.transpose(0, 1).reshape(cin, -1), width)  # cin x width
    core = torch.einsum("oikl,op,iq->pqkl", w, u_out, u_in)
    middle = _geometry(conv, width, width)
    middle.weight.copy_(core)
    return nn.Sequential(_pointwise(cin, width, u_in.T), middle, _pointwise(width, cout, u_out, bias=_bias(conv)))
