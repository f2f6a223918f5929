"""The squeezer.* packages must come from this repository's top-level folders, not from another PyPI package."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package,folder", [
    ("squeezer", "squeezer"), ("squeezer.spaces", "spaces"), ("squeezer.policies", "policies"),
    ("squeezer.evaluators", "evaluators"), ("squeezer.search", "search"),
])
def test_package_resolves_to_repo_folder(package: str, folder: str) -> None:
    module = importlib.import_module(package)
    assert Path(module.__file__).resolve().parent == ROOT / folder


LAYERS = ["spaces", "policies", "evaluators", "search", "squeezer"]


@pytest.mark.parametrize("index", range(len(LAYERS)))
def test_lower_packages_never_import_higher_ones(index: int) -> None:
    higher = [f"squeezer.{p}" if p != "squeezer" else "squeezer.cli" for p in LAYERS[index + 1:]]
    for path in (ROOT / LAYERS[index]).glob("*.py"):
        text = path.read_text()
        for name in higher:
            assert f"from {name}" not in text and f"import {name}" not in text, f"{path} imports {name}"


def test_public_api_resolves() -> None:
    import squeezer

    for name in squeezer.__all__:
        assert getattr(squeezer, name) is not None, name
    with pytest.raises(AttributeError):
        squeezer.no_such_thing  # noqa: B018
