"""The compact-block families a k x k convolution can be swapped for: their names, widths, where they fit and what
they cost, shared by the knob registry (offer, cost), the space's prediction and the block applier.

A `block` choice is a string: "keep", "dwsep", or "<family>:<sub-choice>" ("invres:2", "fire:0.25", "shuffle:4",
"spatial:0.5", "bottleneck:0.25"), so a policy file names the family and its sub-choice in one value and files
written before the families existed ("keep"/"dwsep") read as they did. Widths derive from the channels the unit has
when the swap is applied (after pruning), with the same arithmetic here and in the applier, so what the space
predicts is what is built.
"""
from __future__ import annotations

from dataclasses import dataclass

from squeezer.spaces.graph import LayerInfo
from squeezer.spaces.lowrank_shapes import dwsep_cost, kept_channels

__all__ = ["KEEP", "DWSEP", "INVRES", "FIRE", "SHUFFLE", "SPATIAL", "BOTTLENECK", "FAMILIES", "BlockChoice",
           "parse_block", "block_value", "fits", "block_cost", "block_rows", "block_level", "widths", "DEFAULT_GRID"]

KEEP = "keep"
DWSEP = "dwsep"
INVRES = "invres"  # 1x1 expand -> depthwise k x k -> BN -> 1x1 project; sub-choice: expansion (whole, or < 1)
FIRE = "fire"  # 1x1 squeeze -> [1x1 expand | k x k expand] concatenated; sub-choice: squeeze width / output channels
SHUFFLE = "shuffle"  # grouped 1x1 -> shuffle -> depthwise k x k -> BN -> grouped 1x1; sub-choice: groups (int)
SPATIAL = "spatial"  # k x 1 -> 1 x k; sub-choice: middle width / min(cin, cout)
BOTTLENECK = "bottleneck"  # 1x1 reduce -> k x k -> 1x1 restore; sub-choice: width / min(cin, cout)
FAMILIES = (INVRES, FIRE, SHUFFLE, SPATIAL, BOTTLENECK)
_INT_FAMILIES = (INVRES, SHUFFLE)  # whole sub-choices (an expansion may also be a fraction: a narrowing one)

DEFAULT_GRID = (KEEP, DWSEP, "invres:1", "invres:2", "invres:4", "fire:0.125", "fire:0.25", "fire:0.5",
                "shuffle:2", "shuffle:4", "shuffle:8", "spatial:0.25", "spatial:0.5", "spatial:0.75",
                "bottleneck:0.25", "bottleneck:0.5", "bottleneck:0.75")


@dataclass(frozen=True)
class BlockChoice:
    family: str  # KEEP, DWSEP or one of FAMILIES
    sub: float = 0.0  # expansion, groups (whole numbers) or a width ratio


def parse_block(value: str) -> BlockChoice | None:
    """The family and sub-choice of a block value, or None when it names none (the policy check then refuses it)."""
    if value in (KEEP, DWSEP):
        return BlockChoice(value)
    family, sep, sub = str(value).partition(":")
    if not sep or family not in FAMILIES:
        return None
    try:
        number = float(sub)
    except ValueError:
        return None
    if family == INVRES and 0.0 < number < 1.0:
        return BlockChoice(family, number)
    if family in _INT_FAMILIES:
        if number != int(number) or number < 1:
            return None
    elif not 0.0 < number <= 1.0:
        return None
    return BlockChoice(family, number)


def block_value(family: str, sub: float = 0.0) -> str:
    """The canonical string of a choice (what the grid, policies and Optuna params hold)."""
    if family in (KEEP, DWSEP):
        return family
    return f"{family}:{int(sub)}" if family in _INT_FAMILIES and sub >= 1 else f"{family}:{sub:g}"


def _width(channels: int, ratio: float, round_to: int) -> int:
    return kept_channels(channels, 1.0 - ratio, round_to)


def widths(choice: BlockChoice, cin: int, cout: int, round_to: int) -> int:
    """The family's inner width at these channels: expanded, squeezed, factor or bottleneck channels (groups for
    the shuffle)."""
    if choice.family == INVRES:  # whole expansions copy each input channel; a fraction keeps that share of them
        return int(choice.sub) * cin if choice.sub >= 1 else _width(cin, choice.sub, round_to)
    if choice.family == FIRE:
        return _width(cout, choice.sub, round_to)
    if choice.family == SHUFFLE:
        return int(choice.sub)
    if choice.family in (SPATIAL, BOTTLENECK):
        return _width(min(cin, cout), choice.sub, round_to)
    raise ValueError(f"no width for block {choice.family!r}")


