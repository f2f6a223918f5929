"""Safe, portable artifacts: no job unpickles a model file unless told to trust it, a compressed model is a
state_dict plus its recipe, policy files are refused in one short line however they are malformed, and the timing
lock cannot be redirected by another user."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import squeezer
from squeezer.cli import main
from squeezer.evaluators.latency import MachineLock
from squeezer.models import ModelError, load_model, resnet20
from squeezer.policies.policy import Policy, PolicyError
from squeezer.spaces.knobs import KNOBS
from squeezer.spaces.space import SearchSpace

TINY_NET = '''from torch import nn


def net(num_classes=3, in_channels=1):
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
'''
TINY = "squeezer_safety_tiny:net"
TINY_UNITS = ("0", "3", "6", "11")
# Every knob on the tiny net: int8 units (BatchNorm folded, outputs quantized), 4-bit activations, a pruned group,
# a decomposed and a depthwise-separable unit.
EVERY_KNOB = {"0": {"prune": 0.5, "w_bits": 8, "a_bits": 8}, "3": {"rank": 0.5, "w_bits": 4, "a_bits": 4},
              "6": {"block": "dwsep", "w_bits": 6, "a_bits": 8}, "11": {"w_bits": 4}}


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


class _CreatesFile:
    """Unpickling this calls open(marker, 'w'): a file that appears is code run from the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(autouse=True)
def own_lock_dir(tmp_path_factory, monkeypatch) -> None:
    """The timing lock of these tests alone: other test sessions on the machine do not hold it."""
    monkeypatch.setenv("SQUEEZER_LOCK_DIR", str(tmp_path_factory.mktemp("locks")))


@pytest.fixture(params=["bare", "disguised"])
def malicious(request, tmp_path) -> tuple[Path, Path]:
    """A checkpoint whose pickle creates a file when loaded: alone, or inside what looks like squeezer's format."""
    marker = tmp_path / "pwned"
    payload = _CreatesFile(marker)
    if request.param == "disguised":
        payload = {"squeezer_checkpoint": 1, "info": {}, "arch": "resnet20", "state_dict": {"w": payload}}
    torch.save(payload, tmp_path / "evil.pt")
    assert not marker.exists()
    return tmp_path / "evil.pt", marker


@pytest.fixture()
def policy_file(tmp_path) -> Path:
    space = SearchSpace.from_model(resnet20(num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8))
    return Policy.uniform(space, prune=0.5).save(tmp_path / "policy.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A tiny builder on sys.path and tiny data: enough for `squeezer apply` to run end to end in about a second."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "squeezer_safety_tiny.py").write_text(TINY_NET)
    sys.path.insert(0, str(root))
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(120, 1, 8, 8, generator=generator), torch.arange(120) % 3
    data = squeezer.save_data((x, y), root / "tiny.pt")
    model = load_model(TINY, num_classes=3, in_channels=1)
    fingerprint = SearchSpace.from_model(model, x[:1]).fingerprint
    yield {"data": data, "fingerprint": fingerprint, "root": str(root)}
    sys.path.remove(str(root))
    sys.modules.pop("squeezer_safety_tiny", None)


# ---- nothing unpickles a model file by default ----------------------------------------------------------------------
def test_space_refuses_a_malicious_checkpoint(capsys, malicious) -> None:
    path, marker = malicious
    code, err = cli(capsys, "space", "--model", str(path))
    one_line(code, err, "pickles Python objects", "--trust-pickle", "--model ARCH --weights FILE")
    assert not marker.exists()


def test_search_refuses_a_malicious_checkpoint(capsys, malicious, tmp_path) -> None:
    path, marker = malicious
    code, err = cli(capsys, "search", "--model", str(path), "--budget", "macs<=50%", "--out", str(tmp_path / "r"),
                    "--latency", "none", "--workers", "1")
    one_line(code, err, "--trust-pickle")
    assert not marker.exists() and not (tmp_path / "r" / "run.json").exists()


