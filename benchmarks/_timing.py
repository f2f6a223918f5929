"""Timing what the code under a benchmark calls, by wrapping it in place: shared by the benchmark scripts, which
run as `python benchmarks/NAME.py` and so find this module beside them."""
from __future__ import annotations

import time
from typing import Any


def time_calls(owner: Any, name: str, sink: list[float]) -> None:
    """Replace `owner.name` (a module's function or a class's method) by a wrapper that appends each call's
    seconds to `sink`, so a benchmark can say where an evaluation or a trial spends its time."""
    inner = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - start)

    setattr(owner, name, wrapper)
