"""The user's jobs through the CLI: a real (tiny) search, its front, applying a trial, and every bad input that
must end in one clear line with exit code 2 while the finished trials stay in the study."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from optuna.trial import TrialState

from squeezer.cli import main
import squeezer as jobs
from squeezer.evaluators.pool import PoolConfig
from squeezer.evaluators.settings import LatencyConfig, RecoveryConfig
from squeezer.search.config import LEGACY_SPACE, SearchConfig
from squeezer.inspection import FrontSummary
from squeezer.search.records import TrialRecord
from squeezer.search_job import SearchSummary, _warn_if_untrained, closest_to_budget

QUICK_LATENCY = LatencyConfig(runs=20, reps=2, warmup=5)
QUICK_RECOVERY = RecoveryConfig(bn_batches=4)
ONE = PoolConfig(workers=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 3-trial pruning search on a briefly trained ResNet-20 (digits), in the space searches had before
    the channel rounding and the prune grid were settings (so an older run folder can be made from it)."""
    root = tmp_path_factory.mktemp("jobs")
    jobs.train(model="resnet20", data="digits", out=root / "base.pt", steps=60)
    summary = jobs.search_policies(model=str(root / "base.pt"), data="digits", budget="macs<=60%", out=root / "run",
                                   trials=3, search=SearchConfig(knobs=("prune",), **LEGACY_SPACE),
                                   latency=QUICK_LATENCY,
                                   recovery=QUICK_RECOVERY, pool=ONE)
    assert summary.completed == 3 and summary.front
    return root / "run"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_search_writes_front_files_and_run_record(run: Path) -> None:
    for name in ("front.csv", "front.json", "front.html", "front.png", "run.json", "base.pt", "study.db"):
        assert (run / name).is_file(), name
    front = json.loads((run / "front.json").read_text())
    assert front["budget"] == "macs<=60%" and front["rows"]
    assert all(r["feasible"] and r["x"] <= 0.6 for r in front["rows"])
    assert len(list((run / "policies").glob("trial_*.json"))) == 3


def test_front_command_prints_the_table(capsys, run: Path) -> None:
    code, out, err = cli(capsys, "front", str(run), "--under", "macs<=60%")
    assert code == 0, err
    assert "Pareto front" in out and "most accurate under macs<=60%: trial" in out


def test_apply_reproduces_the_searched_numbers(capsys, run: Path, tmp_path: Path) -> None:
    from squeezer.evaluators.cost import count_macs
    from squeezer.models import load_checkpoint

    rows = json.loads((run / "front.json").read_text())["rows"]
    best = max(rows, key=lambda r: r["accuracy"])
    code, out, err = cli(capsys, "apply", str(run), "--trial", str(best["number"]), "--out", str(tmp_path / "s.pt"),
                         "--onnx", str(tmp_path / "s.onnx"))
    assert code == 0, err
    assert "latency / reference" in out  # the drift-proof latency comparison is shown beside the raw ms
    model, info = load_checkpoint(tmp_path / "s.pt")
    x = torch.randn(1, 1, 8, 8)
    macs, _ = count_macs(model, x)
    assert macs == best["macs"]
    assert abs(info["val_accuracy"] - best["accuracy"]) < 1e-9
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-3, atol=1e-4)
    # whoever deploys the model learns how raw images become its inputs: printed, in the checkpoint, in the ONNX file
    from squeezer.datasets import load_data

    digits = load_data("digits")
    assert info["input_mean"] == [round(m, 6) for m in digits.mean] and len(info["input_std"]) == 1
    assert f"mean {info['input_mean']} and std {info['input_std']}" in out
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "s.onnx")).metadata_props}
    assert meta["input_mean"] == info["input_mean"] and meta["input_range"] == "[0, 1]"
    raw = digits.val.x[:4] * torch.tensor(digits.std).view(1, -1, 1, 1) + torch.tensor(digits.mean).view(1, -1, 1, 1)
    assert 0.0 <= float(raw.min()) + 1e-5 and float(raw.max()) <= 1.0 + 1e-5  # those numbers undo the inputs


def test_report_writes_html(capsys, run: Path) -> None:
    code, out, err = cli(capsys, "report", str(run))
    assert code == 0 and (run / "report.html").is_file(), err


