"""One trial's record: what a search stores in an Optuna trial, and what every reader (fronts, reports, resume, the
agent, the summaries) reads back, as typed fields.

`TrialRecord.attrs` is the one writer and `TrialRecord.from_trial` the one reader. A record goes into two user attrs
(not one per field, because an RDB storage commits each attr separately): RUN_ATTR, written when the trial is asked
(the policy, the searcher's notes, the driver evaluating it, so a killed search's RUNNING trials say what they
held), and METRICS_ATTR, complete once it is told (the measurement and how it meets the budget; when asked, only the
searcher's latency prediction if it made one). A told trial also carries copies of the main metrics (FLAT_METRICS)
as attrs of their own: Optuna's tools (optuna-dashboard, `trials_dataframe`) show and sort flat values, not one
JSON blob. The reader takes METRICS_ATTR, which holds the same numbers. What a trial carries from Optuna's queue
(an agent episode's actions, a re-queued trial's origin) and `stale` stay attrs of their own, since Optuna copies an
enqueued trial's attrs onto it.

The policy is stored once, in the trial, and the policies/trial_NNNNN.json file a search writes is an export of it
for users and `squeezer apply --policy FILE`. Storage is the only state every reader has (a study in a database
URL or in memory has no run folder to read files from), so the trial must hold the policy; the file is named by
the trial number, so the trial needs no path to it.

Studies written before read as they did: those with the policy and the searcher's notes in METRICS_ATTR and the
policy file's path in RUN_ATTR, and older ones with one attr per metric.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

from optuna.trial import FrozenTrial, TrialState

from squeezer.evaluators.measurement import Measurement
from squeezer.policies.policy import Policy

__all__ = ["TrialRecord", "Driver", "RUN_ATTR", "METRICS_ATTR", "STALE_ATTR", "FLAT_METRICS", "policy_file",
           "promoted_key", "queue_attrs"]

RUN_ATTR = "run"
METRICS_ATTR = "metrics"
STALE_ATTR = "stale"
# The metrics a told trial also stores flat, for tools that sort trials by attr (optuna-dashboard's trial table).
FLAT_METRICS = ("accuracy", "macs", "params", "size_mb", "bops", "latency_ms", "feasible", "cost_frac")

# The fields a promotion re-measures: its numbers replace the cheap ones (an absent one reads as None).
_REMEASURED = ("accuracy", "loss", "macs", "params", "bops", "size_mb", "latency_ms", "latency_p90_ms",
               "latency_spread", "latency_rel", "latency_source", "seconds", "recovery", "fingerprint", "constraints",
               "feasible", "cost_frac")
Action = tuple[float, ...] | float  # an agent's action for one unit (a bare level in studies before bit widths had one)


def policy_file(number: int) -> str:
    """Where a search writes trial `number`'s policy, relative to its run folder."""
    return f"policies/trial_{number:05d}.json"


def promoted_key(number: int) -> str:
    """The study attr holding trial `number`'s promotion (a finished trial is read-only, its study is not)."""
    return f"promoted:{number}"


@dataclass(frozen=True)
class Driver:
    """The process that evaluates a trial: a resumed search re-queues a RUNNING trial whose driver is gone."""

    run: str
    pid: int
    host: str