def test_resuming_refuses_a_malicious_base(capsys, malicious, tmp_path) -> None:
    import contextlib
    import sqlite3

    path, marker = malicious
    (tmp_path / "r").mkdir()
    path.rename(tmp_path / "r" / "base.pt")
    with contextlib.closing(sqlite3.connect(tmp_path / "r" / "study.db")) as db:  # a study: the folder resumes
        db.execute("CREATE TABLE studies (study_id INTEGER)")
    code, err = cli(capsys, "search", "--model", "resnet20", "--budget", "macs<=50%", "--out", str(tmp_path / "r"),
                    "--latency", "none", "--workers", "1")
    one_line(code, err, "base.pt", "--trust-pickle")
    assert not marker.exists()


def test_apply_refuses_a_malicious_checkpoint(capsys, malicious, policy_file, tmp_path) -> None:
    path, marker = malicious
    code, err = cli(capsys, "apply", "--policy", str(policy_file), "--model", str(path), "--out",
                    str(tmp_path / "small.pt"))
    one_line(code, err, "--trust-pickle")
    assert not marker.exists() and not (tmp_path / "small.pt").exists()


def test_applying_from_a_run_folder_refuses_its_malicious_base(capsys, malicious, policy_file, tmp_path) -> None:
    import optuna

    from squeezer.run_folder import write_run
    from squeezer.search.config import RunConfig

    path, marker = malicious
    run = tmp_path / "r"
    run.mkdir()
    optuna.create_study(storage=f"sqlite:///{run / 'study.db'}", study_name="squeezer")
    write_run(run, RunConfig(model="resnet20", data="digits", fingerprint="0"))
    path.rename(run / "base.pt")
    capsys.readouterr()
    code, err = cli(capsys, "apply", str(run), "--policy", str(policy_file), "--out", str(tmp_path / "small.pt"))
    one_line(code, err, "--trust-pickle")
    assert not marker.exists() and not (tmp_path / "small.pt").exists()


def test_weights_and_load_refuse_a_malicious_file(capsys, malicious) -> None:
    path, marker = malicious
    code, err = cli(capsys, "space", "--model", "resnet20", "--weights", str(path))
    one_line(code, err, "is not a state_dict", "torch.save(model.state_dict(), FILE)")
    with pytest.raises(ModelError, match="--trust-pickle"):
        squeezer.load(path)
    assert not marker.exists()


def test_a_whole_module_loads_only_with_trust_pickle(capsys, tmp_path) -> None:
    model = resnet20(num_classes=10, in_channels=1)
    torch.save(model, tmp_path / "whole.pt")
    code, err = cli(capsys, "space", "--model", str(tmp_path / "whole.pt"))
    one_line(code, err, "squeezer.zoo.CifarResNet", "--trust-pickle", "--weights")
    assert cli(capsys, "space", "--model", str(tmp_path / "whole.pt"), "--trust-pickle")[0] == 0
    loaded = load_model(str(tmp_path / "whole.pt"), trust_pickle=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_state_dict_loads_into_the_architecture_model_names(capsys, tmp_path) -> None:
    model = resnet20(num_classes=10, in_channels=1)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    assert cli(capsys, "space", "--model", "resnet20", "--data", "digits", "--weights",
               str(tmp_path / "weights.pt"))[0] == 0
    loaded = load_model("resnet20", in_channels=1, weights=tmp_path / "weights.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    code, err = cli(capsys, "space", "--model", "vgg_small", "--weights", str(tmp_path / "weights.pt"))
    one_line(code, err, "do not match model 'vgg_small'")


def test_a_trained_checkpoint_is_plain_data(tiny, tmp_path) -> None:
    result = squeezer.train(model=TINY, data=tiny["data"], out=tmp_path / "tiny.pt", steps=2)
    payload = torch.load(result.path, weights_only=True)
    assert payload["arch"] == TINY and (payload["num_classes"], payload["in_channels"]) == (3, 1)
    trained = squeezer.load(result.path)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), payload["state_dict"].values()))


