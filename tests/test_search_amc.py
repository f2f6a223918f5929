"""The AMC-style agent: its action wall keeps every episode within the budget; episodes are study trials."""
from __future__ import annotations

import optuna
import pytest
import torch

from squeezer.models import resnet20
from squeezer.policies.policy import Policy
from squeezer.search.amc_agent import AgentConfig, AmcAgent
from squeezer.search.baselines import uniform_at, uniform_policy, uniform_sweep
from squeezer.search.budget import Budget
from squeezer.search.objectives import make_objective
from squeezer.search.records import TrialRecord
from fakes import FakeEvaluator
from squeezer.spaces.space import SearchSpace


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    torch.manual_seed(0)
    return SearchSpace.from_model(resnet20(num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8))


@pytest.mark.parametrize("limit", [0.3, 0.5, 0.8])
def test_action_wall_keeps_every_episode_within_the_macs_budget(space: SearchSpace, limit: float) -> None:
    ev = FakeEvaluator(space)
    objective = make_objective("single", budget=Budget.parse(f"macs<={limit * 100:g}%"), base=ev.base())
    study = optuna.create_study(direction="maximize")
    agent = AmcAgent(study, space, objective, seed=1, config=AgentConfig(warmup=3, batch_size=16))
    bl = space.baseline().macs
    for _ in range(8):  # warm-up (random actions) and learned episodes, each walled
        proposal = agent.ask()
        assert space.predict(proposal.policy.layers).macs <= limit * bl
        actions = proposal.record.ddpg_actions
        assert len(actions) == len(agent.units)
        assert all(len(a) == agent.dims == 2 and all(0.0 <= x <= 1.0 for x in a) for a in actions)
        agent.tell(proposal, ev(proposal.policy))
    records = [TrialRecord.from_trial(t) for t in study.trials]
    assert len(records) == 8 and all(r.feasible and r.searcher == "ddpg" for r in records)
    assert all(r.ddpg_actions and r.ddpg_target is not None for r in records)  # what a resumed agent learns from


def test_actions_map_to_each_units_choices(space: SearchSpace) -> None:
    ev = FakeEvaluator(space)
    agent = AmcAgent(optuna.create_study(direction="maximize"), space,
                     make_objective("single", budget=Budget.parse(""), base=ev.base()), seed=0)
    n = len(agent.units)
    assert Policy.from_params(agent._params([(0.0, 0.0)] * n), space).layers == {}
    most = Policy.from_params(agent._params([(1.0, 1.0)] * n), space).validate(space)
    assert space.predict(most.layers).macs < 0.3 * space.baseline().macs
    assert all(c.w_bits == 2 for c in most.layers.values())
    pruned = Policy.from_params(agent._params([(1.0, 0.0)] * n), space).layers  # structure without bit widths
    assert space.predict(pruned).macs == space.predict(most.layers).macs
    assert all(c.w_bits == c.a_bits == 32 for c in pruned.values()) and any(c.prune > 0 for c in pruned.values())
    quantized = Policy.from_params(agent._params([(0.0, 1.0)] * n), space).layers  # bit widths alone
    assert all(c.prune == 0 and c.w_bits == 2 for c in quantized.values())


def test_uniform_baseline(space: SearchSpace) -> None:
    ev = FakeEvaluator(space)
    assert uniform_policy(space, 0.0).layers == {}
    half = uniform_at(space, 0.5)
    assert space.predict(half.layers).macs <= 0.5 * space.baseline().macs
    sweep = uniform_sweep(space, levels=5, knob="prune", budget=Budget.parse("macs<=60%"), base=ev.base())
    assert sweep and all(space.predict(p.layers).macs <= 0.6 * space.baseline().macs for p in sweep)
