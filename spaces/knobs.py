"""The knob registry: each knob's rules, declared once.

A knob is one independent decision about one unit. Its `Knob` entry in `KNOBS` is the only place that says what
the knob means, so the space, the policy, its JSON and Optuna params, repair, the uniform baselines, the DDPG agent,
the latency table and the plots read the entry instead of naming knobs, and can never disagree on what a legal or
a more aggressive choice is.

How to add a knob:
1. Add a `Knob(...)` to `KNOBS` below: its name, neutral value (what an absent knob means), default grid, value type
   (what a policy file and an Optuna param hold: the choice itself), and `level` (0 at neutral, larger is more
   aggressive), which orders its choices for repair, the uniform baselines and the DDPG agent.
2. In the same entry: which units get it (`applies`, `offer`), its `role` (CHANNELS, FORM or BITS: how the latency
   table times it, which DDPG action moves it), the budget metrics it `lowers`, the knobs it `excludes` on the same
   unit and, for a FORM knob, `cost`: the (MACs, params) of a layer in its form, and `rows`: the output channels of
   each layer it builds (what the size counts quantizer scales for; without it, the form is one layer).
3. Write its applier in policies/: `(model, policy, ctx) -> model`, reading `choice.<name>` of each unit.
4. Register the applier under the knob's name in `APPLIERS` (policies/apply.py), before the appliers that must see
   its result (quantize runs last).
5. Run tests/test_knobs.py: every knob needs an applier and a consistent entry.
Nothing else changes. Only a knob that changes cost other than by reshaping a layer (channels, as pruning does; bit
widths) also needs SearchSpace.predict and evaluators/cost.py taught.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping

from squeezer.spaces import block_shapes as blocks
from squeezer.spaces import lowrank_shapes as shapes
from squeezer.spaces.attention import ATTENTION, kept_heads
from squeezer.spaces.graph import ChannelGroup, LayerInfo
from squeezer.spaces.lowrank_shapes import kept_channels

__all__ = ["Knob", "KNOBS", "Site", "SpaceConfig", "param_key", "split_key", "settle", "settle_params",
           "kept_channels", "PRUNE", "HEADS", "W_BITS", "A_BITS", "RANK", "BLOCK", "FLOAT_BITS", "KEEP", "DWSEP",
           "CHANNELS", "FORM", "BITS", "storage_bits", "quantizer_bits", "CHANNEL_ROUND"]

PRUNE = "prune"
HEADS = "heads"
W_BITS = "w_bits"
A_BITS = "a_bits"
RANK = "rank"
BLOCK = "block"

FLOAT_BITS = 32
STORAGE_BITS = (4, 8)  # the integer widths an ONNX file stores weights in (INT4, INT8); see policies/onnx_pack.py
SCALE_BITS = FLOAT_BITS  # a quantizer's scale, stored as float32
ZERO_POINT_BITS = 8  # a quantizer's zero point, stored as int8 (weights) or uint8 (activations)
KEEP = blocks.KEEP
DWSEP = blocks.DWSEP

# Roles: what a knob changes, which is how the latency table times it (evaluators/latency.py) and which action of
# the DDPG agent moves it (structure or bit widths).
CHANNELS = "channels"  # the channels of a whole group (timed alone)
FORM = "form"  # the layer's own structure (timed alone; bit widths are timed on it)
BITS = "bits"  # numeric precision (timed in its int8 form, on the unit's form)

CHANNEL_ROUND = 8  # kept channels are rounded up to a multiple of this unless a space says otherwise

_EVERY_METRIC = frozenset({"macs", "params", "size", "bops", "latency"})


@dataclass(frozen=True)
class SpaceConfig:
    """How a space is restricted: which knobs, which layers, which choices.

    `knobs` limits the knobs offered (every registered knob by default); `include`/`exclude` are fnmatch patterns on
    unit names; `choices` overrides a knob's grid; `round_to` rounds kept channels (and ranks, block widths) up to a
    multiple (CHANNEL_ROUND by default: odd widths ran no faster here; a smaller step gives a narrow layer more widths
    to choose from and lets aggressive budgets be reached); `decomposition` picks Tucker-2 ("tucker") or CP ("cp")
    for k×k convolutions.
    """

    knobs: tuple[str, ...] = field(default_factory=lambda: tuple(KNOBS))
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    choices: dict[str, tuple] = field(default_factory=dict)
    round_to: int = CHANNEL_ROUND
    decomposition: str = "tucker"

    def grid(self, knob: str) -> tuple:
        return tuple(self.choices.get(knob, KNOBS[knob].grid))

    def __post_init__(self) -> None:
        unknown = [k for k in self.knobs if k not in KNOBS] + [k for k in self.choices if k not in KNOBS]
        if unknown:
            raise ValueError(f"unknown knob {unknown[0]!r}: choose from {', '.join(KNOBS)}")
        if self.decomposition not in ("tucker", "cp"):
            raise ValueError(f"unknown decomposition {self.decomposition!r}: choose 'tucker' or 'cp'")
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")


@dataclass(frozen=True)
class Site:
    """What a knob sees of a unit when the space decides whether, and with which choices, to offer it."""

    layer: LayerInfo
    out_group: ChannelGroup | None  # the channel group the unit's output channels belong to
    config: SpaceConfig


def _everywhere(site: Site) -> bool:
    return True


def _whole_grid(site: Site, grid: tuple) -> tuple:
    return grid


@dataclass(frozen=True)
class Knob:
    """Everything Squeezer knows about one knob; `choices` is what a unit is offered."""

    name: str
    neutral: Any  # the value that leaves a unit as it is: what an absent knob means
    grid: tuple  # the default choices, before `offer` fits them to a unit
    value_type: type  # float, int or str: what a policy file holds (an int is read as a float for a float knob)
    level: Callable[[Any], float]  # how compressed a value is: 0 at neutral, larger is more aggressive
    applies: Callable[[Site], bool] = _everywhere  # which units get the knob
    offer: Callable[[Site, tuple], tuple] = _whole_grid  # the grid values a unit keeps
    role: str = FORM  # CHANNELS, FORM or BITS
    lowers: frozenset[str] = _EVERY_METRIC  # the budget metrics compressing it can lower
    excludes: tuple[str, ...] = ()  # knobs of the same unit it sends back to neutral when set (the swap wins)
    cost: Callable[[LayerInfo, int, int, Any, SpaceConfig], tuple[int, int]] | None = None  # FORM: (MACs, params)
    # FORM: the output channels of each layer the form builds (the quantizers the size counts); None: one layer
    rows: Callable[[LayerInfo, int, int, Any, SpaceConfig], tuple[int, ...]] | None = None

    def choices(self, site: Site, grid: tuple) -> tuple:
        """The unit's choices, neutral first then mild to aggressive (the order every searcher walks)."""
        if not self.applies(site):
            return ()
        return tuple(sorted(dict.fromkeys((self.neutral, *self.offer(site, grid))), key=self.level))

    def accepts(self, value: Any) -> bool:
        """Whether a policy file's `value` has this knob's type (a bool is never a number here)."""
        types = (int, float) if self.value_type is float else (self.value_type,)
        return isinstance(value, types) and not isinstance(value, bool)


