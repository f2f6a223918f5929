"""Shapes and costs of a layer's forms (pruned, factorised, depthwise-separable), shared by the space (prediction),
the knob registry and the appliers.

Keeping the channel and rank arithmetic in one place guarantees that what the space predicts is what `apply_policy`
builds.
"""
from __future__ import annotations

from squeezer.spaces.graph import LayerInfo


def kept_channels(channels: int, ratio: float, round_to: int) -> int:
    """Channels left after pruning `ratio` of them, rounded up to `round_to` and never below one step."""
    keep = channels * (1.0 - ratio)
    step = min(round_to, channels)
    kept = int(-(-keep // step) * step)  # ceil to a multiple of step
    return max(step, min(channels, kept))


def dense_params(info: LayerInfo, cin: int, cout: int) -> int:
    """Parameters of the layer in its own form at the given channels."""
    if info.kind == "recurrent":
        gates, layers, directions = info.recurrent
        return _recurrent_weights(info, cin, cout) + (layers * directions * 2 * gates * cout if info.has_bias else 0)
    groups = cin if info.kind == "dwconv" else info.groups
    kh, kw = info.kernel
    return cout * (cin // groups) * kh * kw + (cout if info.has_bias else 0)


def dense_macs(info: LayerInfo, cin: int, cout: int) -> int:
    """MACs per sample of the layer in its own form at the given channels (an embedding only looks rows up; a
    transposed convolution runs its kernel once per input position)."""
    if info.kind == "embedding":
        return 0
    if info.kind == "recurrent":
        return info.positions * _recurrent_weights(info, cin, cout)
    groups = cin if info.kind == "dwconv" else info.groups
    kh, kw = info.kernel
    positions = _in_pos(info) if info.kind == "tconv" else info.positions
    return positions * cout * (cin // groups) * kh * kw


def _recurrent_weights(info: LayerInfo, cin: int, hidden: int) -> int:
    """Weights of a stacked (bi)directional RNN/LSTM/GRU, each used once per step: every layer after the first
    reads the previous one's hidden states of every direction."""
    gates, layers, directions = info.recurrent
    inputs = cin + (layers - 1) * directions * hidden
    return directions * gates * hidden * (inputs + layers * hidden)


def svd_rank(cin: int, cout: int, ratio: float, round_to: int) -> int:
    return kept_channels(min(cin, cout), 1.0 - ratio, round_to)


def tucker_ranks(cin: int, cout: int, ratio: float, round_to: int) -> tuple[int, int]:
    return kept_channels(cin, 1.0 - ratio, round_to), kept_channels(cout, 1.0 - ratio, round_to)


def cp_rank(cin: int, cout: int, ratio: float, round_to: int) -> int:
    return kept_channels(min(cin, cout), 1.0 - ratio, round_to)


def is_svd(info: LayerInfo) -> bool:
    """Linear layers and 1x1 convolutions factor as a plain matrix (SVD); k x k convolutions use Tucker-2 or CP."""
    return info.kind == "linear" or max(info.kernel) == 1


def _out_pos(info: LayerInfo) -> int:
    return info.positions


def _in_pos(info: LayerInfo) -> int:
    return info.in_hw[0] * info.in_hw[1]


def lowrank_cost(info: LayerInfo, cin: int, cout: int, ratio: float, round_to: int,
                 method: str) -> tuple[int, int]:
    """(MACs per sample, params) of the factorised layer."""
    bias = cout if info.has_bias else 0
    kh, kw = info.kernel
    out_pos = _out_pos(info)
    if is_svd(info):
        r = svd_rank(cin, cout, ratio, round_to)
        first = 0 if info.kind == "embedding" else out_pos * cin * r  # a narrower table is looked up, not multiplied
        return first + out_pos * r * cout, cin * r + r * cout + bias
    if method == "cp":
        r = cp_rank(cin, cout, ratio, round_to)
        mid_pos = info.out_hw[0] * info.in_hw[1]  # after the vertical (kh x 1) conv, before the horizontal one
        macs = _in_pos(info) * cin * r + mid_pos * r * kh + out_pos * r * kw + out_pos * r * cout
        return macs, cin * r + r * kh + r * kw + r * cout + bias
    r_in, r_out = tucker_ranks(cin, cout, ratio, round_to)
    macs = _in_pos(info) * cin * r_in + out_pos * r_in * r_out * kh * kw + out_pos * r_out * cout
    return macs, cin * r_in + r_in * r_out * kh * kw + r_out * cout + bias


def lowrank_rows(info: LayerInfo, cin: int, cout: int, ratio: float, round_to: int, method: str) -> tuple[int, ...]:
    """The output channels of each layer of the factorised form, in order: what its quantizers hold scales for."""
    if is_svd(info):
        return svd_rank(cin, cout, ratio, round_to), cout
    if method == "cp":
        r = cp_rank(cin, cout, ratio, round_to)
        return r, r, r, cout
    return (*tucker_ranks(cin, cout, ratio, round_to), cout)


def dwsep_cost(info: LayerInfo, cin: int, cout: int) -> tuple[int, int]:
    """Depthwise k x k then pointwise 1 x 1 (the BatchNorm between them is counted with the other params)."""
    kh, kw = info.kernel
    out_pos = _out_pos(info)
    bias = cout if info.has_bias else 0
    return out_pos * (cin * kh * kw + cin * cout), cin * kh * kw + cin * cout + bias
