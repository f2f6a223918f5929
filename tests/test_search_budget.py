"""Budget strings: parsing, constraint values, reachability."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from squeezer.evaluators.measurement import Measurement
from squeezer.models import resnet20
from squeezer.search.budget import Budget, BudgetError
from squeezer.search.shrink import cheapest_policy, repair
from fakes import FakeEvaluator
from squeezer.spaces.space import SearchSpace


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    torch.manual_seed(0)
    return SearchSpace.from_model(resnet20(num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8))


def _m(**kw) -> Measurement:
    base = dict(accuracy=0.9, loss=0.3, macs=1_000_000, params=100_000, bops=1e9, size_mb=1.0, latency_ms=2.0)
    return Measurement(**{**base, **kw})


def test_parse_relative_and_absolute_units() -> None:
    b = Budget.parse("macs<=50%, latency<=2.5ms,size<=1.2MB,bops<=30%,params<=40K")
    assert [(l.metric, l.relative) for l in b.limits] == [("macs", True), ("latency", False), ("size", False),
                                                          ("bops", True), ("params", False)]
    assert b.limits[0].value == 0.5 and b.limits[2].value == pytest.approx(1.2)
    assert b.limits[4].value == 40_000
    assert Budget.parse("macs<=20M").limits[0].value == 20e6
    assert Budget.parse("size<=300KB").limits[0].value == pytest.approx(0.3)
    assert Budget.parse("").limits == ()
    assert str(Budget.parse("macs<=50%,latency<=2ms,size<=300kb")) == "macs<=50%,latency<=2ms,size<=300KB"


@pytest.mark.parametrize("text", ["macs", "macs<=", "flops<=50%", "macs>=50%", "size<=2ms", "latency<=3MB",
                                  "macs<=50%,", "macs<=50%,macs<=40%", "macs<=-1%", "macs<=0%", "latency<=1"])
def test_malformed_budgets_name_the_allowed_forms(text: str) -> None:
    with pytest.raises(BudgetError) as err:
        Budget.parse(text)
    assert "\n" not in str(err.value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="macsizelatnyb<=%.,0123456789KMGBms -", max_size=30) | st.text(max_size=20))
def test_any_string_parses_or_raises_budget_error(text: str) -> None:
    try:
        Budget.parse(text)
    except BudgetError as exc:
        assert isinstance(exc, ValueError) and "\n" not in str(exc)


def test_constraint_values_are_optuna_style() -> None:
    base = _m()
    b = Budget.parse("macs<=50%,latency<=1.5ms")
    assert b.constraint_values(_m(macs=400_000, latency_ms=1.2), base) == pytest.approx([-0.2, -0.2])
    assert b.is_feasible(_m(macs=500_000, latency_ms=1.5), base)
    assert not b.is_feasible(_m(macs=600_000, latency_ms=1.0), base)
    # no latency measured: the MACs ratio against the base latency stands in
    assert b.constraint_values(_m(macs=500_000, latency_ms=None), base)[1] == pytest.approx((1.0 - 1.5) / 1.5)


def test_unreachable_budget_names_the_smallest_reachable_value(space: SearchSpace) -> None:
    base = FakeEvaluator(space).base()
    with pytest.raises(BudgetError, match=r"budget macs<=1% is unreachable: the cheapest policy in this space "
                                          r"reaches [0-9.]+%"):
        Budget.parse("macs<=1%").check_reachable(space, base)
    Budget.parse("macs<=30%,size<=20%").check_reachable(space, base)  # reachable: no error
    cheap = space.predict(cheapest_policy(space, "macs").layers)
    assert cheap.macs < 0.3 * space.baseline().macs


def test_repair_brings_a_policy_into_the_budget(space: SearchSpace) -> None:
    from squeezer.policies.policy import Policy

    base = FakeEvaluator(space).base()
    budget = Budget.parse("macs<=35%,size<=30%")
    bl = space.baseline()
    fixed = repair(Policy(fingerprint=space.fingerprint), space,
                   lambda p: budget.predicted_constraints(space, base, space.predict(p.layers), baseline=bl),
                   metrics=budget.metrics)
    cost = space.predict(fixed.layers)
    assert cost.macs <= 0.35 * bl.macs and cost.size_bytes <= 0.30 * bl.size_bytes
    assert fixed.meta["repaired"] is True
    fixed.validate(space)


def _slow_int8(space: SearchSpace, limit: str, per_unit: float):
    """(latency model, violation of `limit` by it): MACs left, plus `per_unit` of the base for every int8 unit, as
    for small inputs on a CPU; and a policy with every unit's weights in int8."""
    from squeezer.policies.policy import Policy

    base = FakeEvaluator(space).base()
    budget = Budget.parse(limit)
    bl = space.baseline()

    def model(p: Policy) -> float:
        return space.predict(p.layers).macs / bl.macs + per_unit * sum(c.w_bits < 32 for c in p.layers.values())

    def violation(p: Policy) -> list[float]:
        return budget.predicted_constraints(space, base, space.predict(p.layers), baseline=bl, latency_rel=model(p))

    int8 = Policy.from_params({k: 8 for k in space.distributions() if k.endswith("/w_bits")}, space)
    return model, violation, int8