# ---- the built-in knobs' rules ---------------------------------------------------------------------------------------
def _leads_its_group(site: Site) -> bool:
    """Only a prunable group's leader carries the prune knob; the group's other producers follow it."""
    group = site.out_group
    return group is not None and group.prunable and group.name == site.layer.name


def _distinct_widths(site: Site, grid: tuple) -> tuple:
    """Ratios that keep distinct channel counts once rounded, the smallest ratio of each: the rest repeat it."""
    assert site.out_group is not None
    seen, options = set(), []
    for ratio in sorted(set(grid) | {0.0}):
        kept = kept_channels(site.out_group.channels, ratio, site.config.round_to)
        if kept not in seen:
            seen.add(kept)
            options.append(float(ratio))
    return tuple(options)


def _is_attention(site: Site) -> bool:
    return site.layer.kind == ATTENTION


def _distinct_heads(site: Site, grid: tuple) -> tuple:
    """Ratios that keep distinct head counts, the smallest ratio of each (at least one head stays)."""
    seen, options = set(), []
    for ratio in sorted(set(grid) | {0.0}):
        kept = kept_heads(site.layer, ratio)
        if kept not in seen:
            seen.add(kept)
            options.append(float(ratio))
    return tuple(options)


def _factorable(site: Site) -> bool:
    return site.layer.kind in ("linear", "embedding") or (site.layer.kind == "conv" and site.layer.spatial_dims == 2)


