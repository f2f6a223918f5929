"""End to end with a real evaluation: resnet20 trained briefly on digits, policies applied, BN recalibrated."""
from __future__ import annotations

from pathlib import Path

import pytest

from squeezer.search.baselines import uniform_at
from squeezer.search.config import SearchConfig
from squeezer.search.study import run_search
from fakes import CheapEvaluator, InlinePool


@pytest.mark.slow
def test_real_search_with_bn_recalibration(tmp_path: Path) -> None:
    ev = CheapEvaluator(steps=150)
    base = ev.base()
    assert base.accuracy > 0.5
    result = run_search(ev.space, InlinePool(ev), base, out=tmp_path,
                        config=SearchConfig(budget="macs<=60%", sampler="tpe", trials=8, repair=True))
    done = result.completed()
    assert len(done) == 8
    for row in done:
        assert 0.0 <= row.accuracy <= 1.0 and row.recovery == "bn"
        cost = ev.space.predict(row.policy.layers)
        assert row.feasible and cost.macs <= 0.6 * ev.space.baseline().macs
    front = result.front()
    assert front and max(r.accuracy for r in front) > 0.3
    half = ev(uniform_at(ev.space, 0.5))
    assert 0.0 <= half.accuracy <= 1.0 and half.macs <= 0.5 * base.macs
