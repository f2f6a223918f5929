"""Progress on the terminal: bars for training and the latency table, a live line for the search."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

from squeezer.search.study import SearchProgress

__all__ = ["LiveDisplay", "progress_bar", "terminal_console"]


def terminal_console() -> Any:
    """A rich Console as wide as the terminal, or 160 columns when piped (logs, CI, tests), where rich would wrap
    at 80: tables lost columns and the progress line broke before its ETA."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def progress_bar(total: int, label: str, *, loss: bool = True) -> tuple[Any, Callable[..., None]]:
    """A transient rich bar and the function that moves it (step, and optionally the loss)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total}")]
    columns += [TextColumn("loss {task.fields[loss]:.3f}")] if loss else []
    progress = Progress(*columns, TimeRemainingColumn(), transient=True)
    task = progress.add_task(label, total=total, loss=float("nan"))
    return progress, lambda step, loss=float("nan"): progress.update(task, completed=step, loss=loss)


class LiveDisplay:
    """A rich live line: trials done/total, feasible, best accuracy within budget, front size, elapsed, ETA."""

    def __init__(self) -> None:
        from rich.live import Live

        self.live = Live("", console=terminal_console(), refresh_per_second=4, transient=False)
        self.live.start()
        self.start = time.perf_counter()

    def __call__(self, stats: SearchProgress) -> None:
        best, eta = stats.best_accuracy, stats.eta
        self.live.update(
            f"trials {stats.done}/{stats.total}  feasible {stats.feasible}  "
            f"best within budget {'-' if best is None else f'{best:.4f}'}  front {stats.front}  "
            f"elapsed {stats.elapsed:.0f}s  ETA {'-' if eta is None else f'{eta:.0f}s'}")

    def close(self) -> None:
        self.live.stop()
        if not self.live.console.is_terminal:  # piped: end the progress line before what follows
            self.live.console.print()
