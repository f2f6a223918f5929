"""Optuna's samplers as searchers: one categorical parameter per 'unit/knob', constraints from the budget.

Repair (optional) projects a sampled policy into the budget before it is evaluated. The trial keeps the params the
sampler drew and records the repaired policy it actually evaluated (its record's policy): the sampler then learns a
fixed function of its own draws (draw -> repaired policy -> result), which keeps TPE/NSGA-II statistics consistent,
while fronts and reports read the evaluated policy. Re-asking a stale trial re-draws nothing: repair is
deterministic, so the same params give the same policy.
"""
from __future__ import annotations

from typing import Any, Callable

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from squeezer.policies.policy import LayerChoice, Policy
from squeezer.search.objectives import Objective, constraints_func
from squeezer.search.latency_margin import LatencyMargin, LatencyModel
from squeezer.search.records import TrialRecord
from squeezer.search.searcher import Proposal, StudySearcher, asked_record
from squeezer.search.shrink import repair as repair_policy
from squeezer.spaces.knobs import BITS, KNOBS, split_key
from squeezer.spaces.space import SearchSpace

__all__ = ["SAMPLERS", "make_sampler", "OptunaSearcher", "ORDINAL_SAMPLERS", "LatencyModel"]

# Optuna 5's samplers read the constraints stored in each trial (searcher.write_constraints); older ones consider
# constraints only when given a constraints_func, which reads the same values back from the record.
_CONSTRAINTS: dict[str, Any] = ({} if hasattr(optuna.trial.Trial, "set_constraint")
                                else {"constraints_func": constraints_func})
SamplerFactory = Callable[[Objective, int, int], optuna.samplers.BaseSampler]


def _tpe(objective: Objective, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(multivariate=True, constant_liar=True, **_CONSTRAINTS,
                                      n_startup_trials=min(10, max(4, trials // 5)), seed=seed)


def _nsga2(objective: Objective, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    # A population of 50 (the default) would leave a short study in its random first generation.
    return optuna.samplers.NSGAIISampler(**_CONSTRAINTS, seed=seed,
                                         population_size=min(50, max(8, trials // 6)))


def _cmaes(objective: Objective, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    if objective.kind != "single":
        raise ValueError("sampler 'cmaes' is single-objective (CMA-ES adapts one Gaussian to one value): use "
                         "objective='single', or a multi-objective sampler: tpe, nsga2, random, qmc, gp, ddpg")
    try:
        import cmaes  # noqa: F401  (Optuna's CmaEsSampler needs it at its first relative sample)
    except ImportError:
        raise ValueError("sampler 'cmaes' needs the cmaes package: pip install cmaes") from None
    # CMA-ES only models numeric parameters, so this searcher gives it each knob's choice index (ordinal
    # encoding, choices sorted by compression) instead of a categorical; infeasible trials are penalised values.
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=min(10, max(4, trials // 5)),
                                        warn_independent_sampling=False)


SAMPLERS: dict[str, SamplerFactory] = {
    "tpe": _tpe,
    "nsga2": _nsga2,
    "random": lambda o, seed, t: optuna.samplers.RandomSampler(seed=seed),
    "qmc": lambda o, seed, t: optuna.samplers.QMCSampler(seed=seed, scramble=True,
                                                         warn_independent_sampling=False),
    "cmaes": _cmaes,
    "gp": lambda o, seed, t: optuna.samplers.GPSampler(seed=seed, **_CONSTRAINTS,
                                                       warn_independent_sampling=False),
}
ORDINAL_SAMPLERS = frozenset({"cmaes", "qmc"})  # samplers that only handle numbers get choice indices


def make_sampler(name: str, *, objective: Objective, seed: int = 0,
                 trials: int = 100) -> optuna.samplers.BaseSampler:
    """The Optuna sampler called `name`, wired to the budget's constraints where the sampler supports them."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose from {', '.join(SAMPLERS)}, ddpg")
    return SAMPLERS[name](objective, seed, trials)


class OptunaSearcher(StudySearcher):
    """Asks the study's sampler for every 'unit/knob' at once; optionally repairs the draw into the budget."""

    def __init__(self, study: optuna.Study, space: SearchSpace, objective: Objective, *, name: str = "tpe",
                 repair: bool = False, latency_model: LatencyModel | None = None) -> None:
        super().__init__(study, objective)
        self.space = space
        self.name = name
        self.repair = repair
        self.latency_model = latency_model if "latency" in objective.budget.metrics else None
        self.margin = LatencyMargin(study if self.latency_model is not None else None)
        self.choices = space.distributions()
        self.ordinal = name in ORDINAL_SAMPLERS
        self.distributions: dict[str, BaseDistribution] = {
            key: (IntDistribution(0, len(c) - 1) if self.ordinal else CategoricalDistribution(list(c)))
            for key, c in self.choices.items()
        }

    def decode(self, params: dict[str, Any]) -> dict[str, Any]:
        """Sampler params -> knob choices (undoing the ordinal encoding where used)."""
        if not self.ordinal:
            return dict(params)
        return {key: self.space.choices(*split_key(key))[int(index)] for key, index in params.items()}

    def enqueue(self, policy: Policy) -> None:
        """Make a coming ask return `policy` (each knob it leaves out at its neutral value), as Optuna's enqueued
        trials are: the sampler learns from it like any other trial."""
        params: dict[str, Any] = {}
        for key in self.distributions:
            unit, knob = split_key(key)
            value = self.space.nearest(unit, knob, getattr(policy.layers.get(unit, LayerChoice()), knob))
            params[key] = self.space.choices(unit, knob).index(value) if self.ordinal else value
        self.study.enqueue_trial(params, skip_if_exists=True)

    def ask(self) -> Proposal:
        trial = self.study.ask(self.distributions)
        params = self.decode(trial.params)
        policy = Policy.from_params(params, self.space, sampler=self.name, trial=trial.number)
        notes: dict[str, Any] = {}
        if self.repair and self.objective.budget.limits:
            budget, base, model = self.objective.budget, self.objective.base, self.latency_model
            baseline = self.space.baseline()

            # A latency-only budget with a latency model needs no shape costs (half of each prediction's time).
            shapes = model is None or any(m != "latency" for m in budget.metrics)

            margin = self.margin.value()

            def violation(p: Policy) -> list[float]:
                cost = self.space.predict(p.layers) if shapes else baseline
                return budget.predicted_constraints(self.space, base, cost, baseline=baseline,
                                                    latency_rel=margin * model.predict_rel(p) if model else None)

            # With a latency model, repair may also drop bit widths: int8 units can be slower than float ones.
            policy = repair_policy(policy, self.space, violation, metrics=budget.metrics,
                                   undo=[k for k in KNOBS if KNOBS[k].role == BITS] if model else ())
            notes["repaired"] = bool(policy.meta.get("repaired"))
            if model is not None:
                notes.update(self.margin.notes(model, policy))
        return Proposal(asked_record(trial, policy=policy, searcher=self.name, **notes), trial)

    def learn(self, proposal: Proposal, record: TrialRecord) -> None:
        """A timed candidate teaches the margin how far the latency model's predictions of repair's policies are
        off: its calibration policies are random, and a few int8 units in a heavily pruned model, which repair makes
        of a latency limit, cost more than those predict. The search loop records the timing into the model
        itself."""
        if self.latency_model is not None:
            self.margin.note(record)
