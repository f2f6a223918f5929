"""Bad input gets one clear line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from squeezer.cli import main
from squeezer.models import arch_recipe, resnet20, save_checkpoint


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


@pytest.fixture(scope="module")
def wrong_checkpoint(tmp_path_factory) -> Path:
    """A resnet20 checkpoint whose weights are for 3 input channels but which claims 1."""
    path = tmp_path_factory.mktemp("ckpt") / "bad.pt"
    model = resnet20(num_classes=10, in_channels=3)
    save_checkpoint(model, path, recipe=arch_recipe("resnet20", num_classes=10, in_channels=1))
    return path


def test_unknown_model_name(capsys) -> None:
    code, err = run_cli(capsys, "space", "--model", "resnet999x")
    assert code == 2 and "unknown model 'resnet999x'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_builder_that_fails_to_import(capsys) -> None:
    code, err = run_cli(capsys, "space", "--model", "no_such_module_xyz:build")
    assert code == 2 and "cannot import 'no_such_module_xyz'" in err


def test_builder_missing_function(capsys) -> None:
    code, err = run_cli(capsys, "space", "--model", "squeezer.models:nothing_here")
    assert code == 2 and "has no callable 'nothing_here'" in err


def test_checkpoint_that_does_not_match(capsys, wrong_checkpoint) -> None:
    code, err = run_cli(capsys, "space", "--model", str(wrong_checkpoint))
    assert code == 2 and "does not match model 'resnet20'" in err


def test_missing_checkpoint(capsys, tmp_path) -> None:
    code, err = run_cli(capsys, "space", "--model", str(tmp_path / "nope.pt"))
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"state_dict": sd, "epoch": 3}])
def test_a_state_dict_is_refused_with_how_to_pass_its_architecture(capsys, tmp_path, wrap) -> None:
    import torch

    from squeezer.models import build_model

    torch.save(wrap(build_model("resnet20", in_channels=1).state_dict()), tmp_path / "weights.pt")
    code, err = run_cli(capsys, "space", "--model", str(tmp_path / "weights.pt"))
    assert code == 2 and "holds weights only (a state_dict)" in err and "--model ARCH --weights" in err
    assert len(err.strip().splitlines()) == 1
    assert run_cli(capsys, "space", "--model", "resnet20", "--weights", str(tmp_path / "weights.pt"))[0] == 0


def test_a_training_scripts_checkpoint_holding_the_model_loads_when_trusted(capsys, tmp_path) -> None:
    from squeezer.models import build_model

    torch.save({"model": build_model("resnet20", in_channels=1), "epoch": 3}, tmp_path / "last.pt")
    code, err = run_cli(capsys, "space", "--model", str(tmp_path / "last.pt"))
    assert code == 2 and "--trust-pickle" in err
    assert run_cli(capsys, "space", "--model", str(tmp_path / "last.pt"), "--trust-pickle")[0] == 0


def test_missing_data_path(capsys, tmp_path) -> None:
    code, err = run_cli(capsys, "space", "--model", "resnet20", "--data", str(tmp_path / "images"))
    assert code == 2 and "not found" in err


def test_unknown_knob(capsys) -> None:
    code, err = run_cli(capsys, "space", "--model", "resnet20", "--knobs", "prune,sparsity")
    assert code == 2 and "unknown knob 'sparsity'" in err


def test_cuda_without_gpu(capsys, tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    code, err = run_cli(capsys, "train", "--device", "cuda", "--out", str(tmp_path / "m.pt"), "--steps", "1")
    assert code == 2 and "no CUDA GPU" in err


def test_workers_zero_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "squeezer.cli", "search", "--model", "resnet20", "--budget",
                           "macs<=50%", "--out", "x", "--workers", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--workers: must be at least 1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_every_command_has_help_with_an_example() -> None:
    for command in ["train", "space", "search", "front", "apply", "report", "demo"]:
        proc = subprocess.run([sys.executable, "-m", "squeezer.cli", command, "--help"], capture_output=True,
                              text=True)
        assert proc.returncode == 0 and "example:" in proc.stdout and "squeezer " + command in proc.stdout
        # no noise: a default is shown where it says something, once
        help_text = " ".join(proc.stdout.split())
        assert "(default: None)" not in help_text and "(default: False)" not in help_text, command
        assert not re.search(r"\(default[^)]*\) \(default", help_text), command  # named twice


def test_a_pickled_model_whose_module_is_elsewhere_names_it_and_loads_from_its_folder(capsys, tmp_path,
                                                                                      monkeypatch) -> None:
    """A trusted pickle of a model whose classes live in the user's module needs that module to load."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods/squeezer_user_cnn.py").write_text(
        "import torch.nn as nn\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(1, 8, 3)\n"
        "        self.fc = nn.Linear(8, 10)\n\n"
        "    def forward(self, x):\n        return self.fc(self.conv(x).mean((2, 3)))\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    import squeezer_user_cnn

    torch.save(squeezer_user_cnn.Net(), tmp_path / "model.pt")
    sys.modules.pop("squeezer_user_cnn")
    sys.path.remove(str(tmp_path / "mods"))
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "space", "--model", "model.pt", "--trust-pickle")
    assert code == 2 and "needs module 'squeezer_user_cnn'" in err and "run from the folder that holds it" in err
    monkeypatch.chdir(tmp_path / "mods")
    try:
        assert run_cli(capsys, "space", "--model", str(tmp_path / "model.pt"), "--trust-pickle")[0] == 0
    finally:
        sys.modules.pop("squeezer_user_cnn", None)
