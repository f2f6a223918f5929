"""The search space of one model: its units, their channel groups, and the choices each knob offers.

`SearchSpace.from_model` is the one entry point. The space also predicts what a policy costs (MACs, params,
size, BOPs) from shapes alone, so samplers can repair policies into a budget and tests can check that applying a
policy physically removes what the space said it would.
"""
from __future__ import annotations

import difflib
import fnmatch
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from squeezer.spaces import attention
from squeezer.spaces.export_check import check_exportable
from squeezer.spaces.graph import CONV_KINDS, ChannelGroup, LayerInfo, SpaceError, channel_groups, trace_layers
from squeezer.spaces.knobs import (A_BITS, CHANNELS, FLOAT_BITS, HEADS, KNOBS, PRUNE, W_BITS, Site, SpaceConfig,
                                    param_key, quantizer_bits, storage_bits)
from squeezer.spaces.lowrank_shapes import dense_macs, dense_params, kept_channels

__all__ = ["SearchSpace", "Unit", "Cost", "SpaceError"]


@dataclass(frozen=True)
class Unit:
    """A compressible layer with the knobs it offers (knob -> allowed choices, neutral first, then from mild to
    aggressive: the order repair, the baselines and the DDPG agent walk)."""

    layer: LayerInfo
    knobs: Mapping[str, tuple]
    out_group: str | None  # the channel group its output channels belong to
    in_group: str | None  # the channel group its input channels belong to
    in_multiplier: int  # input features per input channel (a Linear after a flatten of C x H x W)
    # Every group the unit's output (input) channels take part in, with how many of its output (input) indices the
    # group holds: a concatenation's consumer reads several groups, and only pruning all of them prices it.
    out_parts: tuple[tuple[str, int], ...] = ()
    in_parts: tuple[tuple[str, int], ...] = ()

    @property
    def name(self) -> str:
        return self.layer.name


@dataclass(frozen=True)
class Cost:
    """Predicted cost of a policy, per sample (MACs/BOPs) and for the Conv2d/Linear layers (params/size)."""

    macs: int
    params: int
    size_bytes: float
    bops: float


def _knob(layers: Mapping[str, Any], unit: str, knob: str) -> Any:
    """The unit's value of `knob` in `layers`, neutral when the unit is not named."""
    choice = layers.get(unit)
    return getattr(choice, knob) if choice is not None else KNOBS[knob].neutral


