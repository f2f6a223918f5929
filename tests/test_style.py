"""House style that no tool here checks: code lines stay within 120 characters."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("squeezer", "spaces", "policies", "evaluators", "search", "tests", "benchmarks")


def test_lines_fit_in_120_characters() -> None:
    long = [f"{path.relative_to(ROOT)}:{n}" for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 120]
    assert not long, f"lines over 120 characters: {', '.join(long)}"
