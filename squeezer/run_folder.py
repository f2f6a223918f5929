"""The run folder a search writes: its settings (run.json), the exact base model, and in-memory inputs saved by path.

A folder holds one study. Its settings are written once, after the checks that refuse a folder holding another
study, so a resumed search scores exactly as the one it resumes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["BASE_FILE", "RUN_FILE", "abs_ref", "check_run", "read_run", "saved_inputs", "write_run"]

RUN_FILE = "run.json"
BASE_FILE = "base.pt"  # the exact base model a run searched (a torchvision name alone would re-initialise)


def abs_ref(ref: str) -> str:
    """Model/data references that are files or folders are stored absolute, so a run folder can be used anywhere."""
    path = Path(ref)
    return str(path.resolve()) if path.exists() else ref


def read_run(run: str | Path) -> dict[str, Any]:
    path = Path(run) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a squeezer run folder (no {RUN_FILE}): pass the --out "
                                "folder of a `squeezer search`")
    return json.loads(path.read_text())


def write_run(out: Path, settings: dict[str, Any]) -> None:
    """Record the run's settings (after `check_run` has refused a folder holding another study)."""
    path = out / RUN_FILE
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def check_run(out: Path, settings: dict[str, Any]) -> None:
    """Refuse early (before any evaluation) to resume a folder holding a different study."""
    path = out / RUN_FILE
    if path.is_file():
        _write_run_check(json.loads(path.read_text()), settings, out)


def _write_run_check(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    for key in ("fingerprint", "budget", "objective", "knobs", "sampler"):
        if old.get(key) != new.get(key):
            raise FileExistsError(
                f"output folder {str(out)!r} holds a different study ({key} {old.get(key)!r} there, "
                f"{new.get(key)!r} now): choose another --out or delete the folder")
    if "eval" in old:  # trials scored another way would share one front with the new ones
        there, now = _scoring(old["eval"]), _scoring(new["eval"])
        changed = [k for k in sorted(set(there) | set(now)) if there.get(k) != now.get(k)]
        if changed:
            diff = ", ".join(f"{k} {there.get(k)!r} there, {now.get(k)!r} now" for k in changed)
            raise FileExistsError(
                f"output folder {str(out)!r} holds a study scored with other evaluation settings ({diff}): resume "
                "with the settings it was started with, or choose another --out")


def _scoring(settings: dict[str, Any]) -> dict[str, Any]:
    from squeezer.evaluators.evaluate import EvalSettings

    known = set(EvalSettings.__dataclass_fields__)
    return EvalSettings(**{k: v for k, v in settings.items() if k in known}).scoring()


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