@dataclass(frozen=True)
class TrialRecord:
    """A trial as a search stores it. Fields a trial has not reached (a RUNNING trial's metrics) are None."""

    number: int
    state: TrialState
    trial_params: Mapping[str, Any] = field(default_factory=dict)  # the sampler's draw, as Optuna holds it
    values: tuple[float, ...] | None = None  # the Optuna objective values
    # asked: what was evaluated, and by whom
    policy: Policy | None = None  # the policy evaluated (repair may have changed the draw)
    searcher: str | None = None
    repaired: bool | None = None
    latency_margin: float | None = None  # what repair multiplied the latency model's prediction by
    driver: Driver | None = None
    # told: the measurement
    accuracy: float | None = None
    loss: float | None = None
    macs: int | None = None
    params: int | None = None
    bops: float | None = None
    size_mb: float | None = None
    latency_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_spread: float | None = None
    latency_rel: float | None = None
    latency_source: str | None = None
    latency_predicted: float | None = None  # the evaluator's prediction when it made one, else the searcher's
    seconds: float | None = None
    recovery: str | None = None
    fingerprint: str | None = None
    hardware: Mapping[str, Any] = field(default_factory=dict)
    # told: how the measurement meets the budget
    constraints: tuple[float, ...] | None = None  # Optuna's convention: <= 0 within each limit
    feasible: bool | None = None
    cost_frac: float | None = None  # the cost objective: the cost metric as a fraction of the base model's
    fidelity: str | None = None  # "cheap" as searched, "finetune" once promoted
    fail_reason: str | None = None
    # carried from the queue
    ddpg_actions: tuple[Action, ...] | None = None
    ddpg_target: float | None = None
    requeued_from: int | None = None
    stale: bool = False  # failed because its driver died; its params were queued again
    # read side only, never stored as such
    cheap: TrialRecord | None = None  # a promoted trial's record as first evaluated
    x: float | None = None  # the cost on a front's axis, as a fraction of the base model's

    @property
    def policy_file(self) -> str:
        return policy_file(self.number)

    @property
    def completed(self) -> bool:
        return self.state == TrialState.COMPLETE and self.accuracy is not None

    def measurement(self) -> Measurement | None:
        """The measured numbers as the evaluator returned them (None before the trial is told, or if it failed)."""
        if self.accuracy is None:
            return None
        return Measurement(
            accuracy=self.accuracy, loss=_or(self.loss, 0.0), macs=_or(self.macs, 0), params=_or(self.params, 0),
            bops=_or(self.bops, 0.0), size_mb=_or(self.size_mb, 0.0), latency_ms=self.latency_ms,
            latency_p90_ms=self.latency_p90_ms, latency_spread=self.latency_spread, latency_rel=self.latency_rel,
            latency_source=_or(self.latency_source, "none"), latency_predicted=self.latency_predicted,
            seconds=_or(self.seconds, 0.0), recovery=_or(self.recovery, "bn"), fingerprint=_or(self.fingerprint, ""),
            hardware=dict(self.hardware))

    # ---- writing -----------------------------------------------------------------------------------------------
    def measured(self, m: Measurement, *, constraints: Sequence[float], cost_frac: float,
                 fidelity: str = "cheap") -> TrialRecord:
        """This record told `m`, judged against the budget (`constraints`) and the cost objective."""
        return replace(
            self, state=TrialState.COMPLETE, accuracy=m.accuracy, loss=m.loss, macs=m.macs, params=m.params,
            bops=m.bops, size_mb=m.size_mb, latency_ms=m.latency_ms, latency_p90_ms=m.latency_p90_ms,
            latency_spread=m.latency_spread, latency_rel=m.latency_rel, latency_source=m.latency_source,
            latency_predicted=m.latency_predicted if m.latency_predicted is not None else self.latency_predicted,
            seconds=m.seconds, recovery=m.recovery, fingerprint=m.fingerprint, hardware=dict(m.hardware),
            constraints=tuple(float(c) for c in constraints), feasible=all(c <= 0 for c in constraints),
            cost_frac=cost_frac, fidelity=fidelity)

    def failed(self, reason: str, *, seconds: float | None = None) -> TrialRecord:
        return replace(self, state=TrialState.FAIL, fail_reason=reason, seconds=seconds)

    def attrs(self) -> dict[str, Any]:
        """The user attrs that store this record, JSON values only (what any storage hands back)."""
        run = _present(policy=self.policy.to_json() if self.policy is not None else None, searcher=self.searcher,
                       repaired=self.repaired, latency_margin=self.latency_margin,
                       driver=asdict(self.driver) if self.driver is not None else None)
        metrics = self.metrics_attr()
        out = queue_attrs(ddpg_actions=self.ddpg_actions, ddpg_target=self.ddpg_target,
                          requeued_from=self.requeued_from)
        if self.stale:
            out[STALE_ATTR] = True
        if run:
            out[RUN_ATTR] = run
        if metrics:
            out[METRICS_ATTR] = metrics
            if self.state == TrialState.COMPLETE:
                out.update({k: metrics[k] for k in FLAT_METRICS if k in metrics})
        return out

    def metrics_attr(self) -> dict[str, Any]:
        """METRICS_ATTR's value: the measurement and how it meets the budget, or why the trial failed (also a
        promotion's study attr)."""
        return _present(
            accuracy=self.accuracy, loss=self.loss, macs=self.macs, params=self.params, bops=self.bops,
            size_mb=self.size_mb, latency_ms=self.latency_ms, latency_p90_ms=self.latency_p90_ms,
            latency_spread=self.latency_spread, latency_rel=self.latency_rel, latency_source=self.latency_source,
            latency_predicted=self.latency_predicted, seconds=self.seconds, recovery=self.recovery,
            fingerprint=self.fingerprint, hardware=dict(self.hardware) or None,
            constraints=list(self.constraints) if self.constraints is not None else None, feasible=self.feasible,
            cost_frac=self.cost_frac, fidelity=self.fidelity, fail_reason=self.fail_reason)

    # ---- reading -----------------------------------------------------------------------------------------------
    @classmethod
    def from_trial(cls, trial: FrozenTrial, *, promoted: Mapping[str, Any] | None = None) -> TrialRecord:
        """The record stored in `trial`; with `promoted` (the study's promotion of it), its promoted numbers."""
        return cls.from_attrs(number=trial.number, state=trial.state, user_attrs=trial.user_attrs,
                              trial_params=trial.params, values=trial.values, promoted=promoted)

    @classmethod
    def from_attrs(cls, *, number: int, state: TrialState, user_attrs: Mapping[str, Any],
                   trial_params: Mapping[str, Any] | None = None, values: Sequence[float] | None = None,
                   promoted: Mapping[str, Any] | None = None) -> TrialRecord:
        """The record in a trial's user attrs (also a trial being asked, whose attrs came from the queue)."""
        attrs = dict(user_attrs)
        run, metrics = attrs.pop(RUN_ATTR, None) or {}, attrs.pop(METRICS_ATTR, None) or {}
        record = _parse({**attrs, **run, **metrics}, number=number, state=state,
                        trial_params=dict(trial_params or {}), values=tuple(values) if values is not None else None)
        again = _parse(promoted, number=number, state=state) if promoted else None
        if again is None or again.accuracy is None:  # none, or its evaluation failed: the cheap numbers stand
            return record
        return replace(record, **{f: getattr(again, f) for f in _REMEASURED}, fidelity="finetune", cheap=record,
                       latency_predicted=_or(again.latency_predicted, record.latency_predicted),
                       hardware=again.hardware or record.hardware)