def test_a_base_from_a_trusted_pickle_needs_trust_again_to_resume(tmp_path) -> None:
    from squeezer.models import save_checkpoint

    save_checkpoint(resnet20(num_classes=10, in_channels=1), tmp_path / "base.pt", recipe=None)
    assert "pickled_module" in torch.load(tmp_path / "base.pt", weights_only=True)
    with pytest.raises(ModelError, match="pass --trust-pickle again"):
        squeezer.load(tmp_path / "base.pt")
    assert isinstance(squeezer.load(tmp_path / "base.pt", trust_pickle=True), torch.nn.Module)


# ---- a compressed model is a state_dict plus its recipe ------------------------------------------------------------
@pytest.fixture(scope="module")
def applied(tiny, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """The tiny net compressed by every knob through `squeezer.apply`, and the module apply saved."""
    import squeezer.apply_job as apply_job
    from squeezer.policies.policy import LayerChoice

    root = tmp_path_factory.mktemp("applied")
    layers = {unit: LayerChoice(**knobs) for unit, knobs in EVERY_KNOB.items()}
    Policy(layers=layers, fingerprint=tiny["fingerprint"]).save(root / "policy.json")
    saved: list[torch.nn.Module] = []
    save = apply_job.save_checkpoint

    def keep(model: torch.nn.Module, path: Path, **kwargs) -> Path:
        saved.append(model)
        return save(model, path, **kwargs)

    apply_job.save_checkpoint = keep
    try:
        squeezer.apply(policy=root / "policy.json", model=TINY, data=tiny["data"], out=root / "small.pt",
                       latency=False)
    finally:
        apply_job.save_checkpoint = save
    return root / "small.pt", saved[0]


def test_load_rebuilds_exactly_the_model_apply_produced(applied) -> None:
    path, produced = applied
    payload = torch.load(path, weights_only=True)
    assert payload["base"]["arch"] == TINY and payload["policy"]["layers"] == EVERY_KNOB
    assert {"val_accuracy", "test_accuracy", "input_mean", "input_std", "data"} <= set(payload["info"])
    rebuilt = squeezer.load(path)
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), produced(x))
    assert rebuilt.state_dict().keys() == produced.state_dict().keys()


def test_a_compressed_model_trains_on_and_keeps_its_recipe(capsys, applied, tiny, tmp_path) -> None:
    code, err = cli(capsys, "train", "--model", str(applied[0]), "--data", tiny["data"], "--steps", "1", "--out",
                    str(tmp_path / "tuned.pt"))
    assert code == 0, err
    payload = torch.load(tmp_path / "tuned.pt", weights_only=True)
    assert payload["base"]["arch"] == TINY and payload["policy"]["layers"] == EVERY_KNOB
    tuned = squeezer.load(tmp_path / "tuned.pt")
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), payload["state_dict"].values()))


def test_load_says_in_one_line_when_the_base_architecture_cannot_be_imported(applied, tmp_path) -> None:
    payload = torch.load(applied[0], weights_only=True)
    payload["base"]["arch"] = "squeezer_no_such_module:net"
    torch.save(payload, tmp_path / "moved.pt")
    with pytest.raises(ModelError, match="cannot import 'squeezer_no_such_module'") as info:
        squeezer.load(tmp_path / "moved.pt")
    assert "\n" not in str(info.value)


def test_a_policy_that_names_no_model_needs_no_model_check(capsys, tiny, tmp_path) -> None:
    path = Policy(layers={}, fingerprint="").save(tmp_path / "p.json")
    args = ["apply", "--policy", str(path), "--model", TINY, "--data", tiny["data"], "--out", str(tmp_path / "s.pt")]
    code, err = cli(capsys, *args)
    one_line(code, err, "names no model", "--no-model-check")
    assert cli(capsys, *args, "--no-model-check")[0] == 0 and (tmp_path / "s.pt").is_file()


