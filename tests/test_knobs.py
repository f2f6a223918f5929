"""The knob registry: every knob has a consistent entry and an applier, and a new knob needs nothing else."""
from __future__ import annotations

from typing import Iterator

import optuna
import pytest
import torch
from torch import nn

from squeezer.models import resnet20
from squeezer.policies.apply import APPLIERS, apply_policy, register_applier
from squeezer.policies.context import ApplyContext
from squeezer.policies.policy import LayerChoice, Policy
from squeezer.search.baselines import uniform_policy
from squeezer.search.budget import Budget
from squeezer.search.metrics import METRICS
from squeezer.search.objectives import make_objective
from squeezer.search.optuna_searcher import OptunaSearcher
from squeezer.spaces.knobs import BITS, CHANNELS, FORM, KNOBS, Knob, Site, param_key, settle, settle_params, split_key
from squeezer.spaces.space import SearchSpace
from fakes import FakeEvaluator

X8 = torch.randn(1, 1, 8, 8)


def test_every_knob_has_an_applier_and_every_applier_a_knob() -> None:
    assert set(KNOBS) == set(APPLIERS)


@pytest.mark.parametrize("name", list(KNOBS))
def test_each_entry_is_consistent(name: str) -> None:
    knob = KNOBS[name]
    assert knob.name == name and knob.role in (CHANNELS, FORM, BITS)
    assert knob.level(knob.neutral) == 0.0 and all(knob.level(v) >= 0.0 for v in knob.grid)
    assert knob.accepts(knob.neutral) and all(knob.accepts(v) for v in knob.grid) and not knob.accepts(True)
    assert set(knob.excludes) <= set(KNOBS) - {name}
    assert knob.lowers <= set(METRICS)
    assert knob.cost is None or knob.role == FORM  # only a layer's form has a cost of its own
    value = next(v for v in knob.grid if v != knob.neutral)
    assert getattr(LayerChoice(**{name: value}), name) == value and getattr(LayerChoice(), name) == knob.neutral


def test_a_space_offers_each_knobs_choices_from_neutral_to_most_compressed(resnet) -> None:
    space = SearchSpace.from_model(resnet, X8)
    for unit, name in space.param_names():
        levels = [KNOBS[name].level(v) for v in space.choices(unit, name)]
        assert levels[0] == 0.0 and levels == sorted(levels) and len(levels) > 1
    assert {name for _, name in space.param_names()} == set(KNOBS) - {"heads"}  # heads: tests/test_transformers.py


def test_param_keys_round_trip() -> None:
    assert param_key("layer1.0.conv1", "prune") == "layer1.0.conv1/prune"
    assert split_key(param_key("features.4.block.0", "w_bits")) == ("features.4.block.0", "w_bits")


def test_a_knob_that_is_set_sends_what_it_excludes_back_to_neutral() -> None:
    assert settle({"block": "dwsep", "rank": 0.5, "prune": 0.5}) == {"block": "dwsep", "rank": 1.0, "prune": 0.5}
    assert settle({"block": "keep", "rank": 0.5}) == {"block": "keep", "rank": 0.5}
    flat = {"a/block": "dwsep", "a/rank": 0.5, "b/rank": 0.5, "c/block": "dwsep"}
    assert settle_params(flat) == {"a/block": "dwsep", "a/rank": 1.0, "b/rank": 0.5, "c/block": "dwsep"}


# ---- a knob added by a test alone --------------------------------------------------------------------------------
GAIN = "gain"


@pytest.fixture()
def gain_knob(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A `gain` knob on Linear units: its registry entry and its applier, registered here and removed after."""
    calls: list[str] = []

    def applier(model: nn.Module, policy: Policy, ctx: ApplyContext) -> nn.Module:
        """Scale the weights of every unit whose gain is set (a stand-in for a real transform)."""
        for name, choice in policy.layers.items():
            if choice.gain != 1.0:
                calls.append(name)
                with torch.no_grad():
                    model.get_submodule(name).weight.mul_(choice.gain)
        return model

    def on_linear(site: Site) -> bool:
        return site.layer.kind == "linear"

    monkeypatch.setitem(KNOBS, GAIN, Knob(GAIN, 1.0, (1.0, 0.5, 0.25), float, level=lambda g: 1.0 - float(g),
                                          applies=on_linear, lowers=frozenset()))
    saved = dict(APPLIERS)
    register_applier(GAIN, applier, before="w_bits")
    try:
        yield calls
    finally:
        APPLIERS.clear()
        APPLIERS.update(saved)
        monkeypatch.undo()
    assert GAIN not in KNOBS and GAIN not in APPLIERS  # no trace left for the other tests
    with pytest.raises(TypeError, match="unknown knob"):
        LayerChoice(gain=0.5)


def test_a_new_knob_needs_only_its_entry_and_its_applier(gain_knob: list[str], tmp_path) -> None:
    torch.manual_seed(0)
    model = resnet20(num_classes=10, in_channels=1).eval()
    space = SearchSpace.from_model(model, X8)
    # The space offers it where it applies, ordered by its level.
    assert space.choices("fc", GAIN) == (1.0, 0.5, 0.25) and not space.choices("conv1", GAIN)
    assert space.distributions()[param_key("fc", GAIN)] == (1.0, 0.5, 0.25)
    assert uniform_policy(space, 1.0, knob=GAIN).layers == {"fc": LayerChoice(gain=0.25)}

    # A policy carries it through Optuna params and JSON.
    policy = Policy.from_params({"fc/gain": 0.5, "layer1.0.conv1/prune": 0.5}, space).validate(space)
    assert policy.layers["fc"].gain == 0.5 and LayerChoice().gain == 1.0
    assert policy.to_params() == {"fc/gain": 0.5, "layer1.0.conv1/prune": 0.5}
    assert Policy.load(policy.save(tmp_path / "policy.json")) == policy
    ev = FakeEvaluator(space)
    searcher = OptunaSearcher(optuna.create_study(direction="maximize"), space,
                              make_objective("single", budget=Budget.parse(""), base=ev.base()), name="random")
    searcher.enqueue(policy)
    asked = searcher.ask()
    assert asked.trial.params["fc/gain"] == 0.5 and asked.policy.layers == policy.layers

    # apply_policy runs its applier, once, in its place.
    assert list(APPLIERS).index(GAIN) == list(APPLIERS).index("w_bits") - 1
    out = apply_policy(model, Policy.from_params({"fc/gain": 0.5}, space), example_inputs=X8, space=space)
    assert gain_knob == ["fc"]
    assert torch.allclose(out.fc.weight, 0.5 * model.fc.weight)


def test_a_space_pickles_for_local_worker_processes(resnet) -> None:
    """Spawned workers receive the traced space by pickle: every knob's functions must be importable by name."""
    import pickle

    space = SearchSpace.from_model(resnet, torch.randn(2, 1, 8, 8))
    assert pickle.loads(pickle.dumps(space)).fingerprint == space.fingerprint
