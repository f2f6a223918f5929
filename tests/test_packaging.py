"""The squeezer.* packages must come from this repository's top-level folders, not from another PyPI package."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
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
FOLDER = {"squeezer." + p: p for p in LAYERS[:-1]}


def _module_name(path: Path) -> str:
    folder = path.parent.name
    stem = path.stem
    package = "squeezer" if folder == "squeezer" else f"squeezer.{folder}"
    return package if stem == "__init__" else f"{package}.{stem}"


def _imports(path: Path) -> set[str]:
    """Every squeezer module `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("squeezer"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("squeezer"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for layer in LAYERS for path in (ROOT / layer).glob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS[:-1] else len(LAYERS) - 1


def test_lower_packages_never_import_higher_ones() -> None:
    wrong = [f"{a} imports {b}" for a, targets in _graph().items() for b in targets if _layer(b) > _layer(a)]
    assert not wrong, wrong


def test_no_module_imports_itself_through_others() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


PUBLIC_ORDER = 'import squeezer, sys; names = sys.argv[1:]; [getattr(squeezer, n) for n in names]; ' \
               'assert all(callable(getattr(squeezer, n)) for n in names if n != "__version__"), names'


@pytest.mark.parametrize("order", ["forward", "reverse", "packages-first"])
def test_every_public_name_means_one_thing_whatever_is_touched_first(order: str) -> None:
    """A public function is never shadowed by a package bound to the same name by a later import."""
    import squeezer

    names = list(squeezer.__all__)
    if order == "reverse":
        names.reverse()
    preamble = "import squeezer.search.budget, squeezer.spaces.space, squeezer.evaluators.pool, " \
               "squeezer.policies.apply; " if order == "packages-first" else ""
    done = subprocess.run([sys.executable, "-c", preamble + PUBLIC_ORDER, *names], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_public_api_resolves() -> None:
    import squeezer

    for name in squeezer.__all__:
        assert getattr(squeezer, name) is not None, name
    with pytest.raises(AttributeError):
        squeezer.no_such_thing  # noqa: B018