# ---- policy files: refused in one short line --------------------------------------------------------------------
@pytest.mark.parametrize("text,needle", [
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ('{"format": "squeezer.policy", "version": 1, "layers": {}, "meta": ' + '{"a": ' * 100 + "1" + "}" * 101,
     "'meta' nests more than"),
    ('{"format": "' + "x" * 100_000 + '"}', "not a squeezer policy"),
    ('{"format": "squeezer.policy", "version": 1, "layers": {"' + "u" * 100_000 + '": {}}}', "not in the model"),
    ('{"format": "squeezer.policy", "version": 1, "layers": {"fc": {"w_bits": ' + "9" * 5000 + "}}}",
     "not valid JSON"),
])
def test_malformed_policy_files_are_refused_in_one_short_line(tmp_path, text, needle) -> None:
    path = tmp_path / "p.json"
    path.write_text(text)
    space = SearchSpace.from_model(resnet20(num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8))
    with pytest.raises(PolicyError, match=needle) as info:
        Policy.load(path).validate(space)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


@st.composite
def policy_texts(draw, fingerprint: str) -> str:
    """Policy files as a user or an attacker might write them: documents right or wrong in every field, deep
    nesting in any place, values far too long, and text that is no JSON at all."""
    kind = draw(st.sampled_from(["plausible", "plausible", "document", "document", "nested", "raw"]))
    if kind == "raw":
        return draw(st.one_of(st.text(max_size=30), st.just("9" * 5000), st.just('{"a": "\\ud800"}')))
    if kind == "nested":
        depth = draw(st.integers(20, 3000))
        deep = "[" * depth + "]" * depth
        return draw(st.sampled_from([
            deep,
            f'{{"format": "squeezer.policy", "version": 1, "fingerprint": "{fingerprint}", "meta": {deep}}}',
            f'{{"format": "squeezer.policy", "version": 1, "layers": {{"3": {{"prune": {deep}}}}}}}',
            f'{{"format": "squeezer.policy", "version": 1, "layers": {{"3": {deep}}}}}',
        ]))
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(), st.text(max_size=8),
                     st.just("v" * 100_000))
    if kind == "plausible":  # well formed, for this model, mostly with choices it offers
        offered = {"prune": [0.5, 0.25], "w_bits": [8, 4, 2, 7], "a_bits": [8, 4, 16], "rank": [0.5, 0.25, 0.3],
                   "block": ["dwsep", "keep", "bottleneck"]}
        knobs = st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in offered.items()})
        layers = st.dictionaries(st.sampled_from(TINY_UNITS), knobs, max_size=3)
        return json.dumps({"format": "squeezer.policy", "version": 1, "fingerprint": fingerprint,
                           "meta": draw(st.dictionaries(st.text(max_size=5), leaf, max_size=2)),
                           "layers": draw(layers)})
    value = st.one_of(leaf, st.sampled_from([0.5, 0.25, 2, 4, 8, 32, "dwsep", "keep"]))
    unit = st.one_of(st.sampled_from(TINY_UNITS), st.text(max_size=8), st.just("u" * 100_000))
    choices = st.one_of(st.dictionaries(st.sampled_from(tuple(KNOBS) + ("bogus",)), value, max_size=3), leaf)
    document = draw(st.fixed_dictionaries({}, optional={
        "format": st.sampled_from(["squeezer.policy"] * 4 + ["other", "f" * 100_000]),
        "version": st.sampled_from([1, 1, 1, 2, "1", True, 10**300]),
        "fingerprint": st.sampled_from([fingerprint] * 3 + ["", "0123456789abcdef", 5, "p" * 100_000]),
        "meta": st.one_of(st.dictionaries(st.text(max_size=5), leaf, max_size=3), leaf),
        "layers": st.one_of(st.dictionaries(unit, choices, max_size=3), leaf),
    }))
    return json.dumps(document)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_policy_file_is_applied_or_refused_with_exit_code_2(capsys, tiny, tmp_path, data) -> None:
    path = tmp_path / "policy.json"
    path.write_text(data.draw(policy_texts(tiny["fingerprint"])))
    code, err = cli(capsys, "apply", "--policy", str(path), "--model", TINY, "--data", tiny["data"], "--out",
                    str(tmp_path / "small.pt"))
    assert code in (0, 2), err
    if code == 2:
        one_line(code, err)
        assert len(err) < 400, err


