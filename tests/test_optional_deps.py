"""The core job needs only the required dependencies: Ray, the plots, the bundled data and CMA-ES are extras."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

OPTIONAL = ("ray", "plotly", "matplotlib", "sklearn", "mlxtend", "cmaes")

BLOCKER = f"""
import importlib.abc, importlib.util, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ImportError(f"{{name}} is blocked for this test")
        return None
sys.meta_path.insert(0, Block())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in {OPTIONAL!r} else _find_spec(name, *a)
from squeezer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_search_runs_and_writes_its_front_without_any_optional_package(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save((torch.rand(240, 1, 8, 8), torch.arange(240) % 4), tmp_path / "data.pt")
    out = tmp_path / "run"
    args = ["search", "--model", "resnet20", "--data", str(tmp_path / "data.pt"), "--budget", "macs<=60%",
            "--trials", "2", "--workers", "1", "--latency", "none", "--knobs", "prune", "--bn-batches", "2",
            "--out", str(out)]
    done = subprocess.run([sys.executable, "-c", BLOCKER, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "front.csv").is_file() and (out / "front.json").is_file()
    assert not (out / "front.html").exists() and not (out / "front.png").exists()


def test_bundled_data_without_its_package_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from squeezer.datasets import load_data
    from squeezer.evaluators.data import DataError

    monkeypatch.setitem(sys.modules, "sklearn", None)  # an import of it now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match=r"pip install 'squeezer\[data\]'"):
        load_data("digits")