def test_front_and_apply_print_json_and_nothing_else_with_json(capsys, run: Path, tmp_path: Path) -> None:
    code, out, err = cli(capsys, "front", str(run), "--json", "--under", "macs<=60%")
    assert code == 0, err
    front = json.loads(out)  # the whole of stdout is one JSON document
    assert [r["number"] for r in front["front"]] == \
        [r["number"] for r in json.loads((run / "front.json").read_text())["rows"]]
    assert front["base"]["accuracy"] > 0 and front["best_under"]["number"] in [r["number"] for r in front["front"]]
    trial = max(front["front"], key=lambda r: r["accuracy"])["number"]
    code, out, err = cli(capsys, "apply", str(run), "--trial", str(trial), "--out", str(tmp_path / "s.pt"), "--json")
    assert code == 0, err
    applied = json.loads(out)
    assert applied["trial"] == trial and applied["out"] == str(tmp_path / "s.pt")
    assert applied["measured"]["macs"] == applied["searched"]["macs"] and 0 < applied["test_accuracy"] <= 1


def test_the_python_apply_returns_the_compressed_model(run: Path, tmp_path: Path) -> None:
    from squeezer.models import load_checkpoint

    trial = json.loads((run / "front.json").read_text())["rows"][0]["number"]
    summary = jobs.apply(run, trial=trial, out=tmp_path / "s.pt", latency=False)
    assert isinstance(summary.model, torch.nn.Module) and not summary.model.training
    x = torch.randn(2, 1, 8, 8)
    saved, _ = load_checkpoint(tmp_path / "s.pt")
    torch.testing.assert_close(summary.model(x), saved(x))


def test_apply_times_latency_only_when_the_run_measured_it(run: Path, tmp_path: Path) -> None:
    untimed = tmp_path / "untimed"
    jobs.search_policies(model=str(run / "base.pt"), data="digits", budget="macs<=60%", out=untimed, trials=1,
                         search=SearchConfig(knobs=("prune",)), latency="none", recovery=QUICK_RECOVERY, pool=ONE)
    summary = jobs.apply(untimed, trial=0, out=tmp_path / "s.pt")
    assert summary.measured.latency_ms is None and summary.measured.latency_source == "none"


def test_a_search_labels_its_base_and_prints_the_checkpoints_own_accuracy_and_the_dashboard(capsys) -> None:
    from squeezer import render
    from squeezer.evaluators.measurement import Measurement

    base = Measurement(accuracy=0.985, loss=0.1, macs=1000, params=10, bops=1000 * 32 * 32, size_mb=0.1,
                       latency_ms=None, recovery="bn", fingerprint="f", hardware={})
    render.search(SearchSummary(out=Path("runs/x"), base=base, budget="macs<=50%", metric_x="macs", front=[],
                                completed=3, failed=0, seconds=1.0, checkpoint_accuracy=0.9825,
                                dashboard="optuna-dashboard sqlite:///runs/x/study.db"))
    out = capsys.readouterr().out
    assert "base (BatchNorm re-estimated as for every candidate): accuracy 0.9850" in out
    assert "the model file as saved: accuracy 0.9825" in out
    assert "optuna-dashboard sqlite:///runs/x/study.db" in out


def test_train_names_its_checkpoint_after_the_model(tmp_path: Path, monkeypatch) -> None:
    from squeezer.cli import build_parser
    from squeezer.training import default_out

    assert build_parser().parse_args(["train", "--model", "vgg_small"]).out is None
    assert default_out("vgg_small") == Path("runs/vgg_small.pt")
    assert default_out("my_pkg.models:build_net") == Path("runs/build_net.pt")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "net.pt").write_bytes(b"")
    assert default_out("runs/net.pt") == Path("runs/net-trained.pt")  # never the model file it starts from


# ---- bad input: one line, exit code 2, nothing lost ------------------------------------------------------------------
@pytest.mark.parametrize("budget,needle", [("macs<=fifty", "cannot read 'macs<=fifty'"),
                                           ("speed<=2ms", "unknown metric 'speed'"),
                                           ("macs<=0.01%", "unreachable")])