def _rank_cost(info: LayerInfo, cin: int, cout: int, ratio: float, config: SpaceConfig) -> tuple[int, int]:
    return shapes.lowrank_cost(info, cin, cout, ratio, config.round_to, config.decomposition)


def _rank_rows(info: LayerInfo, cin: int, cout: int, ratio: float, config: SpaceConfig) -> tuple[int, ...]:
    return shapes.lowrank_rows(info, cin, cout, ratio, config.round_to, config.decomposition)


def _smaller_ranks(site: Site, grid: tuple) -> tuple:
    """Ratios whose factor layers hold fewer parameters than the layer: a larger rank would grow it."""
    info = site.layer
    full = shapes.dense_params(info, info.in_channels, info.out_channels)
    return tuple(r for r in grid if r < 1.0 and _rank_cost(info, info.in_channels, info.out_channels, r,
                                                           site.config)[1] < full)


def _spatial_conv(site: Site) -> bool:
    return site.layer.kind == "conv" and site.layer.spatial_dims == 2 and max(site.layer.kernel) > 1


def _quantizable(site: Site) -> bool:
    """Layers the quantizer wraps: convolutions (not transposed) and Linear layers (not an attention's matmuls,
    which multiply activations only)."""
    return site.layer.kind in ("conv", "dwconv", "gconv", "linear")


def _block_cost(info: LayerInfo, cin: int, cout: int, block: str, config: SpaceConfig) -> tuple[int, int]:
    return blocks.block_cost(info, cin, cout, block, config.round_to)


def _block_rows(info: LayerInfo, cin: int, cout: int, block: str, config: SpaceConfig) -> tuple[int, ...]:
    return blocks.block_rows(info, cin, cout, block, config.round_to)


def _smaller_blocks(site: Site, grid: tuple) -> tuple:
    """Block choices that reproduce the unit's shapes and cost fewer MACs than it, the first of each shape: a swap
    that grows the layer compresses nothing, and two values that build the same block are one choice. dwsep is
    offered wherever it fits, as before the families existed."""
    info, config = site.layer, site.config
    dense = info.positions * info.in_channels * info.out_channels * info.kernel[0] * info.kernel[1]
    seen, options = set(), []
    for value in grid:
        choice = blocks.parse_block(value)
        if choice is None or choice.family == KEEP or not blocks.fits(info, choice, config.round_to):
            continue
        cost = _block_cost(info, info.in_channels, info.out_channels, value, config)
        if choice.family != DWSEP and cost[0] >= dense:
            continue
        if (choice.family, cost) not in seen:
            seen.add((choice.family, cost))
            options.append(value)
    return tuple(options)


def storage_bits(w_bits: int) -> int:
    """The bits a weight of `w_bits` takes in the exported file: ONNX has no 2-, 3-, 5-, 6- or 7-bit tensors, so
    those are stored in the next integer container, and the size metric counts what is stored, not the grid."""
    return next((b for b in STORAGE_BITS if w_bits <= b), FLOAT_BITS)


