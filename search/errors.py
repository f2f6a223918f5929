"""The search's usage error, in a module of its own so the run-folder lock imports nothing heavy (a process that
only holds or checks the lock need not load Optuna and torch)."""
from __future__ import annotations

__all__ = ["SearchError"]


class SearchError(ValueError):
    """A search that cannot start or resume; one line naming the fix."""
