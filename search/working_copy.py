"""The study the sampler works on, held in memory and written to the stored study a trial at a time.

Why: Optuna writes every suggested parameter in its own storage call, and an RDB storage commits each one: with
dozens of parameters a policy that is a large share of a short BN-recalibrated evaluation. Here the sampler asks
and learns on an in-memory copy that holds every stored trial (so trial numbers are the stored ones), and each
trial reaches storage when it is asked (RUNNING, with its params and attrs, in one call: a killed search still
finds it and re-queues it) and when it is told (the attrs it gained, then its state and values).

Every write goes through the storage's public interface (`BaseStorage`: what `Study.add_trial`, `Trial.set_user_attr`
and `Study.tell` call), so any storage Optuna supports holds what Optuna itself would have written.
"""
from __future__ import annotations

import copy
from typing import Any

import optuna
from optuna.storages import BaseStorage, InMemoryStorage
from optuna.trial import FrozenTrial, TrialState

__all__ = ["WorkingCopy", "ConcurrentWriterError"]


class ConcurrentWriterError(ValueError):
    """Another process added or took trials in the stored study while this search ran (one line for the CLI)."""


class WorkingCopy:
    """An in-memory twin of `stored` for the searcher; `begin`/`finish` write a trial through to storage."""

    def __init__(self, stored: optuna.Study, storage: BaseStorage, sampler: optuna.samplers.BaseSampler) -> None:
        self.storage = storage  # the storage object `stored` writes through (see study.open_study)
        self.study_id = storage.get_study_id_from_name(stored.study_name)
        self.memory = InMemoryStorage()
        self.study = optuna.create_study(storage=self.memory, sampler=sampler, directions=stored.directions)
        trials = stored.get_trials(deepcopy=False)
        self.study.add_trials(trials)
        self._stored_ids = {t.number: t._trial_id for t in trials}
        self._written: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}  # number -> (user, system) attrs

    def begin(self, trial: optuna.Trial) -> None:
        """Store an asked trial as RUNNING with its params and attrs so far."""
        ft = self.memory.get_trial(trial._trial_id)
        if ft.number in self._stored_ids:  # a trial enqueued in storage (a re-queued one): take it there too
            self._take_waiting(ft)
        else:
            # Study.add_trial's call, which also returns the new trial's id for the check below.
            trial_id = self.storage.create_new_trial(self.study_id, template_trial=ft)
            # (number -> id is a dict lookup in Optuna's RDB cache; id -> number would re-read the trial)
            if self.storage.get_trial_id_from_study_id_trial_number(self.study_id, ft.number) != trial_id:
                raise ConcurrentWriterError(
                    f"trial {ft.number} was stored under another number: another search is writing to this study; "
                    f"run one search per output folder")
            self._stored_ids[ft.number] = trial_id
        self._written[ft.number] = (copy.deepcopy(ft.user_attrs), copy.deepcopy(ft.system_attrs))

    def _take_waiting(self, ft: FrozenTrial) -> None:
        trial_id = self._stored_ids[ft.number]
        if not self.storage.set_trial_state_values(trial_id, TrialState.RUNNING):
            raise ConcurrentWriterError(f"trial {ft.number} was taken by another search writing to this study; "
                                        f"run one search per output folder")
        for name, value in ft.params.items():
            dist = ft.distributions[name]
            self.storage.set_trial_param(trial_id, name, dist.to_internal_repr(value), dist)
        stored = self.storage.get_trial(trial_id)
        self._write_attrs(trial_id, _changed(ft.user_attrs, stored.user_attrs),
                          _changed(ft.system_attrs, stored.system_attrs))

    def finish(self, trial: optuna.Trial) -> None:
        """Store what a told trial gained since `begin`: new attrs, then its final state and values."""
        ft = self.memory.get_trial(trial._trial_id)
        trial_id = self._stored_ids[ft.number]
        user, system = self._written.pop(ft.number)
        try:
            self._write_attrs(trial_id, _changed(ft.user_attrs, user), _changed(ft.system_attrs, system))
            self.storage.set_trial_state_values(trial_id, ft.state, ft.values)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise ConcurrentWriterError(f"trial {ft.number} was finished by another search writing to this study; "
                                        f"run one search per output folder") from None

    def _write_attrs(self, trial_id: int, user: dict[str, Any], system: dict[str, Any]) -> None:
        for key, value in user.items():
            self.storage.set_trial_user_attr(trial_id, key, value)
        for key, value in system.items():
            self.storage.set_trial_system_attr(trial_id, key, value)


def _changed(now: dict[str, Any], written: dict[str, Any]) -> dict[str, Any]:
    """The attrs in `now` that `written` lacks or holds with another value."""
    return {key: value for key, value in now.items() if key not in written or written[key] != value}
