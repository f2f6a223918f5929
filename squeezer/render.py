"""Terminal rendering of the jobs' results (rich tables). Data in, text out: no decisions are made here."""
from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

# Wide when piped (logs, CI, tests), the terminal's own width when interactive.
console = Console(width=None if sys.stdout.isatty() else 160)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) if value else "-"
    return "-" if value is None else str(value)


def table(rows: list[dict[str, Any]], title: str, columns: list[str] | None = None) -> None:
    columns = columns or (list(rows[0]) if rows else [])
    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in rows:
        t.add_row(*(_fmt(row.get(c)) for c in columns))
    console.print(t)


def train(result: Any) -> None:
    console.print(f"trained in {result.seconds:.1f}s: val accuracy {result.val_accuracy:.4f}, "
                  f"test accuracy {result.test_accuracy:.4f} -> {result.path}")


def space(space: Any) -> None:
    table(space.table(), f"search space ({len(space.units)} units, {len(space.groups)} channel groups)",
          ["unit", "kind", "shape", "macs", "group", "prune", "w_bits", "a_bits", "rank", "block", "note"])
    base = space.baseline()
    console.print(f"{len(space.distributions())} knobs, {space.size():.3g} policies; base {base.macs:,} MACs/sample, "
                  f"{base.params:,} layer params; fingerprint {space.fingerprint}")