def queue_attrs(*, ddpg_actions: Sequence[Action] | None = None, ddpg_target: float | None = None,
                requeued_from: int | None = None) -> dict[str, Any]:
    """The attrs a trial carries from Optuna's queue (`study.enqueue_trial(params, user_attrs=...)`)."""
    actions = None if ddpg_actions is None else [list(a) if isinstance(a, tuple) else a for a in ddpg_actions]
    return _present(ddpg_actions=actions, ddpg_target=ddpg_target, requeued_from=requeued_from)


def _present(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _num(value: Any, kind: type) -> Any:
    return None if value is None else kind(value)


def _parse(flat: Mapping[str, Any], *, number: int, state: TrialState, trial_params: Mapping[str, Any] | None = None,
           values: tuple[float, ...] | None = None) -> TrialRecord:
    """A record from one flat mapping of stored fields (every layout this module has written, merged)."""
    get = flat.get
    policy, driver, actions = get("policy"), get("driver"), get("ddpg_actions")
    constraints = get("constraints")
    return TrialRecord(
        number=number, state=state, trial_params=dict(trial_params or {}), values=values,
        policy=Policy.from_json(policy) if policy is not None else None, searcher=get("searcher"),
        repaired=_num(get("repaired"), bool), latency_margin=_num(get("latency_margin"), float),
        driver=Driver(run=driver.get("run", ""), pid=driver.get("pid", 0), host=driver.get("host", ""))
        if isinstance(driver, dict) else None,
        accuracy=_num(get("accuracy"), float), loss=_num(get("loss"), float), macs=_num(get("macs"), int),
        params=_num(get("params"), int), bops=_num(get("bops"), float), size_mb=_num(get("size_mb"), float),
        latency_ms=_num(get("latency_ms"), float), latency_p90_ms=_num(get("latency_p90_ms"), float),
        latency_spread=_num(get("latency_spread"), float), latency_rel=_num(get("latency_rel"), float),
        latency_source=get("latency_source"), latency_predicted=_num(get("latency_predicted"), float),
        seconds=_num(get("seconds"), float), recovery=get("recovery"), fingerprint=get("fingerprint"),
        hardware=dict(get("hardware") or {}),
        constraints=tuple(float(c) for c in constraints) if constraints is not None else None,
        feasible=_num(get("feasible"), bool), cost_frac=_num(get("cost_frac"), float), fidelity=get("fidelity"),
        fail_reason=get("fail_reason"),
        ddpg_actions=tuple(tuple(float(x) for x in a) if isinstance(a, (list, tuple)) else float(a) for a in actions)
        if actions is not None else None,
        ddpg_target=_num(get("ddpg_target"), float), requeued_from=_num(get("requeued_from"), int),
        stale=bool(get(STALE_ATTR, False)))