# ---- the timing lock ----------------------------------------------------------------------------------------------
def test_the_lock_lives_in_a_private_directory_of_this_user(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SQUEEZER_LOCK_DIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    lock = MachineLock()
    folder = tmp_path / f"squeezer-{os.getuid()}"
    assert lock.rw.parent == folder and lock.gate.parent == folder
    assert os.stat(folder).st_mode & 0o777 == 0o700
    with lock.compute():
        pass
    assert lock.rw.is_file()


def test_the_lock_refuses_a_planted_link(tmp_path) -> None:
    lock = MachineLock(tmp_path)
    target = tmp_path / "someone_elses_file"
    lock.rw.symlink_to(target)
    with pytest.raises(FileExistsError, match="is a link"):
        with lock.compute():
            pass
    with pytest.raises(FileExistsError, match="is a link"):
        with lock.timing():
            pass
    assert not target.exists()


def test_the_lock_refuses_a_directory_that_is_a_link_or_not_ours(tmp_path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / f"squeezer-{os.getuid()}").symlink_to(elsewhere)
    with pytest.raises(FileExistsError, match="is a link"):
        MachineLock(tmp_path / "shared")
    if os.getuid() != 0:
        return  # only root can hand a directory to another user
    theirs = tmp_path / "theirs" / f"squeezer-{os.getuid()}"
    theirs.mkdir(parents=True)
    os.chown(theirs, 12345, 12345)
    with pytest.raises(FileExistsError, match="owned by user 12345"):
        MachineLock(tmp_path / "theirs")


def test_the_run_folders_lock_refuses_a_planted_link(tmp_path) -> None:
    from squeezer.search.errors import SearchError
    from squeezer.search.run_lock import holding_folder

    target = tmp_path / "someone_elses_file"
    target.write_text("theirs")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "search.lock").symlink_to(target)
    with pytest.raises(SearchError, match="search.lock' is a link: remove it"):
        with holding_folder(tmp_path / "run"):
            pass
    assert target.read_text() == "theirs"


# ---- the fuzz's hardest cases, every run (hypothesis draws them only now and then) ---------------------------------
DEEP = "[" * 1500 + "]" * 1500
HUGE = "v" * 100_000


@pytest.mark.parametrize("document,needle", [
    (DEEP, "nests too deeply"),
    ('{"format": "squeezer.policy", "version": 1, "fingerprint": "FP", "meta": ' + DEEP + "}", "nests"),
    ('{"format": "squeezer.policy", "version": 1, "fingerprint": "FP", "layers": {"3": ' + DEEP + "}}", "nests"),
    ('{"format": "squeezer.policy", "version": 1, "fingerprint": "FP", "layers": {"3": {"prune": ' + DEEP + "}}}",
     "nests"),
    (json.dumps({"format": "squeezer.policy", "version": 1, "fingerprint": HUGE, "layers": {}}), "another model"),
    (json.dumps({"format": HUGE}), "not a squeezer policy"),
    (json.dumps({"format": "squeezer.policy", "version": 1, "fingerprint": "FP", "layers": {HUGE: {}}}), "unit"),
    (json.dumps({"format": "squeezer.policy", "version": 1, "fingerprint": "FP", "layers": {"3": {"block": HUGE}}}),
     ""),
    (json.dumps({"format": "squeezer.policy", "version": 1, "fingerprint": "", "layers": {}}), "names no model"),
    (json.dumps({"format": "squeezer.policy", "version": 1, "layers": {"3": {"prune": 0.5}}}), "names no model"),
], ids=["deep-document", "deep-meta", "deep-unit", "deep-value", "huge-fingerprint", "huge-format", "huge-unit",
        "huge-value", "empty-fingerprint", "missing-fingerprint"])