class SearchSpace:
    """Units (Conv2d/Linear layers), their channel groups and knob choices, for one traced model."""

    def __init__(self, units: list[Unit], groups: list[ChannelGroup], config: SpaceConfig,
                 input_shape: tuple[int, ...], other_params: int) -> None:
        self.units: dict[str, Unit] = {u.name: u for u in units}
        self.groups: dict[str, ChannelGroup] = {g.name: g for g in groups}
        self.config = config
        self.input_shape = tuple(input_shape)
        self.other_params = other_params  # BN and other non-layer parameters, kept at 32 bits
        self.fingerprint = _fingerprint([u.layer for u in units], self.input_shape)
        # The knobs that reshape a layer, a knob that excludes others first: it wins, as in a policy.
        self._reshapers = sorted((k for k in KNOBS.values() if k.cost is not None), key=lambda k: not k.excludes)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, example_inputs: torch.Tensor, config: SpaceConfig | None = None,
                   **overrides: Any) -> "SearchSpace":
        """Trace `model` on `example_inputs` (one batch) and build its space; `overrides` are SpaceConfig fields."""
        config = config or SpaceConfig()
        if overrides:
            config = SpaceConfig(**{**config.__dict__, **overrides})
        if not isinstance(example_inputs, torch.Tensor):
            raise SpaceError("example_inputs must be one tensor batch, e.g. torch.randn(1, 3, 32, 32)")
        example_inputs = example_inputs[:1]
        model = attention.checked_rewrite(model.eval(), example_inputs)
        layers = attention.with_attention(trace_layers(model, example_inputs),
                                          attention.attention_layers(model, example_inputs))
        check_exportable(model, example_inputs)
        pruned = any(KNOBS[k].role == CHANNELS for k in config.knobs)
        most = max((*config.grid(PRUNE), 0.0), key=float)
        groups = channel_groups(model, example_inputs, [i for i in layers if i.kind != attention.ATTENTION],
                                smallest=lambda c: kept_channels(c, most, config.round_to),
                                refine=lambda found: attention.protect_attention(found, layers)) if pruned else []
        by_group_out = {p: g for g in groups for p in g.producers}
        out_parts: dict[str, list[tuple[str, int]]] = {}
        in_parts: dict[str, list[tuple[str, int]]] = {}
        for g in groups:
            for p, width in g.out_width:
                out_parts.setdefault(p, []).append((g.name, width))
            for c, width in g.in_width:
                in_parts.setdefault(c, []).append((g.name, width))
        by_name = {g.name: g for g in groups}
        units = []
        for info in layers:
            out_g = by_group_out.get(info.name)
            # The group its input comes from: the largest part it reads (a depthwise conv reads its own group).
            ins = sorted(in_parts.get(info.name, ()), key=lambda part: -part[1])
            in_g = by_name[ins[0][0]] if ins else (out_g if info.kind == "dwconv" else None)
            mult = max(1, ins[0][1] // in_g.channels) if ins and in_g is not None else 1
            knobs = _knobs_for(Site(info, out_g, config))
            units.append(Unit(info, knobs, out_g.name if out_g else None, in_g.name if in_g else None, mult,
                              tuple(out_parts.get(info.name, ())), tuple(ins)))
        layer_params = sum(dense_params(u.layer, u.layer.in_channels, u.layer.out_channels) for u in units
                           if u.layer.kind != attention.ATTENTION)
        total = sum(p.numel() for p in model.parameters())
        return cls(units, groups, config, tuple(example_inputs.shape), max(0, total - layer_params))

    # ---- queries ------------------------------------------------------------------------------------------------
    def choices(self, unit: str, knob: str) -> tuple:
        """The unit's choices for `knob`, from leaving it alone to compressing it most (empty when not offered)."""
        return tuple(self.units[unit].knobs.get(knob, ()))

    def at_level(self, unit: str, knob: str, level: float) -> Any:
        """The choice at compression `level` in [0, 1]: index round(level * (n - 1)) along `choices` (AMC's
        mapping of an action to a pruning ratio, for every knob)."""
        order = self.choices(unit, knob)
        return order[int(round(float(level) * (len(order) - 1)))]

    def param_names(self) -> Iterator[tuple[str, str]]:
        """(unit, knob) for every knob with more than one choice, in forward order."""
        for name, unit in self.units.items():
            for knob in KNOBS:
                if len(unit.knobs.get(knob, ())) > 1:
                    yield name, knob

    def distributions(self) -> dict[str, tuple]:
        """Flat 'unit/knob' -> choices, the form samplers use."""
        return {param_key(u, k): self.choices(u, k) for u, k in self.param_names()}

    def size(self) -> int:
        return math.prod(len(c) for c in self.distributions().values())

    def nearest(self, unit: str, knob: str, value: Any) -> Any:
        options = self.choices(unit, knob)
        if not options:
            return KNOBS[knob].neutral
        if value in options or isinstance(value, str):
            return value if value in options else KNOBS[knob].neutral
        return min(options, key=lambda o: abs(float(o) - float(value)))

    def closest_unit(self, name: str) -> str | None:
        found = difflib.get_close_matches(name, list(self.units), n=1)
        return found[0] if found else None

    def kept(self, group: str | None, ratio: float) -> int | None:
        if group is None:
            return None
        return kept_channels(self.groups[group].channels, ratio, self.config.round_to)

    # ---- cost prediction ----------------------------------------------------------------------------------------
    def predict(self, layers: Mapping[str, Any]) -> Cost:
        """Cost after applying `layers` (unit -> object with an attribute per knob), from shapes alone.

        Size counts what the exported file stores, as `evaluators/cost.py` measures it: weights at their integer
        container, a float bias at 32 bits, each quantized layer's scales and zero points (`quantizer_bits`), a
        factored or swapped unit's for each layer of its form."""
        macs = params = 0
        size_bits = bops = 0.0
        for name, (cin, cout) in self.unit_channels(layers).items():
            unit = self.units[name]
            m, p = self.layer_cost(unit, cin, cout, layers.get(name))
            wb, ab = _knob(layers, name, W_BITS), _knob(layers, name, A_BITS)
            bias = cout if unit.layer.has_bias else 0
            macs += m
            params += p
            size_bits += (p - bias) * storage_bits(wb) + bias * FLOAT_BITS
            size_bits += sum(quantizer_bits(out_channels=rows, w_bits=wb, a_bits=ab)
                             for rows in self.layer_rows(unit, cin, cout, layers.get(name)))
            bops += m * wb * ab
        size_bits += self.other_params * FLOAT_BITS
        return Cost(macs=macs, params=params, size_bytes=size_bits / 8, bops=bops)

    def unit_costs(self, layers: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
        """Unit -> (MACs per sample, params) after applying `layers`: pruning a group shrinks its consumers too, and
        removing heads the attention's projections."""
        return {name: self.layer_cost(self.units[name], cin, cout, layers.get(name))
                for name, (cin, cout) in self.unit_channels(layers).items()}

    def unit_channels(self, layers: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
        """Unit -> (input, output) channels left after the pruning and head removal in `layers`."""
        removed = {}  # group -> the fraction of its channels the policy prunes, as (removed, channels)
        for g, group in self.groups.items():
            ratio = _knob(layers, g, PRUNE)
            if ratio:
                removed[g] = (group.channels - self.kept(g, ratio), group.channels)
        heads: dict[str, tuple[int, int]] = {}  # unit -> (output, input) indices removed heads take from it
        for name, choice in layers.items():
            if name in self.units and getattr(choice, HEADS, 0.0):
                heads.update(attention.head_cuts(self.units[name].layer, getattr(choice, HEADS)))
        out = {}
        for name, unit in self.units.items():
            info = unit.layer
            out_cut, in_cut = heads.get(name, (0, 0))
            cout = info.out_channels - _cut(unit.out_parts, removed) - out_cut
            cin = cout if info.kind == "dwconv" else info.in_channels - _cut(unit.in_parts, removed) - in_cut
            out[name] = (cin, cout)
        return out

    def layer_cost(self, unit: Unit, cin: int, cout: int, choice: Any = None) -> tuple[int, int]:
        """(MACs per sample, params) of one unit at the given channels, in the form `choice` gives it (an object with
        an attribute per knob, e.g. a LayerChoice; None: the unit's own form)."""
        info = unit.layer
        if info.kind == attention.ATTENTION:
            return attention.attention_macs(info, cin, cout), 0
        if choice is not None:
            for knob in self._reshapers:
                value = getattr(choice, knob.name)
                if value != knob.neutral:
                    return knob.cost(info, cin, cout, value, self.config)
        return dense_macs(info, cin, cout), dense_params(info, cin, cout)

    def layer_rows(self, unit: Unit, cin: int, cout: int, choice: Any = None) -> tuple[int, ...]:
        """The output channels of each layer implementing the unit in the form `choice` gives it (one layer, `cout`,
        in its own form or a form whose knob declares no `rows`)."""
        if choice is not None:
            for knob in self._reshapers:
                value = getattr(choice, knob.name)
                if value != knob.neutral:
                    return knob.rows(unit.layer, cin, cout, value, self.config) if knob.rows else (cout,)
        return (cout,)

    def baseline(self) -> Cost:
        return self.predict({})

    # ---- display ------------------------------------------------------------------------------------------------
    def table(self) -> list[dict[str, Any]]:
        """One row per unit: what it is, its MACs, and the choices of each knob (data; the CLI renders it)."""
        rows = []
        for name, unit in self.units.items():
            info = unit.layer
            macs, params = self.layer_cost(unit, info.in_channels, info.out_channels)
            group = self.groups.get(unit.out_group) if unit.out_group else None
            rows.append({
                "unit": name, "kind": info.kind,
                "shape": f"{info.groups} heads x {info.out_channels // info.groups}"
                if info.kind == attention.ATTENTION else f"{info.in_channels}->{info.out_channels}"
                + (f" k{info.kernel[0]}x{info.kernel[1]}" if info.kind in CONV_KINDS else ""),
                "macs": macs, "params": params,
                "group": (group.name + (f" ({len(group.producers)} layers)" if len(group.producers) > 1 else ""))
                if group else "-",
                **{k: unit.knobs.get(k, ()) for k in KNOBS},
                "note": group.note if group and not group.prunable and group.name == name else "",
            })
        return rows

    def __repr__(self) -> str:
        return (f"SearchSpace({len(self.units)} units, {len(self.groups)} channel groups, "
                f"{len(self.distributions())} knobs, size {self.size():.3g})")


def _cut(parts: tuple[tuple[str, int], ...], removed: Mapping[str, tuple[int, int]]) -> int:
    """Indices a layer loses: of each group it takes part in, its share of the channels that group loses."""
    total = 0
    for group, width in parts:
        if group in removed:
            gone, channels = removed[group]
            total += gone * width // channels
    return total


def _matches(name: str, config: SpaceConfig) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in config.include) and not any(
        fnmatch.fnmatchcase(name, p) for p in config.exclude)


def _knobs_for(site: Site) -> dict[str, tuple]:
    """The knobs the unit at `site` offers, each with more than one choice (one choice is no decision)."""
    if not _matches(site.layer.name, site.config):
        return {}
    knobs = {k: KNOBS[k].choices(site, site.config.grid(k)) for k in site.config.knobs}
    return {k: v for k, v in knobs.items() if len(v) > 1}


def _fingerprint(layers: list[LayerInfo], input_shape: tuple[int, ...]) -> str:
    text = "|".join(f"{i.name}:{i.kind}:{i.in_channels}:{i.out_channels}:{i.kernel}:{i.stride}:{i.groups}"
                    for i in layers) + f"|in{tuple(input_shape[1:])}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
