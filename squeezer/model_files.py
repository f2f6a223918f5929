"""Model files: what squeezer writes (a recipe beside a state_dict, plain data that torch.load reads with
weights_only=True), what it reads from elsewhere (a state_dict, a training script's {'state_dict', 'arch'}), and
the formats it cannot compress, each refused in one line that says what to pass instead.

A recipe says how to build a model's structure again without unpickling code: {"arch", "num_classes",
"in_channels"} for a zoo/torchvision/builder reference (with "weights", the torchvision weights it was built for,
and "head", a classifier replaced for other classes), or {"base": the base model's record, "policy",
"input_shape"} for a compressed model. With "weights" comes "weights_shapes", the shape of each tensor of their
file, so the builder can build the same structure with no file at hand.
"""
from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from squeezer.builders import build_model, cwd_on_path, torchvision_name
from squeezer.heads import find_head, head_classes, replace_head
from squeezer.model_error import ModelError
from squeezer.pretrained import build_pretrained, weights_entry

__all__ = ["NESTING", "PICKLE_WAYS", "Recipe", "arch_recipe", "build_for_state", "build_recipe", "compressed_recipe",
           "load", "load_checkpoint", "load_file", "load_state", "model_record", "read_state_file",
           "save_checkpoint", "state_dict_in", "weights_shapes"]

Recipe = dict[str, Any]

PICKLE_WAYS = ("pass --trust-pickle (Python: trust_pickle=True) if you trust who made it, or save the model's "
               "state_dict, torch.save(model.state_dict(), FILE), and pass --model ARCH --weights FILE")
NESTING = 8  # compressed models of compressed models one file may hold: a crafted file cannot recurse without end
# Program files hold a graph, not the nn.Module a policy is applied to; each line names how to get its weights out.
PROGRAMS = {
    "torchscript": ("a TorchScript program (torch.jit.save)", "torch.jit.load(PATH).state_dict()"),
    "export": ("a torch.export program (torch.export.save)", "torch.export.load(PATH).state_dict"),
}


def arch_recipe(ref: str, *, num_classes: int, in_channels: int, weights: str | None = None,
                shapes: dict[str, list[int]] | None = None, head: str | None = None) -> Recipe:
    recipe: Recipe = {"arch": ref, "num_classes": num_classes, "in_channels": in_channels}
    if weights is not None:
        recipe["weights"], recipe["weights_shapes"] = weights, shapes
    if head is not None:
        recipe["head"] = head
    return recipe


def compressed_recipe(base: nn.Module, base_recipe: Recipe | None, *, policy: dict[str, Any],
                      input_shape: Sequence[int]) -> Recipe:
    """A compressed model's recipe: its base model's record and the policy applied to it, on inputs shaped so."""
    return {"base": model_record(base, base_recipe), "policy": policy, "input_shape": [int(n) for n in input_shape]}


def model_record(model: nn.Module, recipe: Recipe | None) -> dict[str, Any]:
    """What a file stores to rebuild `model`: its recipe and state_dict. A model with no recipe came from a trusted
    pickle, which names no architecture; it is stored pickled, as bytes only trust_pickle unpickles, so the file
    itself still reads with weights_only=True."""
    if recipe is not None:
        return {**recipe, "state_dict": model.state_dict()}
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return {"pickled_module": torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)}


def save_checkpoint(model: nn.Module, path: str | Path, *, recipe: Recipe | None, **info: Any) -> Path:
    """Save `model` as its `model_record` with `info` (plain metadata: numbers, strings, lists and dicts of them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"squeezer_checkpoint": 1, "info": info, **model_record(model, recipe)}, path)
    return path


def state_dict_in(payload: Any) -> dict[str, torch.Tensor] | None:
    """A plain state_dict, or one wrapped as training scripts save it ({'state_dict': ...} or {'model': ...}); the
    'module.' prefix nn.DataParallel puts on every key is taken off."""
    if not isinstance(payload, dict):
        return None
    inner = payload.get("state_dict", payload.get("model", payload))
    if not (isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values())):
        return None
    if all(isinstance(k, str) and k.startswith("module.") for k in inner):
        return {k[len("module."):]: v for k, v in inner.items()}
    return inner


def _program_kind(path: Path) -> str | None:
    """'torchscript' or 'export' for a program archive (read as a zip listing: nothing in it is unpickled)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith(("/archive_format", "serialized_exported_program.json")) for n in names):
        return "export"
    return None


def _refuse_programs(path: Path, role: str) -> None:
    kind = _program_kind(path)
    if kind is not None:
        what, weights = PROGRAMS[kind]
        raise ModelError(f"{role} {str(path)!r} is {what}, a compiled graph, not the nn.Module squeezer compresses: "
                         f"pass --model ARCH --weights FILE, with FILE saved by torch.save({weights}, FILE) or "
                         "torch.save(model.state_dict(), FILE)")


