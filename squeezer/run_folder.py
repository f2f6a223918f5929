"""The run folder a search writes: its settings (run.json), the exact base model, and in-memory inputs saved by path.

A folder holds one study. Its settings are written once, after the checks that refuse a folder holding another
study, so a resumed search scores exactly as the one it resumes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from squeezer.search.config import RunConfig, check_resume, run_from_json, run_to_json

__all__ = ["BASE_FILE", "RUN_FILE", "abs_ref", "check_run", "read_run", "saved_inputs", "write_run"]

RUN_FILE = "run.json"
BASE_FILE = "base.pt"  # the exact base model a run searched (a torchvision name alone would re-initialise)


def abs_ref(ref: str) -> str:
    """Model/data references that are files or folders are stored absolute, so a run folder can be used anywhere."""
    path = Path(ref)
    return str(path.resolve()) if path.exists() else ref


def read_run(run: str | Path) -> RunConfig:
    """The settings a run folder was searched with (run.json, as written now or by earlier versions)."""
    path = Path(run) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a squeezer run folder (no {RUN_FILE}): pass the --out "
                                "folder of a `squeezer search`")
    return run_from_json(json.loads(path.read_text()))


def write_run(out: Path, run: RunConfig) -> None:
    """Record the run's settings (after `check_run` has refused a folder holding another study)."""
    path = out / RUN_FILE
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run_to_json(run), indent=2) + "\n")


def check_run(out: Path, run: RunConfig) -> None:
    """Refuse early (before any evaluation) to resume a folder holding a different study."""
    path = out / RUN_FILE
    if path.is_file():
        check_resume(json.loads(path.read_text()), run_to_json(run), out=out)


def saved_inputs(model: Any, data: Any, out: Path) -> tuple[str, str]:
    """A model (nn.Module) or data (image and label tensors) given in memory through the Python API, saved into the
    run folder so the workers, a resumed search and `apply` find it by path like any other reference. Files are
    named by their content: a folder holding another study keeps its own."""
    import hashlib
    import io

    import torch

    from squeezer.datasets import image_splits

    def save_once(obj: Any, stem: str) -> str:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        path = out / f"{stem}-{hashlib.sha1(buffer.getvalue()).hexdigest()[:12]}.pt"
        if not path.is_file():
            out.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buffer.getvalue())
        return str(path)

    if isinstance(model, torch.nn.Module):
        model = save_once(model, "model")
    if not isinstance(data, str):
        data = save_once(image_splits(data, "the data given"), "data")
    return model, data
