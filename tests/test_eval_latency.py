"""Latency: positive, repeatable within a generous tolerance (CI is noisy), lower for a pruned model, and the
timing lock excludes torch work."""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from squeezer.evaluators.latency import (LatencyMeter, LatencyTable, MachineLock, calibration_policies, choice_parts,
                                         fit_slopes, hardware_fingerprint, table_entries, timing_threads)
from squeezer.models import vgg_small
from squeezer.policies.apply import apply_policy
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import LayerChoice, Policy
from squeezer.spaces.knobs import SpaceConfig
from squeezer.spaces.space import SearchSpace


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    model = vgg_small(num_classes=10, in_channels=1).eval()
    x = torch.randn(1, 1, 16, 16)
    space = SearchSpace.from_model(model, x)
    return model, x, space, export_onnx(model, x)


def test_hardware_fingerprint_names_the_machine() -> None:
    hw = hardware_fingerprint(1)
    assert hw["threads"] == 1 and hw["logical_cores"] >= 1 and hw["cpu"]
    cores = hw["logical_cores"]
    assert hardware_fingerprint()["threads"] == timing_threads() == max(1, cores - 1)  # one core left to the rest
    assert hw["onnxruntime"] and hw["torch"]
    # the providers timed on, not every one installed (this onnxruntime also lists Azure's, which times nothing)
    assert hw["providers"] == ["CPUExecutionProvider"]
    assert hardware_fingerprint(1, ["XnnpackExecutionProvider"])["providers"] == ["XnnpackExecutionProvider"]


def test_latency_positive_and_repeatable(vgg, tmp_path) -> None:
    _, x, _, onnx = vgg
    meter = LatencyMeter(onnx, tuple(x.shape), batch=1, lock=MachineLock(tmp_path))
    for _ in range(5):  # CI machines have slow phases: one quiet attempt of five must agree within 25%
        a, b = meter.measure(onnx), meter.measure(onnx)
        assert 0 < a.median_ms <= a.p90_ms and a.spread >= 0
        if abs(a.median_ms - b.median_ms) / min(a.median_ms, b.median_ms) < 0.25 and 0.8 < a.rel < 1.25:
            break
    else:
        pytest.fail(f"medians {a.median_ms:.3f} / {b.median_ms:.3f} ms, rel {a.rel:.2f}: not repeatable")


def test_each_repetition_times_both_models_in_sessions_made_for_it(vgg, tmp_path, monkeypatch) -> None:
    """A session's speed is settled when it is made; one reference session kept for the meter's life shifted every
    relative latency the meter gave by its luck (benchmarks/latency_noise.py)."""
    from squeezer.evaluators import latency

    model, x, space, onnx = vgg
    other = export_onnx(apply_policy(model, Policy.uniform(space, prune=0.25), [x], space=space), x)
    made: list[str] = []
    make = latency.make_session

    def counting(model_bytes: bytes, *args, **kwargs):
        made.append("ref" if model_bytes is onnx else "cand")
        return make(model_bytes, *args, **kwargs)

    monkeypatch.setattr(latency, "make_session", counting)
    meter = LatencyMeter(onnx, tuple(x.shape), batch=1, runs=30, warmup=5, reps=3, lock=MachineLock(tmp_path))
    assert made == []  # nothing made before the first timing
    meter.measure(other)
    meter.measure(other)
    # per measurement: a new pair per repetition, made in turns (a session made later tended to run faster)
    assert made == ["ref", "cand", "cand", "ref", "ref", "cand"] * 2


def test_more_repetitions_split_the_runs_among_more_sessions(vgg, tmp_path, monkeypatch) -> None:
    """Sessions, not runs, set a timing's precision; the runs of all repetitions together stay at least 200."""
    from squeezer.evaluators import latency

    model, x, space, onnx = vgg
    runs: list[int] = []
    warm: list[int] = []
    time_session = latency.time_session

    def counting(session, feed, n, warmup=0):
        runs.append(n)
        warm.append(warmup if n == 0 else 0)  # a session's warm-up (each block of timed runs also runs one first)
        return time_session(session, feed, n, warmup)

    monkeypatch.setattr(latency, "time_session", counting)
    meter = LatencyMeter(onnx, tuple(x.shape), batch=1, runs=10, warmup=5, reps=8, lock=MachineLock(tmp_path))
    result = meter.measure(onnx)
    assert (meter.reps, meter.runs) == (8, 25)  # 200 runs in all, split among the repetitions
    assert 2 * 200 <= sum(runs) < 2 * 240 and sum(warm) == 2 * 8 * 30  # both models; each new session warmed up
    assert result.rel > 0 and result.spread >= 0


