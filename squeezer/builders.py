"""Architecture references -> untrained models: a zoo name, a torchvision name, or a `package.module:function`."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, Callable

from torch import nn

from squeezer.model_error import ModelError
from squeezer.zoo import ZOO

__all__ = ["FILE_SUFFIXES", "build_model", "builder_for", "cwd_on_path", "is_checkpoint", "is_file_ref",
           "torchvision_name"]

FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pt2")


def torchvision_name(ref: str) -> str | None:
    """The torchvision model a reference names (`resnet18`, `torchvision:resnet18`), or None."""
    if ref in ZOO or (":" in ref and not ref.startswith("torchvision:")) or is_file_ref(ref):
        return None
    import torchvision

    name = ref.split(":", 1)[1] if ref.startswith("torchvision:") else ref
    return name if name.lower() in torchvision.models.list_models() else None


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        known = ", ".join(sorted(ZOO))
        raise ModelError(
            f"unknown model {name!r}: use a zoo name ({known}), a torchvision name such as 'resnet18', "
            "'package.module:function', or a checkpoint path"
        ) from None

    def build(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        # Untrained: pretrained weights come from the local hub cache only, by `squeezer.pretrained`.
        model = builder(weights=None, num_classes=num_classes)
        if in_channels != 3:
            _adapt_first_conv(model, in_channels)
        return model

    return build


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                            module.dilation, module.groups, module.bias is not None)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            return


def cwd_on_path(missing: str | None) -> bool:
    """Put the current folder on sys.path if it holds the `missing` module; True if that changed anything.

    As `uvicorn module:app` does: `squeezer` is a console script, so the folder it is run from is not on sys.path.
    The folder goes on PYTHONPATH as well, for the worker processes started later (local ones and a local Ray's),
    which unpickle the model's classes from that module."""
    cwd, name = os.getcwd(), (missing or "").split(".")[0]
    if not name or cwd in sys.path or not (Path(cwd, name).is_dir() or Path(cwd, name + ".py").is_file()):
        return False
    sys.path.insert(0, cwd)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (cwd, os.environ.get("PYTHONPATH")) if p)
    return True


def _import_from_cwd(module_name: str) -> Any:
    """Import `module_name`, also from the current folder (`cwd_on_path`)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name.split(".")[0] or not cwd_on_path(exc.name):
            raise
        return importlib.import_module(module_name)


def _import_builder(ref: str) -> Callable[..., nn.Module]:
    module_name, _, func_name = ref.partition(":")
    try:
        module = _import_from_cwd(module_name)
    except Exception as exc:  # any import-time failure is the user's module, not ours
        raise ModelError(f"cannot import {module_name!r} for model {ref!r} ({type(exc).__name__}: {exc}): "
                         "run from the folder that holds it, or put it on PYTHONPATH") from None
    builder = getattr(module, func_name, None)
    if not callable(builder):
        raise ModelError(f"{module_name!r} has no callable {func_name!r}: check the function name in {ref!r}")
    return builder


def builder_for(ref: str) -> Callable[..., nn.Module]:
    """The function that builds an untrained model for a non-checkpoint reference."""
    if ref in ZOO:
        return ZOO[ref]
    if ref.startswith("torchvision:"):
        return _torchvision_builder(ref.split(":", 1)[1])
    if ":" in ref:
        return _import_builder(ref)
    return _torchvision_builder(ref)


def is_checkpoint(ref: str) -> bool:
    return ref.endswith(FILE_SUFFIXES) or Path(ref).is_file()


def is_file_ref(ref: str) -> bool:
    """A checkpoint path rather than a builder: `pkg.mod:fn` or `torchvision:name` may end like a file name."""
    return is_checkpoint(ref) and not ref.startswith("torchvision:") and ":" not in Path(ref).name


def build_model(ref: str, *, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """An untrained model from a zoo/torchvision/builder reference."""
    builder = builder_for(ref)
    try:
        model = builder(num_classes=num_classes, in_channels=in_channels)
    except TypeError:
        model = builder()
    if not isinstance(model, nn.Module):
        raise ModelError(f"{ref!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