def quantizer_bits(*, out_channels: int, w_bits: int, a_bits: int, int8_output: bool | None = None) -> int:
    """The bits a quantized Conv/Linear stores beside its weights in the exported QDQ file, so the size metric counts
    what the file holds: a scale and a zero point per output channel of an integer weight, and for each activation
    quantizer (its input; its int8 output, which `int8_output` says and by default is there when weights and input
    are both quantized) a scale and a zero point, plus the clip range (two floats) of an input below 8 bits.
    A float bias stays float: the caller counts it at FLOAT_BITS, not at the weight's width."""
    bits = 0
    if w_bits < FLOAT_BITS:
        bits += out_channels * (SCALE_BITS + ZERO_POINT_BITS)
    if a_bits < FLOAT_BITS:
        bits += SCALE_BITS + ZERO_POINT_BITS + (2 * FLOAT_BITS if a_bits < 8 else 0)
    if int8_output if int8_output is not None else (w_bits < FLOAT_BITS and a_bits < FLOAT_BITS):
        bits += SCALE_BITS + ZERO_POINT_BITS
    return bits


def _bits_level(bits: Any) -> float:
    return 1.0 - min(float(bits), FLOAT_BITS) / FLOAT_BITS


def _rank_level(rank: Any) -> float:
    return 1.0 - float(rank)


# The registry, in the order knobs appear in a unit's Optuna params, tables and plots.
KNOBS: dict[str, Knob] = {knob.name: knob for knob in (
    Knob(PRUNE, 0.0, (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875), float, level=float, applies=_leads_its_group,
         offer=_distinct_widths, role=CHANNELS),
    Knob(HEADS, 0.0, (0.0, 0.25, 0.5, 0.75), float, level=float, applies=_is_attention, offer=_distinct_heads,
         role=CHANNELS),
    Knob(W_BITS, FLOAT_BITS, (2, 3, 4, 5, 6, 8, FLOAT_BITS), int, level=_bits_level, applies=_quantizable,
         role=BITS, lowers=frozenset({"size", "bops"})),
    Knob(A_BITS, FLOAT_BITS, (4, 8, FLOAT_BITS), int, level=_bits_level, applies=_quantizable, role=BITS,
         lowers=frozenset({"bops"})),
    Knob(RANK, 1.0, (1.0, 0.75, 0.5, 0.25, 0.125), float, level=_rank_level, applies=_factorable,
         offer=_smaller_ranks, cost=_rank_cost, rows=_rank_rows),
    Knob(BLOCK, KEEP, blocks.DEFAULT_GRID, str, level=blocks.block_level, applies=_spatial_conv,
         offer=_smaller_blocks, excludes=(RANK,), cost=_block_cost, rows=_block_rows),
)}


# ---- Optuna params: "unit/knob" ----------------------------------------------------------------------------------
def param_key(unit: str, knob: str) -> str:
    """The Optuna parameter name of `knob` on `unit` ("layer1.0.conv1/prune"); its value is the choice itself."""
    return f"{unit}/{knob}"


def split_key(key: str) -> tuple[str, str]:
    """(unit, knob) of a parameter name: the knob follows the last '/', since module names hold dots, not slashes."""
    unit, _, knob = key.rpartition("/")
    return unit, knob


# ---- exclusions ------------------------------------------------------------------------------------------------
def settle(choices: Mapping[str, Any]) -> dict[str, Any]:
    """One unit's knob -> value with every knob that a set knob excludes back at neutral (a block swap replaces
    the convolution a rank would factor, so the swap wins)."""
    out = dict(choices)
    for name, value in choices.items():
        knob = KNOBS[name]
        if knob.excludes and value != knob.neutral:
            out.update({other: KNOBS[other].neutral for other in knob.excludes if other in out})
    return out


def settle_params(params: Mapping[str, Any], keys: Collection[str] | None = None) -> dict[str, Any]:
    """Flat 'unit/knob' params with `settle` applied for each of `keys` (every key by default; a key that is absent
    stays absent)."""
    out = dict(params)
    for key in params if keys is None else keys:
        value = params[key]
        unit, name = split_key(key)
        knob = KNOBS[name]
        if value != knob.neutral:
            out.update({param_key(unit, o): KNOBS[o].neutral for o in knob.excludes if param_key(unit, o) in out})
    return out
