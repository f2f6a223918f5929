"""An AMC-style DDPG agent (He et al., "AMC: AutoML for Model Compression", ECCV 2018) as a searcher.

The agent walks the units in forward order. At unit t it sees a normalised embedding (index, layer type, shape,
its MACs and params, cost already removed, cost left, the episode's cost target, previous action) and emits a
continuous action in [0, 1]: a structure level for the unit's prune, rank and block knobs and, where the space has
bit widths, a separate bits level for them (as HAQ gives bit widths their own action). A level picks choice index
round(a * (n - 1)) along each knob's choices ordered from untouched to most compressed; with only the prune knob
this is AMC's pruning ratio. With one level for every knob, pruning a unit would also quantize it, which a MACs
budget does not ask for and a CPU's latency can punish.

An action wall, as in AMC, raises the structure level (then, failing that, the bits level) to the smallest at
which the remaining units, compressed to the maximum, can still meet the budget (predicted by
`SearchSpace.predict`), so every episode is within budget by construction. A latency limit is predicted by the
latency model when the search has one (the lookup table), aimed below the limit by the margin its timed candidates
taught (latency_margin.py); the wall then also tries the unit's bit widths at float, and the remaining units at
their fastest levels, since on a CPU an int8 unit can be slower than a float one.

In multi-objective mode each episode draws its own target for the cost (a fraction of the base, between the most
compressed policy and the budget) and the wall holds the episode to it, so the agent's episodes spread along the
front instead of all pressing against the budget. Exploration is a truncated normal around the actor's output with
a decaying sigma, after warm-up episodes of random actions. The whole episode gets one reward (accuracy; minus
`cost_weight` x cost fraction in multi-objective mode), less a moving-average baseline, with discount 1 as in AMC.
Episodes are Optuna trials (enqueued with fixed params) carrying their actions and target in user attrs, so a
resumed agent rebuilds its replay buffer from storage.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import optuna
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from torch import nn

from squeezer.evaluators.measurement import Measurement
from squeezer.policies.policy import Policy
from squeezer.search.budget import metric_value
from squeezer.search.latency_margin import LatencyMargin, LatencyModel
from squeezer.search.metrics import cost_field
from squeezer.search.objectives import Objective
from squeezer.search.records import TrialRecord, queue_attrs
from squeezer.search.searcher import Proposal, StudySearcher, asked_record
from squeezer.search.shrink import full_params
from squeezer.spaces.knobs import BITS, KNOBS, param_key, settle
from squeezer.spaces.space import Cost, SearchSpace

__all__ = ["AgentConfig", "AmcAgent"]

_KINDS = {"conv": 0.0, "dwconv": 1.0, "gconv": 0.5, "linear": 0.25}
_WALL_GRID = np.linspace(0.0, 1.0, 21)
_FAST_GRID = np.linspace(0.0, 1.0, 5)  # levels tried per action for each unit's fastest action
Action = tuple[float, ...]  # (structure level,) or (structure level, bits level)


def _mlp(inp: int, hidden: int, outputs: int = 1, out: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                               nn.Linear(hidden, outputs)]
    return nn.Sequential(*layers, *([out] if out is not None else []))


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """The agent's learning: `warmup` episodes of random actions, then an actor and a critic (MLPs of `hidden`
    units, learning rates `lr_actor` and `lr_critic`, targets tracking them by `tau`) trained on batches of
    `batch_size` from the latest `buffer_size` transitions, exploring with a truncated normal of `sigma` decaying
    by `sigma_decay` an episode. An episode's reward is accuracy (minus `cost_weight` x cost fraction in
    multi-objective mode) less a moving-average baseline (`moving_alpha`), discounted by `discount`."""

    warmup: int = 10
    hidden: int = 300
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    tau: float = 0.01
    batch_size: int = 64
    sigma: float = 0.5
    sigma_decay: float = 0.95
    discount: float = 1.0
    buffer_size: int = 4000
    cost_weight: float = 0.1
    moving_alpha: float = 0.5

    def __post_init__(self) -> None:
        for name, low in (("warmup", 0), ("hidden", 1), ("batch_size", 1), ("buffer_size", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, got {getattr(self, name)}")
        for name in ("lr_actor", "lr_critic"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("tau", "sigma_decay", "moving_alpha"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("sigma", "cost_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not 0 <= self.discount <= 1:
            raise ValueError(f"discount must be in [0, 1], got {self.discount}")


class AmcAgent(StudySearcher):
    """DDPG over per-unit compression levels; `ask`/`tell` like every searcher, trials in the same study."""

    def __init__(self, study: optuna.Study, space: SearchSpace, objective: Objective, *, seed: int = 0,
                 config: AgentConfig = AgentConfig(), latency_model: LatencyModel | None = None) -> None:
        super().__init__(study, objective)
        self.space = space
        self.rng = np.random.default_rng(seed)
        self.warmup, self.tau, self.batch_size = config.warmup, config.tau, config.batch_size
        self.sigma0, self.sigma_decay, self.discount = config.sigma, config.sigma_decay, config.discount
        self.cost_weight = config.cost_weight if objective.kind == "multi" else 0.0
        self.moving_alpha, self.baseline = config.moving_alpha, None
        self.buffer_size = config.buffer_size
        self.buffer: list[tuple[np.ndarray, np.ndarray, float, np.ndarray, float]] = []
        self.episodes = 0
        self.latency_model = latency_model if "latency" in objective.budget.metrics else None
        self.margin = LatencyMargin(study if self.latency_model is not None else None)
        self._fastest: list[Action] | None = None
        # Each knob follows action 0 (structure) or, for bit widths when the space has them, action 1 (bits).
        knobs = {u: _knob_names(space, u) for u in space.units}
        self.dims = 2 if any(KNOBS[k].role == BITS for ks in knobs.values() for k in ks) else 1
        self.ladders = {u: [(k, int(self.dims == 2 and KNOBS[k].role == BITS)) for k in ks] for u, ks in knobs.items()}
        self.units = [u for u, ladder in self.ladders.items() if ladder]
        self.dists = {k: CategoricalDistribution(list(c)) for k, c in space.distributions().items()}
        self.base_cost = space.baseline()
        self.field = cost_field(objective.cost_metric)
        # An episode's cost target is on predicted latency when that is the cost and there is a latency model.
        self.latency_target = self.latency_model is not None and objective.cost_metric == "latency"
        self.target_range = self._target_range()
        self.static = self._static_features()
        dim = self.static.shape[1] + 3 + self.dims
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.actor = _mlp(dim, config.hidden, self.dims, nn.Sigmoid())
            self.critic = _mlp(dim + self.dims, config.hidden)
        self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.opt_actor = torch.optim.Adam(self.actor.parameters(), lr=config.lr_actor)
        self.opt_critic = torch.optim.Adam(self.critic.parameters(), lr=config.lr_critic)
        self._resume()

    # ---- episode -------------------------------------------------------------------------------------------------
    def _static_features(self) -> np.ndarray:
        rows = []
        for t, name in enumerate(self.units):
            info = self.space.units[name].layer
            macs, params = self.space.layer_cost(self.space.units[name], info.in_channels, info.out_channels)
            rows.append([t, _KINDS.get(info.kind, 0.0), info.in_channels, info.out_channels, info.kernel[0],
                         info.stride[0], info.positions, macs, params])
        x = np.asarray(rows, dtype=np.float64)
        lo, hi = x.min(0), x.max(0)
        return (x - lo) / np.where(hi > lo, hi - lo, 1.0)

    def _frac(self, cost: Cost) -> float:
        return float(getattr(cost, self.field)) / (float(getattr(self.base_cost, self.field)) or 1.0)

    def _target_range(self) -> tuple[float, float]:
        """Cost fractions an episode's target is drawn from: the most compressed policy's (the fastest one's, for
        a latency target), up to the tightest limit the budget sets on the agent's cost (1 when it sets none)."""
        if self.latency_target:
            assert self.latency_model is not None
            lo = self.latency_model.predict_rel(Policy.from_params(self._params(self.fastest_actions()), self.space))
        else:
            lo = self._frac(self.space.predict(Policy.from_params(
                self._params([(1.0,) * self.dims] * len(self.units)), self.space).layers))
        hi = 1.0
        for lim in self.objective.budget.limits:
            on_cost = (lim.metric == "latency" if self.latency_target
                       else lim.metric != "latency" and cost_field(lim.metric) == self.field)
            ref = 1.0 if lim.relative else metric_value(self.objective.base, lim.metric)
            if on_cost and ref:
                hi = min(hi, lim.value / ref)
        return lo, max(lo, hi)

    def draw_target(self) -> float:
        """The cost target of a new episode: the budget itself (every episode for one best policy, half of them
        for a front, where the most accurate policies are), else anywhere in the range."""
        lo, hi = self.target_range
        if self.objective.kind != "multi" or self.rng.uniform() < 0.5:
            return hi
        return float(self.rng.uniform(lo, hi))

    def _params(self, actions: Sequence[Sequence[float] | None], upto: int | None = None) -> dict:
        """Params for the first `upto` actions (all by default); units without an action stay untouched."""
        params: dict[str, Any] = {}
        for t, unit in enumerate(self.units):
            a = actions[t] if (upto is None or t < upto) and t < len(actions) else None
            if a is None:
                continue
            chosen = settle({knob: self.space.at_level(unit, knob, a[dim]) for knob, dim in self.ladders[unit]})
            params.update({param_key(unit, knob): value for knob, value in chosen.items()})
        return params

    def _cost(self, params: dict) -> Any:
        return self.space.predict(Policy.from_params(params, self.space).layers)

    def _fits(self, params: dict, target: float = 1.0, margin: float = 1.0) -> bool:
        b, policy = self.objective.budget, Policy.from_params(params, self.space)
        cost = self.space.predict(policy.layers)
        latency_rel = margin * self.latency_model.predict_rel(policy) if self.latency_model else None
        if (latency_rel if self.latency_target else self._frac(cost)) > target + 1e-9:  # type: ignore[operator]
            return False
        return all(v <= 0 for v in b.predicted_constraints(self.space, self.objective.base, cost,
                                                           baseline=self.base_cost, latency_rel=latency_rel))

    def fastest_actions(self) -> list[Action]:
        """Each unit's action of least predicted latency, the other units untouched (the latency model's view)."""
        if self._fastest is None:
            assert self.latency_model is not None
            model, n = self.latency_model, len(self.units)
            grid = ([(float(s),) for s in _FAST_GRID] if self.dims == 1
                    else [(float(s), float(b)) for s in _FAST_GRID for b in _FAST_GRID])

            def rel(t: int, a: Action) -> float:
                alone: list[Action | None] = [None] * n
                alone[t] = a
                return model.predict_rel(Policy.from_params(self._params(alone), self.space))

            self._fastest = [min(grid, key=lambda a: (rel(t, a), a)) for t in range(n)]
        return self._fastest

    def _wall_candidates(self, a: Action) -> list[Action]:
        """Actions at or above `a`, least changed first: structure raised; under a latency model, the same with the
        unit's bit widths at float; then bits raised with structure at the maximum (size and BOPs need bits)."""
        ups = [a[0], *[float(g) for g in _WALL_GRID if g > a[0]]]
        if self.dims == 1:
            return [(s,) for s in ups]
        out = [(s, a[1]) for s in ups]
        if self.latency_model is not None and a[1] > 0:
            out += [(s, 0.0) for s in ups]
        return out + [(1.0, float(g)) for g in _WALL_GRID if g > a[1]]

    def wall(self, actions: list[Action], t: int, a: Action, target: float = 1.0) -> Action:
        """The least raised action at unit t with which the remaining units, compressed to the maximum (or, under
        a latency model, each at its fastest action), meet the budget and the episode's target."""
        if not self.objective.budget.limits and target >= 1.0:
            return a
        n, margin = len(self.units), self.margin.value()
        rests = [[(1.0,) * self.dims] * (n - t - 1)]
        if self.latency_model is not None:  # the fastest units, and the smallest in float
            rests += [self.fastest_actions()[t + 1:]] + ([[(1.0, 0.0)] * (n - t - 1)] if self.dims == 2 else [])
        for candidate in self._wall_candidates(a):
            if any(self._fits(self._params([*actions[:t], candidate, *rest]), target, margin) for rest in rests):
                return candidate
        return self.fastest_actions()[t] if self.latency_model is not None else (1.0,) * self.dims

    def _state(self, t: int, actions: Sequence[Action], target: float) -> np.ndarray:
        done = self._frac(self._cost(self._params(actions, upto=t)))
        rest = float(self.static[t + 1:, 7].sum() / max(1e-9, self.static[:, 7].sum())) if t + 1 < len(
            self.units) else 0.0
        prev = actions[t - 1] if t > 0 else (0.0,) * self.dims
        return np.concatenate([self.static[t], [1.0 - done, rest, target], prev]).astype(np.float32)

    def rollout(self, actions: Sequence[Action] | None = None,
                target: float = 1.0) -> tuple[list[np.ndarray], list[Action]]:
        """Play one episode aiming at `target` (or replay given actions): the states seen and the (walled)
        actions taken."""
        states: list[np.ndarray] = []
        taken: list[Action] = []
        explore = actions is None
        sigma = self.sigma0 * self.sigma_decay ** max(0, self.episodes - self.warmup)
        for t in range(len(self.units)):
            s = self._state(t, taken, target)
            states.append(s)
            if not explore:
                a = tuple(float(x) for x in actions[t])  # type: ignore[index]
            elif self.episodes < self.warmup:
                a = self.wall(taken, t, tuple(float(x) for x in self.rng.uniform(size=self.dims)), target)
            else:
                with torch.no_grad():
                    mu = self.actor(torch.from_numpy(s)[None])[0].tolist()
                a = self.wall(taken, t, tuple(_truncnorm(self.rng, m, sigma) for m in mu), target)
            taken.append(a)
        return states, taken

    # ---- searcher ----------------------------------------------------------------------------------------------
    def ask(self) -> Proposal:
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not waiting:  # our own episode; otherwise serve the re-queued one first (FIFO), as the study will
            target = self.draw_target()
            _, actions = self.rollout(target=target)
            params = full_params(self._params(actions), self.space)
            self.study.enqueue_trial(params, user_attrs=queue_attrs(ddpg_actions=actions, ddpg_target=target),
                                     skip_if_exists=False)
        trial = self.study.ask(self.dists)
        policy = Policy.from_params(trial.params, self.space, sampler="ddpg", trial=trial.number)
        self.episodes += 1
        notes = self.margin.notes(self.latency_model, policy) if self.latency_model is not None else {}
        return Proposal(asked_record(trial, policy=policy, searcher="ddpg", **notes), trial)

    def reward(self, m: Measurement) -> float:
        feasible = self.objective.budget.is_feasible(m, self.objective.base)
        return float(m.accuracy) - self.cost_weight * self.objective.cost(m) - (0.0 if feasible else 1.0)

    def learn(self, proposal: Proposal, record: TrialRecord) -> None:
        if self.latency_model is not None:  # the search loop records the timing into the model itself
            self.margin.note(record)
        measured, actions = record.measurement(), proposal.record.ddpg_actions
        if measured is None or not actions:
            return
        self._remember(actions, self.reward(measured), proposal.record.ddpg_target)
        if self.episodes > self.warmup:
            self.train(len(self.units))

    def train(self, steps: int) -> None:
        # The agent's small MLP runs faster on one thread than split over cores the evaluations keep busy.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(steps):
                self.update()
        finally:
            torch.set_num_threads(threads)

    def _remember(self, stored: Sequence[Any], reward: float, target: float | None) -> None:
        """Add an episode's transitions. `stored` is its actions as the trial holds them (a level per unit in
        studies written before bit widths had their own action: the same level for both)."""
        actions = [tuple(float(x) for x in a) if isinstance(a, (list, tuple)) else (float(a),) * self.dims
                   for a in stored]
        self.baseline = reward if self.baseline is None else (
            self.baseline + self.moving_alpha * (reward - self.baseline))
        r = reward - self.baseline
        states, _ = self.rollout(actions, target=self.target_range[1] if target is None else float(target))
        for t, s in enumerate(states):
            last = t == len(states) - 1
            nxt = states[t] if last else states[t + 1]
            self.buffer.append((s, np.asarray(actions[t], dtype=np.float32), r, nxt, 1.0 if last else 0.0))
        del self.buffer[:-self.buffer_size]

    def update(self) -> None:
        """One DDPG step: critic to r + discount * Q'(s', mu'(s')), actor up the critic, soft target updates."""
        if len(self.buffer) < self.batch_size:
            return
        idx = self.rng.choice(len(self.buffer), self.batch_size, replace=False)
        s, a, r, s2, d = (torch.as_tensor(np.asarray(col), dtype=torch.float32)
                          for col in zip(*(self.buffer[i] for i in idx)))
        r, d = r[:, None], d[:, None]
        with torch.no_grad():
            target = r + self.discount * (1 - d) * self.critic_target(torch.cat([s2, self.actor_target(s2)], 1))
        loss = nn.functional.mse_loss(self.critic(torch.cat([s, a], 1)), target)
        self.opt_critic.zero_grad()
        loss.backward()
        self.opt_critic.step()
        actor_loss = -self.critic(torch.cat([s, self.actor(s)], 1)).mean()
        self.opt_actor.zero_grad()
        actor_loss.backward()
        self.opt_actor.step()
        for net, tgt in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
            for p, q in zip(net.parameters(), tgt.parameters()):
                q.data.mul_(1 - self.tau).add_(self.tau * p.data)

    def _resume(self) -> None:
        """Rebuild episodes, baseline and replay buffer from the study's finished agent trials."""
        finished = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        done = [r for r in map(TrialRecord.from_trial, finished) if r.ddpg_actions and r.completed]
        for r in done:
            measured = r.measurement()
            assert measured is not None and r.ddpg_actions is not None
            self._remember(r.ddpg_actions, self.reward(measured), r.ddpg_target)
        self.episodes = len(done)
        if self.episodes > self.warmup:
            self.train(len(self.units) * min(10, self.episodes))


def _knob_names(space: SearchSpace, unit: str) -> list[str]:
    return [k for (u, k) in space.param_names() if u == unit]


def _truncnorm(rng: np.random.Generator, mu: float, sigma: float) -> float:
    """A sample of N(mu, sigma) truncated to [0, 1] (rejection, then clipping as a last resort)."""
    for _ in range(100):
        x = rng.normal(mu, sigma)
        if 0.0 <= x <= 1.0:
            return float(x)
    return float(np.clip(mu, 0.0, 1.0))
