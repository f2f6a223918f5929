"""A policy: the choice made for each unit of a model, as data that can be saved, loaded and validated.

A policy does nothing by itself (`apply_policy` acts on it). It records the fingerprint of the model it was made
for, so applying it to another model fails with a clear message instead of a shape error deep inside torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from squeezer.spaces.knobs import KNOBS, param_key, settle, split_key
from squeezer.spaces.space import SearchSpace

FORMAT = "squeezer.policy"
VERSION = 1
SHOWN = 80  # characters of a value from the file an error message repeats: one line, however long the value
META_DEPTH = 16  # nesting of 'meta' a policy may hold: it is saved again (trials, compressed models) and must stay
#                  well inside what JSON and pickle can write back


class PolicyError(ValueError):
    """A policy that cannot be read or does not fit the model; its message is one line naming the fix."""


def shown(value: Any) -> str:
    """`value` as an error message repeats it: its repr cut to SHOWN characters; a JSON array or object by its size
    alone (one nested a thousand deep has no short repr)."""
    if isinstance(value, (dict, list)):
        return f"an {'object' if isinstance(value, dict) else 'array'} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN - 3] + "..."


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON `value` nests arrays/objects more than `limit` levels (without recursion: it may be deep)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


@dataclass(frozen=True, init=False, repr=False)
class LayerChoice:
    """The choice for one unit: `LayerChoice(prune=0.5)`. Every registered knob reads as an attribute, at its
    neutral value unless set, so a new knob needs no field here."""

    pairs: tuple[tuple[str, Any], ...]  # (knob, value) of the knobs not at neutral, in registry order

    def __init__(self, **knobs: Any) -> None:
        if not knobs.keys() <= KNOBS.keys():
            unknown = next(k for k in knobs if k not in KNOBS)
            raise TypeError(f"unknown knob {unknown!r}: knobs are {', '.join(KNOBS)}")
        pairs = tuple([(k, knobs[k]) for k, knob in KNOBS.items() if k in knobs and knobs[k] != knob.neutral])
        self.__dict__.update(pairs)  # set knobs are instance attributes, neutral ones class attributes (below)
        self.__dict__["pairs"] = pairs

    def __getattr__(self, name: str) -> Any:
        """A knob registered after this module was imported, at neutral (the others are plain attributes)."""
        if name not in KNOBS:
            raise AttributeError(f"'LayerChoice' object has no attribute {name!r}")
        return KNOBS[name].neutral

    def __repr__(self) -> str:
        return f"LayerChoice({', '.join(f'{k}={v!r}' for k, v in self.pairs)})"

    def is_neutral(self) -> bool:
        return not self.pairs

    def changed(self) -> dict[str, Any]:
        return dict(self.pairs)

    def updated(self, **knobs: Any) -> "LayerChoice":
        return LayerChoice(**{**self.changed(), **knobs})


for _name, _knob in KNOBS.items():  # neutral values as plain class attributes: cost prediction reads them in loops
    setattr(LayerChoice, _name, _knob.neutral)


@dataclass(frozen=True)
class Policy:
    """Unit name -> LayerChoice; units not named are kept as they are. `channel_round` is the multiple kept channels
    (and ranks, block widths) were rounded to in the space the policy was made in: the same ratio keeps another
    width at another rounding, so it travels with the policy (None: whatever the space applying it rounds to)."""

    layers: Mapping[str, LayerChoice] = field(default_factory=dict)
    fingerprint: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    channel_round: int | None = None

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_params(cls, params: Mapping[str, Any], space: SearchSpace, **meta: Any) -> "Policy":
        """Build from flat Optuna-style params ("layer1.0.conv1/prune": 0.5), normalised to a legal policy.

        A knob that excludes another sends it back to neutral (a block swap replaces the convolution, so a rank
        sampled for the same unit is dropped: the swap wins).
        """
        per_unit: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            unit, knob = split_key(key)
            if knob not in KNOBS or not unit:
                raise PolicyError(f"parameter {key!r} is not of the form 'unit/knob' with knob in {', '.join(KNOBS)}")
            per_unit.setdefault(unit, {})[knob] = value
        layers = {}
        for unit, knobs in per_unit.items():
            choice = LayerChoice(**settle(knobs))
            if not choice.is_neutral():
                layers[unit] = choice
        return cls(layers=layers, fingerprint=space.fingerprint, meta=dict(meta), channel_round=space.config.round_to)

    @classmethod
    def uniform(cls, space: SearchSpace, **knobs: Any) -> "Policy":
        """The same choice for every unit that offers it (the nearest offered value otherwise): a baseline."""
        params = {}
        for name, knob in space.param_names():
            if knob in knobs:
                params[param_key(name, knob)] = space.nearest(name, knob, knobs[knob])
        return cls.from_params(params, space, kind="uniform", **{k: v for k, v in knobs.items()})

    def to_params(self) -> dict[str, Any]:
        """Flat params of the knobs each unit changes; a neutral knob has no param (absent means keep)."""
        out = {}
        for unit, choice in self.layers.items():
            for knob, value in choice.changed().items():
                out[param_key(unit, knob)] = value
        return out

    def with_layer(self, unit: str, **knobs: Any) -> "Policy":
        layers = dict(self.layers)
        layers[unit] = layers.get(unit, LayerChoice()).updated(**knobs)
        return replace(self, layers=layers)

    # ---- validation ---------------------------------------------------------------------------------------------
    def validate(self, space: SearchSpace, *, require_fingerprint: bool = False) -> "Policy":
        """Check the policy fits `space`: same model, known units, offered choices. Returns self for chaining.

        `require_fingerprint` also refuses a policy that names no model: one read from a file must show it was made
        for this model, or it would be applied to any model whose unit names happen to match."""
        if require_fingerprint and not self.fingerprint:
            raise PolicyError("policy names no model (its fingerprint is empty or missing), so nothing shows it was "
                              "made for this one: regenerate it with `squeezer search`, or pass --no-model-check")
        if self.fingerprint and self.fingerprint != space.fingerprint:
            raise PolicyError(
                f"policy was made for another model (fingerprint {self.fingerprint[:12]}, this model "
                f"{space.fingerprint[:12]}): apply it to the model it was searched on"
            )
        if self.layers and self.channel_round is not None and self.channel_round != space.config.round_to:
            raise PolicyError(f"policy rounds kept channels to multiples of {self.channel_round}, the space to "
                              f"{space.config.round_to}: apply it in a space with round_to={self.channel_round} "
                              f"(--channel-round {self.channel_round})")
        for unit, choice in self.layers.items():
            if unit not in space.units:
                close = space.closest_unit(unit)
                hint = f" (did you mean {close!r}?)" if close else ""
                raise PolicyError(f"policy names unit {shown(unit)}, which is not in the model{hint}: fix the unit "
                                  "name")
            for knob, value in choice.changed().items():
                allowed = space.choices(unit, knob)
                if value not in allowed:
                    offered = ", ".join(map(str, allowed)) if allowed else "nothing (the knob is not offered here)"
                    raise PolicyError(
                        f"unit {unit!r}: {knob}={shown(value)} is not offered; allowed: {offered}"
                    )
            for knob in choice.changed():
                both = [other for other in KNOBS[knob].excludes if other in choice.changed()]
                if both:
                    raise PolicyError(f"unit {unit!r}: {knob} and {both[0]} cannot both be set; drop one")
        return self

    # ---- JSON ---------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "meta": dict(self.meta),
            "layers": {u: c.changed() for u, c in sorted(self.layers.items()) if not c.is_neutral()},
            **({} if self.channel_round is None else {"channel_round": self.channel_round}),
        }

    @classmethod
    def from_json(cls, data: Any) -> "Policy":
        if not isinstance(data, dict):
            raise PolicyError("policy file must hold a JSON object; regenerate it with `squeezer search` or fix it")
        if data.get("format") != FORMAT:
            raise PolicyError(f"not a squeezer policy (format {shown(data.get('format'))}, expected {FORMAT!r})")
        version = data.get("version")
        if version != VERSION or isinstance(version, bool):
            raise PolicyError(f"policy version {shown(version)} is not supported (this squeezer reads version "
                              f"{VERSION})")
        layers_raw = data.get("layers", {})
        if not isinstance(layers_raw, dict):
            raise PolicyError("policy 'layers' must be an object of unit name -> choices")
        layers = {}
        for unit, knobs in layers_raw.items():
            if not isinstance(knobs, dict):
                raise PolicyError(f"unit {shown(unit)}: choices must be an object like {{\"prune\": 0.5}}")
            for knob, value in knobs.items():
                if knob not in KNOBS:
                    raise PolicyError(f"unit {shown(unit)}: unknown knob {shown(knob)}; knobs are {', '.join(KNOBS)}")
                if not KNOBS[knob].accepts(value):
                    raise PolicyError(f"unit {shown(unit)}: {knob} must be a {KNOBS[knob].value_type.__name__}, "
                                      f"got {shown(value)}")
            cast = {k: KNOBS[k].value_type(v) for k, v in knobs.items()}
            layers[unit] = LayerChoice(**cast)
        fp = data.get("fingerprint", "")
        meta = data.get("meta", {})
        if not isinstance(fp, str) or not isinstance(meta, dict):
            raise PolicyError("policy 'fingerprint' must be a string and 'meta' an object")
        if _deeper_than(meta, META_DEPTH):
            raise PolicyError(f"policy 'meta' nests more than {META_DEPTH} levels: keep it a flat record")
        rounding = data.get("channel_round")
        if rounding is not None and (not isinstance(rounding, int) or isinstance(rounding, bool) or rounding < 1):
            raise PolicyError(f"policy 'channel_round' must be a whole number of 1 or more, got {shown(rounding)}")
        return cls(layers=layers, fingerprint=fp, meta=meta, channel_round=rounding)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"policy file {str(path)!r} does not exist: check the path")
        try:
            data = json.loads(path.read_text())
        except RecursionError:
            raise PolicyError(f"policy file {str(path)!r} nests too deeply to read: regenerate it") from None
        except ValueError as exc:  # invalid JSON or text, or a number too long to convert
            reason = (exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc).partition("\n")[0])[:SHOWN]
            raise PolicyError(f"policy file {str(path)!r} is not valid JSON ({reason}): regenerate it or fix the "
                              "syntax") from None
        return cls.from_json(data)

    def summary(self) -> str:
        """A short human line, e.g. for hover text: 'prune 5, w4 3, rank 2, dwsep 1'."""
        counts: dict[str, int] = {}
        for choice in self.layers.values():
            for knob in choice.changed():
                counts[knob] = counts.get(knob, 0) + 1
        return ", ".join(f"{k} x{n}" for k, n in counts.items()) or "unchanged"