def _unpickle(source: Path | io.BytesIO, path: Path) -> Any:
    """torch.load of a pickle the user trusts, importing the model's module from the current folder if need be."""
    def read() -> Any:
        if isinstance(source, io.BytesIO):
            source.seek(0)
        return torch.load(source, map_location="cpu", weights_only=False)

    try:
        try:
            return read()
        except ModuleNotFoundError as exc:  # a pickled model whose classes live in the user's module
            if not cwd_on_path(exc.name):
                raise ModelError(f"checkpoint {str(path)!r} needs module {exc.name!r}, which defines the model's "
                                 "classes: run from the folder that holds it, or put it on PYTHONPATH") from None
            return read()
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot unpickle checkpoint {str(path)!r} ({type(exc).__name__}): is it a torch.save "
                         "file?") from None


def _read(path: Path, *, trust_pickle: bool) -> Any:
    """The file's content, read with weights_only=True; a pickle of Python objects only with `trust_pickle`."""
    _refuse_programs(path, "checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f"Python objects ({found.group(1)[:80]})" if found else "Python objects"
            raise ModelError(f"checkpoint {str(path)!r} pickles {what}, as torch.save(model) does, and is refused "
                             f"because unpickling it can run any code the file holds: {PICKLE_WAYS}") from None
    except Exception as exc:
        raise ModelError(f"cannot read checkpoint {str(path)!r} ({type(exc).__name__}): is it a torch.save "
                         "file?") from None
    return _unpickle(path, path)


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict file's tensors, read with weights_only=True (a wrapped or DataParallel one too)."""
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist: check the path")
    _refuse_programs(path, "weights file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = "it pickles Python objects" if isinstance(exc, pickle.UnpicklingError) else type(exc).__name__
        raise ModelError(f"weights file {str(path)!r} is not a state_dict ({reason}): save the weights with "
                         "torch.save(model.state_dict(), FILE), which loads without unpickling code") from None
    state = state_dict_in(payload)
    if state is None:
        raise ModelError(f"weights file {str(path)!r} holds a {type(payload).__name__}, not a state_dict: save the "
                         "weights with torch.save(model.state_dict(), FILE)")
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: str, target: str) -> None:
    """Load `state` into `model`, or say in one line which weights do not fit which model."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        verb = "do" if source.startswith("weights ") else "does"
        raise ModelError(f"{source} {verb} not match {target} ({str(exc).strip().splitlines()[0][:200]})") from None


def build_for_state(ref: str, state: dict[str, torch.Tensor], *, num_classes: int,
                    in_channels: int) -> tuple[nn.Module, int]:
    """The architecture `ref` built for the classes `state` was trained on: its final classifier's output count in
    the state_dict when that differs from `num_classes` (so a 1000-class checkpoint loads, and is then checked
    against the data's classes in one line). Returns the model and its class count."""
    model = build_model(ref, num_classes=num_classes, in_channels=in_channels)
    head = find_head(model, num_classes)
    saved = head_classes(state, head) if head is not None else None
    if saved is not None and saved != num_classes:
        return build_model(ref, num_classes=saved, in_channels=in_channels), saved
    return model, num_classes


def weights_shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """The shape of every tensor of a pretrained weights file, recorded in the recipe: enough for torchvision's
    builder to build its model again (some build more than they keep, as GoogLeNet's auxiliary classifiers) with no
    file at hand."""
    return {key: list(value.shape) for key, value in state.items()}


def build_recipe(recipe: Recipe, state: dict[str, torch.Tensor], *, source: str) -> nn.Module:
    """The model an architecture recipe describes, with `state` loaded: built by torchvision's builder as for the
    pretrained weights it names (handed zeros shaped as their file's tensors: nothing is read), its classifier
    replaced where the recipe says one was."""
    arch, num_classes, head = recipe["arch"], int(recipe["num_classes"]), recipe.get("head")
    in_channels = int(recipe["in_channels"])
    if recipe.get("weights"):
        entry = weights_entry(arch, str(recipe["weights"]))
        shapes = recipe.get("weights_shapes")
        if not isinstance(shapes, dict):
            raise ModelError(f"{source} names weights {recipe['weights']} but not their shapes: is it a file "
                             "squeezer wrote?")
        handed = {key: torch.zeros([int(n) for n in shape]) for key, shape in shapes.items()}
        model = build_pretrained(torchvision_name(arch) or arch, entry, handed, in_channels=in_channels)
    else:
        model = build_model(arch, num_classes=num_classes, in_channels=in_channels)
    if head is not None and head_classes(model.state_dict(), head) != num_classes:
        replace_head(model, head, num_classes)
    load_state(model, state, source=source, target=f"model {arch!r}")
    return model


def _field(record: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    value = record.get(key)
    if not isinstance(value, kind):
        raise ModelError(f"checkpoint {str(path)!r} is not a model file squeezer can read ({key!r} is missing or "
                         f"holds a {type(value).__name__}): write it with squeezer or torch.save")
    return value


def _rebuild(record: dict[str, Any], info: dict[str, Any], path: Path, *, trust_pickle: bool,
             depth: int = 0) -> tuple[nn.Module, Recipe | None]:
    """The model a record describes, its saved weights loaded, and its recipe (None for a pickled module)."""
    if "pickled_module" in record:
        if not trust_pickle:
            raise ModelError(f"checkpoint {str(path)!r} holds its model pickled (it was made from a pickle, which "
                             "names no architecture to rebuild it from), and unpickling can run any code the file "
                             "holds: pass --trust-pickle again (Python: trust_pickle=True), as when it was made")
        data = _field(record, "pickled_module", torch.Tensor, path)
        return _unpickle(io.BytesIO(data.numpy().tobytes()), path), None
    if "module" in record:  # an older squeezer's whole-module file: read at all only with trust_pickle
        return _field(record, "module", nn.Module, path), None
    state = _field(record, "state_dict", dict, path)
    if "base" not in record:
        recipe = arch_recipe(_field(record, "arch", str, path),
                             num_classes=int(record.get("num_classes", info.get("num_classes", 10))),
                             in_channels=int(record.get("in_channels", info.get("in_channels", 3))),
                             weights=record.get("weights"), shapes=record.get("weights_shapes"),
                             head=record.get("head"))
        return build_recipe(recipe, state, source=f"checkpoint {str(path)!r}"), recipe
    if depth >= NESTING:
        raise ModelError(f"checkpoint {str(path)!r} nests more than {NESTING} compressed models: is it "
                         "a file squeezer wrote?")
    # Imported here: torch-pruning's import is needed only by compressed files.
    from squeezer.policies.apply import apply_policy
    from squeezer.policies.policy import Policy

    base, base_recipe = _rebuild(_field(record, "base", dict, path), info, path, trust_pickle=trust_pickle,
                                 depth=depth + 1)
    policy, shape = _field(record, "policy", dict, path), _field(record, "input_shape", list, path)
    if not all(isinstance(n, int) and n > 0 for n in shape):
        raise ModelError(f"checkpoint {str(path)!r} records no input shape (got {str(shape)[:80]}): is it a "
                         "file squeezer wrote?")
    # The policy's structure on any input of the right shape; the saved state_dict then sets every weight.
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    model = apply_policy(base, Policy.from_json(policy), example_inputs=example)
    load_state(model, state, source=f"checkpoint {str(path)!r}", target="its compressed model")
    return model, compressed_recipe(base, base_recipe, policy=policy, input_shape=shape)


def load_file(path: Path, *, trust_pickle: bool, num_classes: int = 10,
              in_channels: int = 3) -> tuple[nn.Module, Recipe | None, dict[str, Any]]:
    """A model file -> (model, its recipe or None for a pickle, its info). `num_classes` and `in_channels` are
    the first guess for a training script's {'state_dict', 'arch'}, which records neither."""
    if not path.is_file():
        raise ModelError(f"checkpoint {str(path)!r} does not exist: check the path or run `squeezer train` first")
    payload = _read(path, trust_pickle=trust_pickle)
    if isinstance(payload, nn.Module):
        return payload, None, {}
    wrapped = payload.get("model") if isinstance(payload, dict) and "squeezer_checkpoint" not in payload else None
    if isinstance(wrapped, nn.Module):
        return wrapped, None, {}  # a training script's {'model': model, 'epoch': ...}
    if not isinstance(payload, dict) or "squeezer_checkpoint" not in payload:
        state = state_dict_in(payload)
        if state is not None and isinstance(payload.get("arch"), str):  # as torchvision's reference scripts save
            model, classes = build_for_state(payload["arch"], state, num_classes=num_classes,
                                             in_channels=in_channels)
            load_state(model, state, source=f"checkpoint {str(path)!r}", target=f"model {payload['arch']!r}")
            recipe = arch_recipe(payload["arch"], num_classes=classes, in_channels=in_channels)
            return model, recipe, {"arch": payload["arch"]}
        if state is not None:
            raise ModelError(f"checkpoint {str(path)!r} holds weights only (a state_dict), not the model: pass the "
                             f"architecture they belong to and the file, --model ARCH --weights {path}")
        raise ModelError(f"checkpoint {str(path)!r} holds a {type(payload).__name__}, not a model: save the "
                         "nn.Module's state_dict and pass --model ARCH --weights FILE, or use `squeezer train`")
    info = dict(payload["info"]) if isinstance(payload.get("info"), dict) else {}
    model, recipe = _rebuild(payload, info, path, trust_pickle=trust_pickle)
    if recipe is not None and "arch" in recipe:
        info["arch"] = recipe["arch"]
    return model, recipe, info


def load_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A model and its info from a file `save_checkpoint` wrote; a pickled module (`torch.save(model)`) only with
    `trust_pickle`, since unpickling runs code from the file."""
    model, _, info = load_file(Path(path), trust_pickle=trust_pickle)
    return model, info


def load(path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """A model squeezer saved (`squeezer apply`'s compressed model, `squeezer train`'s checkpoint), in eval mode.

    Rebuilt from plain data, so loading runs no code from the file: the base architecture is built, the policy is
    applied to it, and the saved weights are loaded. Only a model that came from a pickle needs `trust_pickle`."""
    return load_checkpoint(path, trust_pickle=trust_pickle)[0].eval()