def test_repair_drops_bit_widths_that_a_latency_model_says_are_slow(space: SearchSpace) -> None:
    """Where int8 units run slower than float ones, a latency limit is met by dropping bit widths, which MACs
    cannot see: repair follows the latency model it is given, and leaves bit widths alone without one."""
    from squeezer.spaces.knobs import A_BITS, W_BITS

    model, violation, policy = _slow_int8(space, "latency<=90%", 0.1)
    assert model(policy) > 2
    fixed = repair(policy, space, violation, metrics=("latency",), undo=(W_BITS, A_BITS))
    assert model(fixed) <= 0.9 and fixed.meta["repaired"] is True
    quantized = set(policy.layers)
    assert sum(c.w_bits < 32 for c in fixed.layers.values()) < len(quantized)
    fixed.validate(space)
    stuck = repair(policy, space, violation, metrics=("latency",))  # no undo: only structure may move
    assert model(stuck) > 0.9 and all(stuck.layers[u].w_bits == 8 for u in quantized)


def test_repair_drops_slow_bit_widths_before_it_compresses_structure(space: SearchSpace) -> None:
    """Undoing a slow int8 unit costs no accuracy, pruning does: when undoing is enough, nothing else moves, even
    where one pruning notch would save more than one undo."""
    from squeezer.spaces.knobs import A_BITS, W_BITS

    model, violation, policy = _slow_int8(space, "latency<=100%", 0.02)
    assert len(policy.layers) >= 3
    fixed = repair(policy, space, violation, metrics=("latency",), undo=(W_BITS, A_BITS))
    assert model(fixed) <= 1.0
    assert space.predict(fixed.layers).macs == space.baseline().macs  # no structure moved


def test_relative_latency_limit_reads_the_ratio_timed_against_the_base() -> None:
    """Medians taken minutes apart drift with the machine; the candidate timed interleaved with the base does not."""
    from squeezer.search.budget import cost_fraction

    budget = Budget.parse("latency<=90%")
    base = _m(latency_ms=2.0, latency_rel=0.96)
    drifted = _m(latency_ms=1.81, latency_rel=0.883)  # 0.905 of the base by medians, 0.883 timed against it
    assert budget.constraint_values(drifted, base)[0] < 0
    assert cost_fraction(drifted, base, "latency") == pytest.approx(0.883)
    assert budget.constraint_values(_m(latency_ms=1.81), base)[0] > 0  # no ratio: the medians decide
    assert Budget.parse("latency<=1.8ms").constraint_values(drifted, base)[0] > 0  # an absolute limit is in ms
