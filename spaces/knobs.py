"""The knobs a unit can offer and the default choices for each.

A knob is one independent decision about one unit. Keeping the default grids here, in one place, means the space,
the policy validator and the samplers can never disagree on what a legal choice is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PRUNE = "prune"
W_BITS = "w_bits"
A_BITS = "a_bits"
RANK = "rank"
BLOCK = "block"

KNOBS: tuple[str, ...] = (PRUNE, W_BITS, A_BITS, RANK, BLOCK)

FLOAT_BITS = 32
KEEP = "keep"
DWSEP = "dwsep"

# The value of each knob that leaves a unit untouched.
NEUTRAL: dict[str, object] = {PRUNE: 0.0, W_BITS: FLOAT_BITS, A_BITS: FLOAT_BITS, RANK: 1.0, BLOCK: KEEP}

DEFAULT_CHOICES: dict[str, tuple] = {
    PRUNE: (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75),
    W_BITS: (2, 3, 4, 5, 6, 8, FLOAT_BITS),
    A_BITS: (4, 8, FLOAT_BITS),
    RANK: (1.0, 0.75, 0.5, 0.25, 0.125),
    BLOCK: (KEEP, DWSEP),
}


@dataclass(frozen=True)
class SpaceConfig:
    """How a space is restricted: which knobs, which layers, which choices.

    `knobs` limits the knobs offered; `include`/`exclude` are fnmatch patterns on unit names; `choices` overrides a
    knob's grid; `round_to` rounds kept channels up to a multiple (8 by default: odd widths ran no faster here);
    `decomposition` picks Tucker-2 ("tucker") or CP ("cp") for k×k convolutions.
    """

    knobs: tuple[str, ...] = KNOBS
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    choices: dict[str, tuple] = field(default_factory=dict)
    round_to: int = 8
    decomposition: str = "tucker"

    def grid(self, knob: str) -> tuple:
        return tuple(self.choices.get(knob, DEFAULT_CHOICES[knob]))

    def __post_init__(self) -> None:
        unknown = [k for k in self.knobs if k not in KNOBS] + [k for k in self.choices if k not in KNOBS]
        if unknown:
            raise ValueError(f"unknown knob {unknown[0]!r}: choose from {', '.join(KNOBS)}")
        if self.decomposition not in ("tucker", "cp"):
            raise ValueError(f"unknown decomposition {self.decomposition!r}: choose 'tucker' or 'cp'")
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")


def kept_channels(channels: int, ratio: float, round_to: int) -> int:
    """Channels left after pruning `ratio` of them, rounded up to `round_to` and never below one step."""
    keep = channels * (1.0 - ratio)
    step = min(round_to, channels)
    kept = int(-(-keep // step) * step)  # ceil to a multiple of step
    return max(step, min(channels, kept))
