"""An AMC-style DDPG agent (He et al., "AMC: AutoML for Model Compression", ECCV 2018) as a searcher.

The agent walks the units in forward order. At unit t it sees a normalised embedding (index, layer type, shape,
its MACs and params, cost already removed, cost left, previous action) and emits one continuous action a in [0, 1]:
a compression level mapped to every knob the unit offers (choice index round(a * (n - 1)) along the knob's choices
ordered from untouched to most compressed; with only the prune knob this is AMC's pruning ratio). An action wall,
as in AMC, raises a_t to the smallest level at which the remaining units, compressed to the maximum, can still
meet the budget (predicted by `SearchSpace.predict`), so every episode is within budget by construction.

Exploration is a truncated normal around the actor's output with a decaying sigma, after warm-up episodes of
random actions. The whole episode gets one reward (accuracy; minus `cost_weight` x cost fraction in multi-objective
mode), less a moving-average baseline, with discount 1 as in AMC. Episodes are Optuna trials (enqueued with fixed
params) carrying their actions in user attrs, so a resumed agent rebuilds its replay buffer from storage.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import optuna
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from torch import nn

from squeezer.evaluators.measurement import Measurement, Outcome
from squeezer.policies.policy import Policy
from squeezer.search.objectives import Objective
from squeezer.search.searcher import Proposal, StudySearcher, trial_attrs
from squeezer.search.shrink import compression_order, full_params
from squeezer.spaces.knobs import BLOCK, KEEP, RANK
from squeezer.spaces.space import SearchSpace

__all__ = ["AmcAgent"]

_KINDS = {"conv": 0.0, "dwconv": 1.0, "gconv": 0.5, "linear": 0.25}
_WALL_GRID = np.linspace(0.0, 1.0, 21)


def _mlp(inp: int, hidden: int, out: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                               nn.Linear(hidden, 1)]
    return nn.Sequential(*layers, *( [out] if out is not None else []))


class AmcAgent(StudySearcher):
    """DDPG over per-unit compression levels; `ask`/`tell` like every searcher, trials in the same study."""

    def __init__(self, study: optuna.Study, space: SearchSpace, objective: Objective, *, seed: int = 0,
                 warmup: int = 10, hidden: int = 300, lr_actor: float = 1e-4, lr_critic: float = 1e-3,
                 tau: float = 0.01, batch_size: int = 64, sigma: float = 0.5, sigma_decay: float = 0.95,
                 discount: float = 1.0, buffer_size: int = 4000, cost_weight: float = 0.1,
                 moving_alpha: float = 0.5) -> None:
        super().__init__(study, objective)
        self.space = space
        self.rng = np.random.default_rng(seed)
        self.warmup, self.tau, self.batch_size = warmup, tau, batch_size
        self.sigma0, self.sigma_decay, self.discount = sigma, sigma_decay, discount
        self.cost_weight = cost_weight if objective.kind == "multi" else 0.0
        self.moving_alpha, self.baseline = moving_alpha, None
        self.buffer_size = buffer_size
        self.buffer: list[tuple[np.ndarray, float, float, np.ndarray, float]] = []
        self.episodes = 0
        self.ladders = {u: [(k, compression_order(space, u, k)) for k in _knob_names(space, u)]
                        for u in space.units}
        self.units = [u for u, ladder in self.ladders.items() if ladder]
        self.dists = {k: CategoricalDistribution(list(c)) for k, c in space.distributions().items()}
        self.base_cost = space.baseline()
        self.field = {"size": "size_bytes", "params": "params", "bops": "bops"}.get(objective.cost_metric, "macs")
        self.static = self._static_features()
        dim = self.static.shape[1] + 3
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.actor = _mlp(dim, hidden, nn.Sigmoid())
            self.critic = _mlp(dim + 1, hidden)
        self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.opt_actor = torch.optim.Adam(self.actor.parameters(), lr=lr_actor)
        self.opt_critic = torch.optim.Adam(self.critic.parameters(), lr=lr_critic)
        self._resume()

    # ---- episode -------------------------------------------------------------------------------------------------
    def _static_features(self) -> np.ndarray:
        rows = []
        for t, name in enumerate(self.units):
            info = self.space.units[name].layer
            macs, params = self.space.layer_cost(self.space.units[name], info.in_channels, info.out_channels,
                                                 1.0, KEEP)
            rows.append([t, _KINDS.get(info.kind, 0.0), info.in_channels, info.out_channels, info.kernel[0],
                         info.stride[0], info.positions, macs, params])
        x = np.asarray(rows, dtype=np.float64)
        lo, hi = x.min(0), x.max(0)
        return (x - lo) / np.where(hi > lo, hi - lo, 1.0)

    def _params(self, actions: Sequence[float], upto: int | None = None, rest: float | None = None) -> dict:
        """Params for the first `upto` actions (all by default), the remaining units at level `rest`."""
        params: dict[str, Any] = {}
        for t, unit in enumerate(self.units):
            a = actions[t] if (upto is None or t < upto) else rest
            if a is None:
                continue
            for knob, order in self.ladders[unit]:
                params[f"{unit}/{knob}"] = order[int(round(float(a) * (len(order) - 1)))]
            if params.get(f"{unit}/{BLOCK}", KEEP) != KEEP and f"{unit}/{RANK}" in params:
                params[f"{unit}/{RANK}"] = 1.0
        return params

    def _cost(self, params: dict) -> Any:
        return self.space.predict(Policy.from_params(params, self.space).layers)

    def _fits(self, params: dict) -> bool:
        b = self.objective.budget
        return all(v <= 0 for v in b.predicted_constraints(self.space, self.objective.base, self._cost(params),
                                                           baseline=self.base_cost))

    def wall(self, actions: list[float], t: int, a: float) -> float:
        """Raise a_t to the smallest level at which the remaining units at maximum compression meet the budget."""
        if not self.objective.budget.limits:
            return a
        for level in [a, *[g for g in _WALL_GRID if g > a]]:
            trial = self._params([*actions[:t], level] + [1.0] * (len(self.units) - t - 1))
            if self._fits(trial):
                return float(level)
        return 1.0

    def _state(self, t: int, actions: Sequence[float]) -> np.ndarray:
        total = float(getattr(self.base_cost, self.field)) or 1.0
        done = float(getattr(self._cost(self._params(actions, upto=t)), self.field))
        rest = float(self.static[t + 1:, 7].sum() / max(1e-9, self.static[:, 7].sum())) if t + 1 < len(
            self.units) else 0.0
        prev = actions[t - 1] if t > 0 else 0.0
        return np.concatenate([self.static[t], [1.0 - done / total, rest, prev]]).astype(np.float32)

    def rollout(self, actions: Sequence[float] | None = None) -> tuple[list[np.ndarray], list[float]]:
        """Play one episode (or replay given actions): the states seen and the (walled) actions taken."""
        states, taken = [], []
        explore = actions is None
        sigma = self.sigma0 * self.sigma_decay ** max(0, self.episodes - self.warmup)
        for t in range(len(self.units)):
            s = self._state(t, taken)
            states.append(s)
            if not explore:
                a = float(actions[t])
            elif self.episodes < self.warmup:
                a = self.wall(taken, t, float(self.rng.uniform()))
            else:
                with torch.no_grad():
                    mu = float(self.actor(torch.from_numpy(s)[None])[0, 0])
                a = self.wall(taken, t, _truncnorm(self.rng, mu, sigma))
            taken.append(a)
        return states, taken

    # ---- searcher ----------------------------------------------------------------------------------------------
    def ask(self) -> Proposal:
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not waiting:  # our own episode; otherwise serve the re-queued one first (FIFO), as the study will
            _, actions = self.rollout()
            params = full_params(self._params(actions), self.space)
            self.study.enqueue_trial(params, user_attrs={"ddpg_actions": actions}, skip_if_exists=False)
        trial = self.study.ask(self.dists)
        policy = Policy.from_params(trial.params, self.space, sampler="ddpg", trial=trial.number)
        self.episodes += 1
        return Proposal(trial.number, policy, trial, {"actions": trial.user_attrs.get("ddpg_actions")},
                        attrs={"policy": policy.to_json(), "searcher": "ddpg"})

    def reward(self, m: Measurement) -> float:
        feasible = self.objective.budget.is_feasible(m, self.objective.base)
        return float(m.accuracy) - self.cost_weight * self.objective.cost(m) - (0.0 if feasible else 1.0)

    def learn(self, proposal: Proposal, outcome: Outcome) -> None:
        actions = proposal.info.get("actions")
        if not isinstance(outcome, Measurement) or not actions:
            return
        self._remember(actions, self.reward(outcome))
        if self.episodes > self.warmup:
            self.train(len(self.units))

    def train(self, steps: int) -> None:
        # A 300-wide MLP on a batch of 64 runs ~4x faster on one thread than on two busy cores.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(steps):
                self.update()
        finally:
            torch.set_num_threads(threads)

    def _remember(self, actions: Sequence[float], reward: float) -> None:
        self.baseline = reward if self.baseline is None else (
            self.baseline + self.moving_alpha * (reward - self.baseline))
        r = reward - self.baseline
        states, _ = self.rollout(actions)
        for t, s in enumerate(states):
            last = t == len(states) - 1
            nxt = states[t] if last else states[t + 1]
            self.buffer.append((s, float(actions[t]), r, nxt, 1.0 if last else 0.0))
        del self.buffer[:-self.buffer_size]

    def update(self) -> None:
        """One DDPG step: critic to r + discount * Q'(s', mu'(s')), actor up the critic, soft target updates."""
        if len(self.buffer) < self.batch_size:
            return
        idx = self.rng.choice(len(self.buffer), self.batch_size, replace=False)
        s, a, r, s2, d = (torch.as_tensor(np.asarray(col), dtype=torch.float32)
                          for col in zip(*(self.buffer[i] for i in idx)))
        a, r, d = a[:, None], r[:, None], d[:, None]
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
        done = [attrs for attrs in map(trial_attrs, finished) if attrs.get("ddpg_actions") and "accuracy" in attrs]
        for attrs in done:
            self._remember(attrs["ddpg_actions"], self.reward(Measurement.from_metrics(attrs)))
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
