"""One model's path through the engine as a new user takes it: space -> random policies -> apply -> MACs -> ONNX.

Shared by tests/test_architectures.py and benchmarks/architecture_sweep.py (imported, not a test module itself).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from squeezer.evaluators.cost import count_macs
from squeezer.policies.apply import apply_policy
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import Policy
from squeezer.spaces.graph import UNIT_MODULES
from squeezer.spaces.knobs import split_key
from squeezer.spaces.space import SearchSpace

MAC_TOLERANCE = 0.005


@dataclass
class SweepRow:
    """What one model did; `problems` names every check that failed (empty: all held)."""

    model: str
    units: int = 0
    apply_ok: bool = False
    outputs_kept: bool = False
    macs: list[tuple[int, int]] = field(default_factory=list)  # (predicted, counted) per policy, unpruned first
    params: list[tuple[int, int]] = field(default_factory=list)  # the same for Conv/Linear parameters
    onnx_ok: bool = False
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def macs_ok(self) -> bool:
        return bool(self.macs) and all(abs(p - c) <= MAC_TOLERANCE * max(c, 1) for p, c in self.macs + self.params)

    @property
    def ok(self) -> bool:
        return not self.problems


def torchvision_builder(name: str, size: int) -> Callable[[], nn.Module]:
    """Builds torchvision's `name` with random weights and 10 classes, for `size` x `size` images."""
    import torchvision

    segmentation = name in torchvision.models.list_models(module=torchvision.models.segmentation)
    extra = {"weights_backbone": None} if segmentation else {}

    def build() -> nn.Module:
        try:  # a vision transformer's position embedding is made for one image size: the sweep's
            return torchvision.models.get_model(name, num_classes=10, image_size=size, **extra)
        except TypeError:  # every other model takes any size
            return torchvision.models.get_model(name, num_classes=10, **extra)
    return build


def random_policy(space: SearchSpace, rng: random.Random, knobs: tuple[str, ...]) -> Policy:
    """Each offered knob of `knobs` set to a random choice on about half the units (neutral elsewhere)."""
    params = {}
    for key, options in space.distributions().items():
        if split_key(key)[1] in knobs and rng.random() < 0.5:
            params[key] = rng.choice(options)
    return Policy.from_params(params, space)


def unit_params(model: nn.Module, space: SearchSpace) -> int:
    """Conv/Linear parameters inside the space's units: a layer the forward never runs (an auxiliary head in eval
    mode) is not a unit and not predicted."""
    units = set(space.units)
    total = 0
    for name, module in model.named_modules():
        parts = name.split(".")
        if any(".".join(parts[:i]) in units for i in range(1, len(parts) + 1)) and isinstance(
                module, UNIT_MODULES):
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _outputs(v)]
    return []


def check_model(name: str, build: Callable[[], nn.Module], x: torch.Tensor, *, policies: int = 3, seed: int = 0,
                knobs: tuple[str, ...] = ("prune", "heads", "rank", "w_bits"), onnx: bool = True) -> SweepRow:
    """Run the checks on a randomly initialised model; every failure is recorded, none raised."""
    row, start = SweepRow(name), time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    try:
        model = build().eval()
        with torch.no_grad():
            reference = _outputs(model(x))
        space = SearchSpace.from_model(model, x)
        row.units = len(space.units)
        row.apply_ok = row.outputs_kept = True
        candidates = [Policy.from_params({}, space)] + [random_policy(space, rng, knobs) for _ in range(policies)]
        last = model
        for policy in candidates:
            applied = apply_policy(model, policy, example_inputs=x, space=space, memo={})
            with torch.no_grad():
                outs = _outputs(applied(x))
            if [o.shape for o in outs] != [r.shape for r in reference]:
                row.outputs_kept = False
                row.problems.append(f"output shapes {[tuple(o.shape) for o in outs]}")
            predicted, counted = space.predict(policy.layers).macs, count_macs(applied, x)[0]
            row.macs.append((predicted, counted))
            row.params.append((space.predict(policy.layers).params, unit_params(applied, space)))
            last = applied
        if not row.macs_ok:
            row.problems.append(f"MACs, params predicted/counted {row.macs} {row.params}")
        if onnx:
            row.onnx_ok = _onnx_matches(last, x)
            if not row.onnx_ok:
                row.problems.append("onnx output differs")
    except Exception as exc:  # noqa: BLE001  (the sweep records what broke and goes on)
        row.problems.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200])
        row.apply_ok = row.apply_ok and bool(row.macs)
    row.seconds = time.perf_counter() - start
    return row


def _onnx_matches(model: nn.Module, x: torch.Tensor) -> bool:
    import onnxruntime as ort

    session = ort.InferenceSession(export_onnx(model, x), providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: x.numpy()}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = _outputs(model(x))
    return len(got) == len(want) and all(
        np.allclose(g, w.numpy(), rtol=1e-2, atol=1e-3 * max(1.0, float(w.abs().max()))) for g, w in zip(got, want))