@pytest.mark.slow  # timed against the base on a possibly busy machine
def test_pruned_model_is_faster(vgg, tmp_path) -> None:
    model, x, space, onnx = vgg
    pruned = apply_policy(model, Policy.uniform(space, prune=0.5), [x], space=space)
    meter = LatencyMeter(onnx, tuple(x.shape), batch=8, lock=MachineLock(tmp_path))
    result = meter.measure(export_onnx(pruned, x))
    assert result.rel < 0.8 and result.median_ms < result.ref_ms


def test_timing_waits_for_torch_work(tmp_path) -> None:
    lock = MachineLock(tmp_path)
    events: list[str] = []

    def timer() -> None:
        with lock.timing():
            events.append("timing")

    with lock.compute():
        thread = threading.Thread(target=timer)
        thread.start()
        time.sleep(0.3)
        events.append("compute done")
    thread.join(5)
    assert events == ["compute done", "timing"]


def test_lookup_table_caches_on_disk(vgg, tmp_path) -> None:
    model, x, space, onnx = vgg
    built: list[Policy] = []

    def build(policy: Policy) -> bytes:
        built.append(policy)
        return export_onnx(apply_policy(model, policy, [x], space=space), x)

    meter = LatencyMeter(onnx, tuple(x.shape), batch=1, lock=MachineLock(tmp_path))
    unit = next(u for u, k in space.param_names() if k == "prune")
    policy = Policy(layers={unit: LayerChoice(prune=0.5)}, fingerprint=space.fingerprint)
    table = LatencyTable(meter, build, key=space.fingerprint, fingerprint=space.fingerprint, cache_dir=tmp_path)
    predicted = table.predict_us(policy)
    assert predicted > 0 and len(built) == 2  # the base and the one entry
    again = LatencyTable(meter, build, key=space.fingerprint, fingerprint=space.fingerprint, cache_dir=tmp_path)
    assert again.predict_us(policy) == predicted and len(built) == 2


def test_choice_parts_keep_bit_widths_together() -> None:
    parts = choice_parts(LayerChoice(prune=0.5, rank=0.5, w_bits=8, a_bits=8))
    # bit widths are timed on the unit's rank or block (not its pruning): int8 costs per convolution quantized
    assert [p.changed() for p in parts] == [{"prune": 0.5}, {"rank": 0.5}, {"rank": 0.5, "w_bits": 8, "a_bits": 8}]
    assert choice_parts(LayerChoice()) == []
    # every width up to 8 bits is exported as int8, so it is timed as int8
    assert choice_parts(LayerChoice(w_bits=4, a_bits=6)) == [LayerChoice(w_bits=8, a_bits=8)]


def test_lookup_table_fills_up_front_with_progress(vgg, tmp_path) -> None:
    model, x, space, onnx = vgg
    small = SearchSpace.from_model(model, x, SpaceConfig(knobs=("prune",), include=(next(space.param_names())[0],)))
    built: list[Policy] = []

    def build(policy: Policy) -> bytes:
        built.append(policy)
        return export_onnx(apply_policy(model, policy, [x], space=space), x)

    meter = LatencyMeter(onnx, tuple(x.shape), batch=1, runs=30, warmup=5, reps=3, lock=MachineLock(tmp_path))
    entries = table_entries(small)
    assert entries and all(set(p.changed()) == {"prune"} for _, p in entries)
    table = LatencyTable(meter, build, key=space.fingerprint, fingerprint=space.fingerprint, cache_dir=tmp_path,
                         space=space)
    seen: list[tuple[int, int]] = []
    whole = calibration_policies(small, 2)
    timed = table.fill(entries, lambda done, total: seen.append((done, total)), calibration=whole)
    assert timed == len(entries) + 1 + 2  # + the base + the calibration policies
    assert seen[0] == (0, timed) and seen[-1] == (timed, timed) and len(table.data["calibration"]) == 2
    count = len(built)
    unit, part = entries[-1]
    table.predict_us(Policy(layers={unit: part}, fingerprint=space.fingerprint))
    again = LatencyTable(meter, build, key=space.fingerprint, fingerprint=space.fingerprint, cache_dir=tmp_path)
    assert again.fill(entries, calibration=whole) == 0 and len(built) == count  # all of it came from disk