def test_bad_budgets(capsys, run: Path, tmp_path: Path, budget: str, needle: str) -> None:
    code, _, err = cli(capsys, "search", "--model", str(run / "base.pt"), "--budget", budget, "--out",
                       str(tmp_path / "r"), "--knobs", "prune", "--latency", "none", "--workers", "1")
    one_line_error(code, err, needle)
    assert not (tmp_path / "r" / "run.json").exists()


def test_latency_threads_and_batch_reach_the_meter(capsys, run: Path, tmp_path: Path) -> None:
    code, _, err = cli(capsys, "search", "--model", str(run / "base.pt"), "--budget", "macs<=60%", "--out",
                       str(tmp_path / "t"), "--knobs", "prune", "--trials", "1", "--workers", "1",
                       "--latency-threads", "2", "--latency-batch", "2", "--latency-table-reps", "6",
                       "--channel-round", "4")
    assert code == 0, err
    info = json.loads((tmp_path / "t" / "run.json").read_text())
    assert info["channel_round"] == 4 and info["prune_grid"][-1] == 0.875  # a new run: the deeper grid
    assert info["eval"]["latency"]["threads"] == 2 and info["eval"]["latency"]["batch"] == 2
    assert info["eval"]["latency"]["table_reps"] == 6
    row = jobs.front(tmp_path / "t").front[0]
    assert row.hardware["threads"] == 2 and row.latency_ms > 0  # the fingerprint names the pinned threads
    assert row.policy is not None and row.policy.channel_round == 4  # what `apply` rebuilds it with


@pytest.mark.slow
def test_predicted_latency_search_builds_its_table_first(run: Path, tmp_path: Path) -> None:
    summary = jobs.search_policies(model=str(run / "base.pt"), data="digits", budget="latency<=90%", out=tmp_path / "p",
                                   trials=2, search=SearchConfig(knobs=("prune",)),
                                   latency=replace(QUICK_LATENCY, mode="predict"), recovery=QUICK_RECOVERY, pool=ONE)
    tables = list((tmp_path / "p" / "cache").glob("lut-*.json"))
    assert len(tables) == 1
    deltas = json.loads(tables[0].read_text())["deltas"]
    pruned = [u for u, k in jobs.space(model=str(run / "base.pt"), knobs=("prune",)).param_names()]
    assert len(deltas) >= len(pruned) and all(k.split("|")[0] in pruned for k in deltas)
    assert summary.completed == 2 and all(r.latency_source == "predicted" for r in summary.front)


def test_latency_budget_without_latency(capsys, run: Path, tmp_path: Path) -> None:
    code, _, err = cli(capsys, "search", "--model", str(run / "base.pt"), "--budget", "latency<=1ms", "--out",
                       str(tmp_path / "r"), "--latency", "none")
    one_line_error(code, err, "--latency none")


