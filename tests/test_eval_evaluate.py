"""The Evaluator: caches repeated policies (memory and disk), turns failures into values, runs on CUDA if any."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from squeezer.evaluators.evaluate import EvalSettings, Evaluator
from squeezer.evaluators.settings import LatencyConfig, RecoveryConfig
from squeezer.evaluators.measurement import EvalFailure, Measurement
from squeezer.policies.policy import LayerChoice, Policy

FAST = EvalSettings(recovery=RecoveryConfig(bn_batches=2), latency=LatencyConfig(mode="none"))


def test_repeated_policy_hits_cache(resnet, digits, tmp_path) -> None:
    ev = Evaluator(resnet, digits, FAST, cache_dir=tmp_path)
    policy = Policy.uniform(ev.space, prune=0.5)
    first = ev.evaluate(policy)
    assert isinstance(first, Measurement) and ev.hits == 0
    assert ev.evaluate(policy) is first and ev.hits == 1
    again = Evaluator(resnet, digits, FAST, cache_dir=tmp_path)  # a new worker reads the disk cache
    assert again.evaluate(policy) == first and again.hits == 1 and again.count == 0


def test_failed_apply_is_a_failure_value(resnet, digits) -> None:
    ev = Evaluator(resnet, digits, FAST)
    bad = Policy(layers={"no.such.layer": LayerChoice(prune=0.5)})
    out = ev.evaluate(bad)
    assert isinstance(out, EvalFailure) and "no.such.layer" in out.reason and "\n" not in out.reason


def test_nan_becomes_failure(resnet, digits) -> None:
    with torch.no_grad():
        resnet.fc.weight.fill_(math.nan)
    out = Evaluator(resnet, digits, FAST).base_measurement()
    assert isinstance(out, EvalFailure) and "non-finite" in out.reason


def test_measurement_carries_fingerprints(resnet, digits) -> None:
    ev = Evaluator(resnet, digits, FAST)
    out = ev.evaluate(Policy.uniform(ev.space, w_bits=8, a_bits=8))
    assert isinstance(out, Measurement)
    assert out.fingerprint == ev.space.fingerprint and out.hardware["logical_cores"] >= 1
    assert out.bops < ev.space.baseline().bops and out.latency_ms is None and out.seconds > 0


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="unknown latency mode 'fast': choose from measure, predict, hybrid, none"):
        LatencyConfig(mode="fast")
    with pytest.raises(ValueError, match="unknown recovery mode 'magic': choose from none, bn, finetune, kd"):
        RecoveryConfig(mode="magic")
    with pytest.raises(ValueError, match="recovery must be a RecoveryConfig, got 'kd'"):
        EvalSettings(recovery="kd")


def test_hybrid_latency_keeps_the_prediction_beside_each_timing(resnet, digits, tmp_path) -> None:
    """Every second candidate is timed; its table prediction, made before timing, is kept to report the table's
    error. The others carry the prediction as their latency."""
    from optuna.trial import TrialState

    from squeezer.search.latency_margin import prediction_error
    from squeezer.search.records import TrialRecord

    ev = Evaluator(resnet, digits, EvalSettings(latency=LatencyConfig(mode="hybrid", measure_every=2),
                                                 recovery=RecoveryConfig(bn_batches=2)), cache_dir=tmp_path)
    units = [u for u, knob in ev.space.param_names() if knob == "prune"][:4]
    outs = [ev.evaluate(Policy(layers={u: LayerChoice(prune=0.5)}, fingerprint=ev.space.fingerprint)) for u in units]
    assert all(isinstance(o, Measurement) for o in outs)
    assert [o.latency_source for o in outs] == ["measured", "predicted", "measured", "predicted"]
    timed = [o for o in outs if o.latency_source == "measured"]
    assert all(o.latency_predicted > 0 and o.latency_rel > 0 for o in timed)
    assert all(o.latency_predicted is None and o.latency_rel > 0 for o in outs if o not in timed)
    check = prediction_error([TrialRecord(number=n, state=TrialState.RUNNING).measured(o, constraints=[], cost_frac=1.0)
                              for n, o in enumerate(outs)])
    errors = sorted(abs(o.latency_predicted - o.latency_rel) / o.latency_rel for o in timed)
    assert check is not None and check["timed"] == 2 and math.isclose(check["median_error"], sum(errors) / 2)


def test_the_lookup_table_can_time_each_entry_over_more_sessions(resnet, digits, tmp_path) -> None:
    """On tiny inputs a table sums entries each as noisy as its sessions' speeds (benchmarks/latency_fit.py): the
    table can spread a candidate's runs over more sessions, and keeps a file of its own for that."""
    tables = {}
    for reps in (3, 12):
        settings = EvalSettings(latency=LatencyConfig(mode="predict", table_reps=reps),
                                recovery=RecoveryConfig(bn_batches=2))
        ev = Evaluator(resnet, digits, settings, cache_dir=tmp_path)
        assert ev.meter is not None and ev.table is not None and ev.table.path is not None
        assert (ev.meter.reps, ev.table.meter.reps) == (3, reps) and (ev.table.meter is ev.meter) == (reps == 3)
        assert ev.table.meter.runs * ev.table.meter.reps == ev.meter.runs * ev.meter.reps == 600
        tables[reps] = ev.table.path.name
    assert tables[3].endswith("-r3.json") and tables[12] == tables[3].replace("-r3.json", "-r12.json")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu(resnet, digits) -> None:
    cpu = Evaluator(resnet, digits, FAST).base_measurement()
    gpu = Evaluator(resnet, digits, replace(FAST, device="cuda")).base_measurement()
    assert isinstance(gpu, Measurement)
    assert gpu.accuracy == pytest.approx(cpu.accuracy, abs=0.02) and gpu.macs == cpu.macs


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_a_pruned_and_quantized_policy_on_cuda_matches_cpu(resnet, digits, device) -> None:
    """The copy, the replayed pruning plans and the quantized layers on the GPU give the CPU's model."""
    cpu = Evaluator(resnet, digits, FAST)
    other = Evaluator(resnet, digits, replace(FAST, device=device))
    policy = Policy.uniform(cpu.space, prune=0.5, w_bits=8)
    a, b = cpu.evaluate(policy), other.evaluate(policy)
    assert isinstance(a, Measurement) and isinstance(b, Measurement), (a, b)
    assert (b.macs, b.params, b.size_mb) == (a.macs, a.params, a.size_mb)
    assert b.accuracy == pytest.approx(a.accuracy, abs=0.02)