def test_the_slopes_correct_the_sums_once_there_are_enough_points() -> None:
    """Points are [parts, bits, bits unscaled, MAC change, measured] (`LatencyTable.sums` and a timing)."""
    assert fit_slopes([[-0.2, 0.5, 0.6, -0.3, 1.2]]) == (1.0, 0.0, 1.0, 0.0)  # too few: the sums as they are
    grid = [(-0.1 * i, 0.3 * j, 0.2 * (j + k), -0.15 * i * i - 0.05 * k) for i in range(3) for j in range(3)
            for k in range(3) if i + j + k]
    # the structure costs 0.6 of its deltas and 0.4 of its MAC change, int8 0.5 of its MAC-scaled sum and 0.3 of
    # its unscaled one
    slopes = fit_slopes([[p, q, u, m, 1 + 0.6 * p + 0.4 * m + 0.5 * q + 0.3 * u] for p, q, u, m in grid])
    assert slopes == pytest.approx((0.6, 0.4, 0.5, 0.3))
    # float-only timings that follow the structural deltas: no MAC term, and nothing said about the bits
    assert fit_slopes([[-0.1 * i, 0.0, 0.0, -0.01 * i * i, 1 - 0.1 * i] for i in range(8)]) == pytest.approx(
        (1.0, 0.0, 0.0, 0.0))
    # timings where bit widths seem to save latency: both bits slopes stay at 0
    _, _, b, c = fit_slopes([[p, q, u, m, 1 + p - 0.5 * q] for p, q, u, m in grid])
    assert (b, c) == (0.0, 0.0)


def test_the_mac_change_knows_that_pruning_two_coupled_groups_saves_a_product(vgg) -> None:
    """Each group's delta was timed with the other whole; pruned together, a convolution between them keeps
    (1 - r_in)(1 - r_out) of its MACs. The sums carry that change, from shapes, for the fit to weigh."""
    _, _, space, _ = vgg
    groups = [g for g in space.groups if space.groups[g].prunable][:2]
    table = LatencyTable(_NoMeter(), lambda p: b"", key="k", space=space)  # type: ignore[arg-type]
    layers = {}
    for g in groups:
        layers[g] = LayerChoice(prune=space.choices(g, "prune")[-1])
        table.data["deltas"][table.entry_key(g, layers[g])] = -0.2
    base = space.baseline().macs
    singles = sum(base - space.predict({g: layers[g]}).macs for g in groups) / base
    parts, bits, unscaled, macs = table.sums(Policy(layers=layers, fingerprint=space.fingerprint))
    assert (parts, bits, unscaled) == (-0.4, 0.0, 0.0)
    assert macs == pytest.approx(space.predict(layers).macs / base - 1) and -singles < macs < 0


def test_calibration_takes_turns_at_any_knob_float_only_and_a_few_int8_units(vgg) -> None:
    """A third of the table's calibration policies leave bit widths alone, a third quantize one to four units (what
    repair makes of a latency limit), the rest draw every knob."""
    _, _, space, _ = vgg
    policies = calibration_policies(space, 12, seed=3)
    int8 = [sum(c.w_bits < 32 or c.a_bits < 32 for c in p.layers.values()) for p in policies]
    assert int8[1::3] == [0] * 4
    assert all(1 <= n <= 4 for n in int8[2::3])
    assert max(int8[0::3]) > 4  # the others draw bit widths anywhere


class _NoMeter:
    batch, reps = 1, 3

    def hardware(self) -> dict:
        return {}