def test_out_folder_of_another_study(capsys, run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    code, _, err = cli(capsys, "search", "--model", str(run / "base.pt"), "--budget", "macs<=40%", "--out",
                       str(copy), "--knobs", "prune")
    one_line_error(code, err, "holds a different study", "choose another --out")
    assert len(jobs.front(copy).front) >= 1  # the finished trials are untouched


def test_recovery_settings_reach_the_run_and_a_resume_scored_otherwise_is_refused(capsys, run: Path,
                                                                                   tmp_path: Path) -> None:
    out = str(tmp_path / "kd")
    args = ["search", "--model", str(run / "base.pt"), "--budget", "macs<=60%", "--out", out, "--knobs", "prune",
            "--trials", "1", "--workers", "1", "--latency", "none", "--recovery", "kd", "--finetune-steps", "3",
            "--finetune-lr", "0.02", "--kd-temperature", "2", "--kd-weight", "0.7"]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    info = json.loads((tmp_path / "kd" / "run.json").read_text())["eval"]["recovery"]
    assert (info["mode"], info["finetune_steps"], info["finetune_lr"], info["kd_temperature"],
            info["kd_weight"]) == ("kd", 3, 0.02, 2.0, 0.7)
    code, _, err = cli(capsys, *args[:-4], "--kd-temperature", "3", "--kd-weight", "0.7")
    one_line_error(code, err, "scored with other evaluation settings", "kd_temperature 2.0 there, 3.0 now",
                   "choose another --out")
    code, _, err = cli(capsys, *args, "--trials", "2", "--bn-batches", "7")  # BN batches do not shape a kd score
    assert code == 0, err
    assert jobs.front(out).completed == 2


def test_the_cli_defaults_are_the_evaluators(tmp_path: Path) -> None:
    from squeezer.cli import build_parser

    args = build_parser().parse_args(["search", "--model", "m", "--budget", "macs<=50%", "--out", "o"])
    default = RecoveryConfig()
    assert (args.bn_batches, args.finetune_steps, args.finetune_lr, args.kd_temperature, args.kd_weight) == (
        default.bn_batches, default.finetune_steps, default.finetune_lr, default.kd_temperature, default.kd_weight)
    latency = LatencyConfig()
    assert (args.latency, args.latency_batch, args.latency_threads, args.latency_table_reps) == (
        latency.mode, latency.batch, latency.threads, latency.table_reps)


@pytest.mark.parametrize("flag, value, needle", [("--kd-weight", "1.5", "must be 0 to 1"),
                                                 ("--kd-temperature", "0", "must be above 0"),
                                                 ("--finetune-lr", "fast", "expected a number"),
                                                 ("--bn-batches", "0", "must be at least 1")])
def test_bad_recovery_settings_are_usage_errors(capsys, flag: str, value: str, needle: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["search", "--model", "m", "--budget", "macs<=50%", "--out", "o", flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"{flag}: {needle}" in err and "Traceback" not in err, err


def test_bad_evaluation_settings_from_python_say_which() -> None:
    with pytest.raises(ValueError, match="kd_weight"):
        RecoveryConfig(kd_weight=2.0)
    with pytest.raises(ValueError, match="bn_batches must be at least 1"):
        RecoveryConfig(bn_batches=0)


@pytest.mark.parametrize("args, needle", [
    (["apply", "RUN", "--trial", "0", "--out", "x.pt", "--finetune-steps", "-3"],
     "--finetune-steps: must be 0 or more"),
    (["apply", "RUN", "--trial", "-1", "--out", "x.pt"], "--trial: must be 0 or more"),
    (["report", "RUN", "--trial", "-1"], "--trial: must be 0 or more"),
    (["search", "--model", "m.pt", "--budget", "macs<=50%", "--out", "o", "--promote", "-1"],
     "--promote: must be 0 or more"),
    (["search", "--model", "m.pt", "--budget", "macs<=50%", "--out", "o", "--trials", "0"],
     "--trials: must be at least 1"),
    (["train", "--steps", "-5"], "--steps: must be at least 1"),
    (["demo", "--trials", "-2"], "--trials: must be at least 1"),
])
def test_every_count_is_validated_alike(run: Path, args: list[str], needle: str) -> None:
    import subprocess
    import sys

    args = [str(run) if a == "RUN" else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "squeezer.cli", *args], capture_output=True, text=True)
    one_line_error(proc.returncode, proc.stderr, needle)


def test_counts_from_python_are_checked_too(run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="finetune_steps must be 0 or more"):
        jobs.apply(run, trial=0, out=tmp_path / "x.pt", finetune_steps=-1)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        jobs.train(out=tmp_path / "x.pt", steps=0)


def test_verbose_is_accepted_before_and_after_the_command(capsys, tmp_path: Path) -> None:
    for args in (["--verbose", "front", str(tmp_path / "nope")], ["front", str(tmp_path / "nope"), "--verbose"]):
        code, _, err = cli(capsys, *args)
        assert code == 2 and "Traceback" in err and "does not exist" in err, args
    code, _, err = cli(capsys, "front", str(tmp_path / "nope"))
    one_line_error(code, err, "does not exist")


def test_trial_not_in_study(capsys, run: Path, tmp_path: Path) -> None:
    code, _, err = cli(capsys, "apply", str(run), "--trial", "999", "--out", str(tmp_path / "x.pt"))
    one_line_error(code, err, "trial 999 is not a finished trial", "squeezer front")


def test_missing_run_folder(capsys, tmp_path: Path) -> None:
    code, _, err = cli(capsys, "front", str(tmp_path / "nope"))
    one_line_error(code, err, "does not exist")


def test_corrupted_policy_file(capsys, run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    code, _, err = cli(capsys, "apply", str(run), "--policy", str(bad), "--out", str(tmp_path / "x.pt"))
    one_line_error(code, err, str(bad))


def test_policy_for_another_model(capsys, run: Path, tmp_path: Path) -> None:
    from squeezer.models import mobilenetv2_small
    from squeezer.policies.policy import Policy
    from squeezer.spaces.space import SearchSpace

    other = SearchSpace.from_model(mobilenetv2_small(num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8))
    path = Policy.uniform(other, prune=0.25).save(tmp_path / "other.json")
    code, _, err = cli(capsys, "apply", str(run), "--policy", str(path), "--out", str(tmp_path / "x.pt"))
    one_line_error(code, err, "made for another model")


def test_unreachable_ray_address(capsys, run: Path, tmp_path: Path) -> None:
    code, _, err = cli(capsys, "search", "--model", str(run / "base.pt"), "--budget", "macs<=60%", "--out",
                       str(tmp_path / "r"), "--workers", "2", "--ray-address", "ray://127.0.0.1:9",
                       "--latency", "none")
    one_line_error(code, err, "no Ray cluster answers")


def test_a_search_summary_says_why_trials_failed(capsys) -> None:
    from squeezer import render
    from squeezer.evaluators.measurement import Measurement

    base = Measurement(accuracy=0.9, loss=0.1, macs=1000, params=10, bops=1000 * 32 * 32, size_mb=0.1,
                       latency_ms=None, recovery="bn", fingerprint="f", hardware={})
    summary = SearchSummary(out=Path("runs/x"), base=base, budget="macs<=50%", metric_x="macs", front=[],
                                 completed=3, failed=2, seconds=1.0,
                                 failures=[("the worker could not build its evaluator: ModelError: [gone.pt]", 2)])
    render.search(summary)
    out = capsys.readouterr().out
    assert "3 trials completed, 2 failed" in out
    assert "  2 failed: the worker could not build its evaluator: ModelError: [gone.pt]" in out


def test_an_untrained_model_is_searched_with_a_warning_that_says_so(tmp_path, caplog) -> None:
    import torch

    torch.manual_seed(0)  # the untrained model's initialisation, whatever ran before
    with caplog.at_level(logging.WARNING, logger="squeezer.search_job"):
        summary = jobs.search_policies(model="resnet20", data="digits", budget="macs<=60%", out=tmp_path / "run",
                                       trials=1, search=SearchConfig(knobs=("prune",)), recovery=QUICK_RECOVERY,
                                       pool=ONE, latency="none")
    assert summary.completed == 1
    assert "no better than always answering its commonest class" in caplog.text
    assert "squeezer train --model resnet20 --data digits" in caplog.text


def test_a_model_better_than_the_commonest_class_gets_no_such_warning(digits, caplog) -> None:

    with caplog.at_level(logging.WARNING, logger="squeezer.search_job"):
        _warn_if_untrained(SimpleNamespace(accuracy=0.2), digits, "base.pt", "digits")
    assert not caplog.text


def test_a_search_with_no_feasible_trial_names_the_closest_and_what_to_try(capsys) -> None:
    from squeezer import render
    from squeezer.evaluators.measurement import Measurement
    from squeezer.search.budget import Budget

    rows = [TrialRecord(number=0, state=TrialState.COMPLETE, accuracy=0.83, constraints=(0.329, -0.95)),
            TrialRecord(number=1, state=TrialState.COMPLETE, accuracy=0.94, constraints=(0.165, -0.97)),
            TrialRecord(number=2, state=TrialState.FAIL)]
    closest = closest_to_budget(rows, Budget.parse("latency<=60%,size<=1MB"), repair=False)
    assert closest["number"] == 1 and list(closest["over"]) == ["latency<=60%"] and "--repair" in closest["hint"]
    base = Measurement(accuracy=0.97, loss=0.1, macs=1000, params=10, bops=1.0, size_mb=0.1)
    render.search(SearchSummary(out=Path("runs/x"), base=base, budget="latency<=60%,size<=1MB", metric_x="latency",
                                front=[], completed=2, failed=1, seconds=3.0, closest=closest))
    out = capsys.readouterr().out
    assert "no trial met the budget; the closest, trial 1 (accuracy 0.9400), missed latency<=60% by 16.5%" in out
    assert "next: squeezer apply" not in out

    render.front(FrontSummary(out=Path("runs/x"), base=base, budget="latency<=60%,size<=1MB", metric_x="latency",
                              front=[], completed=2, closest=closest))
    assert "the closest, trial 1 (accuracy 0.9400), missed latency<=60% by 16.5%" in capsys.readouterr().out


def test_the_summaries_say_how_far_the_latency_table_was_from_the_timings(capsys) -> None:
    from squeezer import render
    from squeezer.evaluators.measurement import Measurement
    from squeezer.search.latency_margin import prediction_error

    done, failed = TrialState.COMPLETE, TrialState.FAIL
    rows = [TrialRecord(number=0, state=done, latency_source="measured", latency_rel=1.0, latency_predicted=0.9),
            TrialRecord(number=1, state=done, latency_source="measured", latency_rel=0.8, latency_predicted=0.84),
            TrialRecord(number=2, state=done, latency_source="measured", latency_rel=0.5, latency_predicted=0.6),
            TrialRecord(number=3, state=done, latency_source="predicted", latency_rel=0.7),  # not timed: no check
            TrialRecord(number=4, state=failed, latency_source="measured", latency_rel=2.0, latency_predicted=0.1)]
    check = prediction_error(rows)
    assert check["timed"] == 3 and round(check["median_error"], 4) == 0.1 and round(check["median_ratio"], 4) == 0.9524
    assert prediction_error(rows[3:]) is None
    base = Measurement(accuracy=0.97, loss=0.1, macs=1000, params=10, bops=1.0, size_mb=0.1)
    render.search(SearchSummary(out=Path("runs/x"), base=base, budget="latency<=60%", metric_x="latency",
                                front=[], completed=4, failed=1, seconds=3.0, latency_check=check))
    line = ("latency table: predicted the 3 candidates it was checked on within 10.0% (median; measured / predicted "
            "0.95)")
    assert line in capsys.readouterr().out
    render.front(FrontSummary(out=Path("runs/x"), base=base, budget="latency<=60%", metric_x="latency", front=[],
                              completed=4, latency_check=check))
    assert line in capsys.readouterr().out


def test_the_python_api_searches_a_model_and_tensors_held_in_memory(run: Path, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    from squeezer.models import load_checkpoint

    model, _ = load_checkpoint(run.parent / "base.pt")
    d = load_digits()
    x, y = torch.from_numpy(d.images[:, None] / 16.0).float(), torch.from_numpy(d.target)
    summary = jobs.search_policies(model=model, data=(x, y), budget="macs<=60%", out=tmp_path / "mem", trials=2,
                                   search=SearchConfig(knobs=("prune",)), recovery=QUICK_RECOVERY, pool=ONE,
                                   latency="none")
    assert summary.completed == 2 and summary.base.accuracy > 0.5 and summary.front
    saved = json.loads((tmp_path / "mem/run.json").read_text())  # found by path by workers, resumes and apply
    assert Path(saved["model"]).name.startswith("model-") and Path(saved["data"]).name.startswith("data-")
    best = max(summary.front, key=lambda r: r.accuracy)
    with pytest.raises(ValueError, match="pass --trust-pickle again"):  # its base.pt is the module, pickled
        jobs.apply(tmp_path / "mem", trial=best.number, out=tmp_path / "small.pt")
    applied = jobs.apply(tmp_path / "mem", trial=best.number, out=tmp_path / "small.pt", trust_pickle=True)
    assert applied.measured.accuracy == pytest.approx(best.accuracy) and applied.measured.macs == best.macs
    assert (applied.recorded.number, applied.recorded.macs) == (best.number, best.macs)  # what apply compared with


def test_a_run_folder_written_before_the_configs_resumes_and_applies(run: Path, tmp_path: Path) -> None:
    """run.json as earlier versions wrote it (every evaluation setting one level deep under "eval") still reads:
    the search resumes it with the settings it was scored with, and `apply` rebuilds them from it."""
    old = tmp_path / "old"
    shutil.copytree(run, old)
    info = json.loads((old / "run.json").read_text())
    (old / "run.json").write_text(json.dumps({
        "model": info["model"], "data": info["data"], "fingerprint": info["fingerprint"], "budget": "macs<=60%",
        "objective": "multi", "knobs": ["prune"], "sampler": "tpe", "seed": 0,
        "eval": {"recovery": "bn", "bn_batches": 4, "finetune_steps": 50, "finetune_lr": 0.01, "kd_weight": 0.5,
                 "kd_temperature": 4.0, "batch_size": 64, "latency": "measure", "latency_batch": 1,
                 "latency_threads": None, "latency_warmup": 5, "latency_runs": 20, "latency_reps": 2,
                 "latency_table_reps": 3, "measure_every": 5, "distill_steps": 0, "device": "cpu", "seed": 0}}))
    summary = jobs.search_policies(model=str(run.parent / "base.pt"), data="digits", budget="macs<=60%", out=old,
                                   trials=4, search=SearchConfig(knobs=("prune",)), latency=QUICK_LATENCY,
                                   recovery=QUICK_RECOVERY, pool=ONE)
    assert summary.completed == 4  # three resumed, one new
    written = json.loads((old / "run.json").read_text())  # rewritten as now, the space as it searched
    assert written["eval"]["recovery"]["bn_batches"] == 4
    assert (written["channel_round"], tuple(written["prune_grid"])) == (8, LEGACY_SPACE["prune_grid"])
    with pytest.raises(ValueError, match="channel_round 8 there, 4 now"):
        jobs.search_policies(model=str(run.parent / "base.pt"), data="digits", budget="macs<=60%", out=old, trials=5,
                             search=SearchConfig(knobs=("prune",), channel_round=4), latency=QUICK_LATENCY,
                             recovery=QUICK_RECOVERY, pool=ONE)
    with pytest.raises(ValueError, match="bn_batches 4 there, 5 now"):
        jobs.search_policies(model=str(run.parent / "base.pt"), data="digits", budget="macs<=60%", out=old, trials=5,
                             search=SearchConfig(knobs=("prune",)), latency=QUICK_LATENCY,
                             recovery=RecoveryConfig(bn_batches=5), pool=ONE)


def test_a_folder_stopped_before_its_first_trial_starts_afresh(capsys, run: Path, tmp_path: Path) -> None:
    """A search killed before its first trial leaves its settings (run.json, perhaps base.pt) and no study: the
    folder has no trial to lose, so a search there (with those settings or others) starts afresh, and the readers
    say that nothing is recorded yet."""
    folder = tmp_path / "stopped"
    folder.mkdir()
    info = json.loads((run / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**info, "budget": "macs<=40%", "trials": 9}))
    (folder / "base.pt").write_bytes(b"not read: the base of a search that recorded nothing")
    code, _, err = cli(capsys, "front", str(folder))
    one_line_error(code, err, "holds no trial yet", "run the search again")
    summary = jobs.search_policies(model=str(run.parent / "base.pt"), data="digits", budget="macs<=60%",
                                   out=folder, trials=1, search=SearchConfig(knobs=("prune",)), latency="none",
                                   recovery=QUICK_RECOVERY, pool=ONE)
    assert summary.completed == 1 and summary.budget == "macs<=60%"
    assert json.loads((folder / "run.json").read_text())["budget"] == "macs<=60%"  # this search's settings
    assert torch.load(folder / "base.pt", weights_only=True)  # the model searched, saved in place of the leftover


@pytest.fixture(scope="module")
def hybrid_search(run: Path, tmp_path_factory) -> SimpleNamespace:
    """A one-worker search that times every other candidate and predicts the rest (--latency hybrid), repairs into
    a latency limit by the lookup table and promotes a trial: every evaluator a search can build, in one process.
    Counts the model's traces and the timings recorded into the table."""
    from squeezer.evaluators.latency import LatencyTable
    from squeezer.search.pareto import StudyResult
    from squeezer.spaces.space import SearchSpace

    traced, recorded = [], []
    trace, record = SearchSpace.from_model.__func__, LatencyTable.record
    out = tmp_path_factory.mktemp("hybrid") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SearchSpace, "from_model", classmethod(lambda cls, *a, **k: traced.append(1) or
                                                             trace(cls, *a, **k)))
        patch.setattr(LatencyTable, "record", lambda self, policy, rel: recorded.append((policy, rel)) or
                      record(self, policy, rel))
        summary = jobs.search_policies(model=str(run.parent / "base.pt"), data="digits", budget="latency<=95%",
                                       out=out, trials=4, search=SearchConfig(knobs=("prune",), repair=True, promote=1),
                                       latency=replace(QUICK_LATENCY, mode="hybrid", measure_every=2),
                                       recovery=RecoveryConfig(bn_batches=4, finetune_steps=3), pool=ONE)
    return SimpleNamespace(summary=summary, rows=StudyResult.load(out).rows, traced=len(traced), recorded=recorded)


@pytest.mark.slow  # its fixture runs a whole hybrid, repaired, promoted search
def test_a_one_worker_search_traces_the_model_once(hybrid_search: SimpleNamespace) -> None:
    """The driver's space serves the in-process evaluator, the one building the latency table and the one
    promoting trials."""
    assert hybrid_search.summary.completed == 4
    assert any(r.fidelity == "finetune" for r in hybrid_search.rows)  # the promoting evaluator ran
    assert hybrid_search.traced == 1


@pytest.mark.slow  # its fixture runs a whole hybrid, repaired, promoted search
def test_a_hybrid_repaired_search_records_each_timed_candidate_into_the_table_once(
        hybrid_search: SimpleNamespace) -> None:
    timed = [r for r in hybrid_search.rows if r.completed and r.latency_source == "measured"]
    assert timed
    for row in timed:
        policy = json.dumps(row.policy.to_json()["layers"], sort_keys=True)
        times = [rel for p, rel in hybrid_search.recorded
                 if json.dumps(p.to_json()["layers"], sort_keys=True) == policy]
        assert times == [pytest.approx(row.latency_rel)]
    calibration = 16  # the random policies the table is fitted to before the search
    assert len(hybrid_search.recorded) == calibration + len(timed)


def test_the_side_by_side_says_plainly_what_compression_bought(tmp_path, capsys) -> None:
    from squeezer import render
    from squeezer.side_by_side import Column, SideBySide

    base = Column(onnx=tmp_path / "base.onnx", test_accuracy=0.98, macs=1000, onnx_bytes=4000, latency_ms=0.2)
    fast = SideBySide(base=base, compressed=Column(onnx=tmp_path / "compressed.onnx", test_accuracy=0.97, macs=400,
                                                   onnx_bytes=1000, latency_ms=0.1))
    render.side_by_side(fast)
    said = capsys.readouterr().out
    assert fast.faster and fast.smaller and "2.00x faster" in said and "4.0x smaller" in said
    slow = SideBySide(base=base, compressed=Column(onnx=tmp_path / "compressed.onnx", test_accuracy=0.98, macs=1000,
                                                   onnx_bytes=1000, latency_ms=0.3))
    render.side_by_side(slow)
    assert not slow.faster and "buys size only" in capsys.readouterr().out


def test_apply_fine_tunes_with_hints_on_a_folder_of_unlabelled_images(capsys, run: Path, tmp_path: Path) -> None:
    from PIL import Image

    from squeezer.evaluators.data import DataConfig
    from squeezer.models import load_checkpoint

    folder = tmp_path / "images"  # a flat folder: no class folders, no labels
    folder.mkdir()
    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    trial = json.loads((run / "front.json").read_text())["rows"][0]["number"]
    summary = jobs.apply(run, trial=trial, out=tmp_path / "s.pt", latency=False, finetune_steps=2,
                         data_config=DataConfig(recovery_data=str(folder)), hint_weight=10.0, at_weight=50.0)
    assert summary.finetuned and 0 < summary.test_accuracy <= 1  # scored on the labelled digits
    model, _ = load_checkpoint(tmp_path / "s.pt")
    assert set(torch.load(tmp_path / "s.pt", weights_only=True)["state_dict"]) == set(model.state_dict())
    assert not any("adapter" in k for k in model.state_dict())  # the hint adapters were dropped after recovery
    code, out, err = cli(capsys, "apply", str(run), "--trial", str(trial), "--out", str(tmp_path / "t.pt"),
                         "--at-weight", "50")  # the run recovered by BatchNorm only: nothing would train
    one_line_error(code, err, "add --finetune-steps N")