def test_deep_huge_and_unnamed_policies_are_refused_in_one_short_line(capsys, tiny, tmp_path, document,
                                                                     needle) -> None:
    path = tmp_path / "policy.json"
    path.write_text(document.replace('"FP"', json.dumps(tiny["fingerprint"])))
    code, err = cli(capsys, "apply", "--policy", str(path), "--model", TINY, "--data", tiny["data"], "--out",
                    str(tmp_path / "small.pt"))
    one_line(code, err, needle)
    assert len(err) < 400 and "v" * 100 not in err, err
    assert not (tmp_path / "small.pt").exists()


# ---- bad search inputs: exit code 2, one line, nothing written -------------------------------------------------------
def test_data_holding_nan_is_refused_in_one_line(capsys, tiny, tmp_path) -> None:
    from squeezer.evaluators.data import DataError

    x, y = torch.rand(60, 1, 8, 8), torch.arange(60) % 3
    x[7, 0, 2, 2] = float("nan")
    x[9, 0, 0, 0] = float("inf")
    torch.save((x, y), tmp_path / "nan.pt")
    code, err = cli(capsys, "search", "--model", TINY, "--data", str(tmp_path / "nan.pt"), "--budget", "macs<=50%",
                    "--out", str(tmp_path / "r"), "--latency", "none", "--workers", "1")
    one_line(code, err, "2 images hold NaN or infinite pixel values")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["search.lock"]
    with pytest.raises(DataError, match="split 'train': 2 images hold NaN"):  # in memory: refused before it is saved
        squeezer.search_policies(model=TINY, data=(x, y), out=tmp_path / "m", budget="macs<=50%", latency="none")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["search.lock"]
    code, err = cli(capsys, "train", "--model", TINY, "--data", str(tmp_path / "nan.pt"), "--out",
                    str(tmp_path / "t.pt"))
    one_line(code, err, "NaN")


def test_out_naming_a_file_is_refused_in_one_line(capsys, tmp_path) -> None:
    (tmp_path / "taken").write_text("mine")
    for out, needle in ((tmp_path / "taken", "is an existing file, not a folder"),
                        (tmp_path / "taken" / "run", "cannot create output folder")):
        code, err = cli(capsys, "search", "--model", "resnet20", "--budget", "macs<=50%", "--out", str(out),
                        "--latency", "none", "--workers", "1")
        one_line(code, err, needle)
    assert (tmp_path / "taken").read_text() == "mine"
    long = tmp_path / ("x" * 200)
    long.write_text("")
    code, err = cli(capsys, "search", "--model", "resnet20", "--budget", "macs<=50%", "--out", str(long))
    one_line(code, err, "...")
    assert "x" * 100 not in err


def test_interrupted_trials_are_reported_as_such_not_as_failures(capsys) -> None:
    from optuna.trial import TrialState

    from squeezer import render
    from squeezer.evaluators.measurement import Measurement
    from squeezer.search.records import TrialRecord
    from squeezer.search_job import SearchSummary, failure_counts

    rows = [TrialRecord(number=n, state=TrialState.FAIL, stale=True) for n in range(3)]
    rows.append(TrialRecord(number=3, state=TrialState.FAIL, fail_reason="cannot prune"))
    failed, interrupted = failure_counts(rows)
    assert interrupted == 3 and dict(failed) == {"cannot prune": 1}
    base = Measurement(accuracy=0.97, loss=0.1, macs=1000, params=10, bops=1.0, size_mb=0.1)
    render.search(SearchSummary(out=Path("runs/x"), base=base, budget="macs<=50%", metric_x="macs", front=[],
                                completed=5, failed=1, seconds=3.0, failures=failed.most_common(3),
                                interrupted=interrupted))
    out = capsys.readouterr().out
    assert "1 failed: cannot prune" in out and "no reason recorded" not in out
    assert "3 interrupted when a search was stopped, and queued again" in out