def test_sums_leave_out_structure_that_reaches_an_int8_unit(vgg) -> None:
    """A pruned group's delta counts as structure only while none of its layers is int8: on an int8 layer the
    bit-width delta, scaled by the MACs pruning leaves, already holds what pruning saves there."""
    _, _, space, _ = vgg
    group = next(g for g in space.groups if space.groups[g].prunable)
    reached = {u for u, unit in space.units.items() if group in (unit.out_group, unit.in_group)}
    elsewhere = next(u for u in space.units if u not in reached)
    prune = space.choices(group, "prune")[-1]
    table = LatencyTable(_NoMeter(), lambda p: b"", key="k", space=space)  # type: ignore[arg-type]
    for unit in space.units:
        for part in (LayerChoice(prune=prune), LayerChoice(w_bits=8, a_bits=8)):
            table.data["deltas"][table.entry_key(unit, part)] = -0.2 if part.prune else 0.5

    def sums(layers: dict) -> tuple[float, float]:
        return table.sums(Policy(layers=layers, fingerprint=space.fingerprint))[:2]

    assert sums({group: LayerChoice(prune=prune)}) == (-0.2, 0.0)
    parts, bits = sums({group: LayerChoice(prune=prune), elsewhere: LayerChoice(w_bits=8, a_bits=8)})
    assert parts == -0.2 and bits == pytest.approx(0.5)  # the int8 layer is outside the group
    inside = sorted(reached - {group})[0]  # a layer of the group other than the one the choice is keyed by
    parts, bits = sums({group: LayerChoice(prune=prune), inside: LayerChoice(w_bits=8, a_bits=8)})
    assert parts == 0.0 and 0 < bits < 0.5  # the group reaches the int8 layer, whose delta shrinks with its MACs


def test_int8_on_a_decomposed_or_separable_unit_counts_what_int8_adds_to_that_form(vgg) -> None:
    """A dwsep unit in int8 quantizes two small convolutions: its bit-width part is timed on the dwsep form and
    counts only what int8 adds there, scaled by the share of the form's MACs that pruning leaves."""
    _, _, space, _ = vgg
    unit = next(u for u in space.units if "dwsep" in space.choices(u, "block"))
    dwsep, int8 = LayerChoice(block="dwsep"), LayerChoice(block="dwsep", w_bits=8, a_bits=8)
    assert (unit, int8) in table_entries(space)
    table = LatencyTable(_NoMeter(), lambda p: b"", key="k", space=space)  # type: ignore[arg-type]
    table.data["deltas"][table.entry_key(unit, dwsep)] = -0.01
    table.data["deltas"][table.entry_key(unit, int8)] = 0.09
    parts, bits, unscaled, _ = table.sums(Policy(layers={unit: LayerChoice(block="dwsep", w_bits=4, a_bits=8)},
                                                 fingerprint=space.fingerprint))
    assert parts == -0.01 and bits == pytest.approx(0.10) == unscaled  # the form counts, int8 adds 0.10 to it


def test_calibration_summed_another_way_is_timed_again(vgg, tmp_path) -> None:
    """Deltas outlive a change to how they are summed; the calibration points fitted to the old sums do not."""
    _, _, space, _ = vgg
    table = LatencyTable(_NoMeter(), lambda p: b"", key="k", cache_dir=tmp_path, space=space)  # type: ignore[arg-type]
    table.data["deltas"]["conv|{}"] = 0.1
    table.record(Policy(fingerprint=space.fingerprint), 1.0)
    assert LatencyTable(_NoMeter(), lambda p: b"", key="k", cache_dir=tmp_path,  # type: ignore[arg-type]
                        space=space).data["calibration"] == [[0.0, 0.0, 0.0, 0.0, 1.0]]
    stored = json.loads(table.path.read_text())
    stored["sums"] = 1  # as tables written before the current sums
    table.path.write_text(json.dumps(stored))
    again = LatencyTable(_NoMeter(), lambda p: b"", key="k", cache_dir=tmp_path, space=space)  # type: ignore[arg-type]
    assert again.data["calibration"] == [] and again.data["deltas"] == {"conv|{}": 0.1}