def fits(info: LayerInfo, choice: BlockChoice, round_to: int) -> bool:
    """Whether the family can reproduce the unit's shapes at every width pruning can leave it.

    Fire's 1x1 expand runs with the unit's stride and no padding, so it fits only where that gives the unit's own
    output size; the shuffle's groups must divide the channels at every pruned width (multiples of the pruning
    step); the spatial factorisation needs a kernel that is k x k in both directions.
    """
    if info.kind != "conv" or max(info.kernel) <= 1:
        return False
    if choice.family in (KEEP, DWSEP, INVRES, BOTTLENECK):
        return True
    if choice.family == FIRE:
        return info.out_channels >= 2 and all((i - 1) // s + 1 == o
                                              for i, s, o in zip(info.in_hw, info.stride, info.out_hw))
    if choice.family == SHUFFLE:
        g = int(choice.sub)
        return g > 1 and all(c % g == 0 and min(round_to, c) % g == 0 for c in (info.in_channels, info.out_channels))
    if choice.family == SPATIAL:
        return min(info.kernel) > 1
    return False


def block_cost(info: LayerInfo, cin: int, cout: int, value: str, round_to: int) -> tuple[int, int]:
    """(MACs per sample, params) of the unit swapped for `value` at these channels (BatchNorms are counted with the
    other params, as for dwsep)."""
    choice = parse_block(value)
    if choice is None or choice.family == KEEP:
        raise ValueError(f"no block cost for {value!r}")
    if choice.family == DWSEP:
        return dwsep_cost(info, cin, cout)
    kh, kw = info.kernel
    k = kh * kw
    out_pos, in_pos = info.positions, info.in_hw[0] * info.in_hw[1]
    bias = cout if info.has_bias else 0
    width = widths(choice, cin, cout, round_to)
    if choice.family == INVRES:
        macs = in_pos * cin * width + out_pos * width * k + out_pos * width * cout
        params = cin * width + width * k + width * cout
    elif choice.family == FIRE:
        c1 = cout // 2
        c3 = cout - c1
        macs = in_pos * cin * width + out_pos * width * c1 + out_pos * width * c3 * k
        params = cin * width + width * c1 + width * c3 * k
    elif choice.family == SHUFFLE:
        macs = in_pos * cin * cin // width + out_pos * cin * k + out_pos * cin * cout // width
        params = cin * cin // width + cin * k + cin * cout // width
    elif choice.family == SPATIAL:
        mid_pos = info.out_hw[0] * info.in_hw[1]  # the k x 1 conv strides and pads rows only
        macs = mid_pos * cin * width * kh + out_pos * width * cout * kw
        params = cin * width * kh + width * cout * kw
    else:  # BOTTLENECK
        macs = in_pos * cin * width + out_pos * width * width * k + out_pos * width * cout
        params = cin * width + width * width * k + width * cout
    return macs, params + bias


def block_rows(info: LayerInfo, cin: int, cout: int, value: str, round_to: int) -> tuple[int, ...]:
    """The output channels of each convolution of the block, in order: what its quantizers hold scales for."""
    choice = parse_block(value)
    if choice is None or choice.family == KEEP:
        raise ValueError(f"no block layers for {value!r}")
    if choice.family == DWSEP:
        return cin, cout
    width = widths(choice, cin, cout, round_to)
    if choice.family == FIRE:
        return width, cout // 2, cout - cout // 2
    if choice.family == SHUFFLE:
        return cin, cin, cout
    if choice.family == SPATIAL:
        return width, cout
    return width, width, cout  # INVRES (expanded width), BOTTLENECK


# A 64 -> 64 3x3 convolution at 8 x 8: the yardstick a choice's level is read on, so the level depends on the value
# alone (what the registry needs) and orders the families by how much of such a layer they remove.
_YARDSTICK = LayerInfo("yardstick", "conv", 64, 64, (3, 3), (1, 1), 1, (8, 8), (8, 8), 64, False, False)


def block_level(value: str) -> float:
    """0 for keep; otherwise the share of the yardstick layer's MACs the swap removes (1 for an unknown value)."""
    choice = parse_block(value)
    if choice is None:
        return 1.0
    if choice.family == KEEP:
        return 0.0
    dense = _YARDSTICK.positions * 64 * 64 * 9
    return max(0.0, 1.0 - block_cost(_YARDSTICK, 64, 64, value, 8)[0] / dense)
