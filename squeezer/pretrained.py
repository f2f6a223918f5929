"""Pretrained torchvision weights, read from the local torch hub cache only, and the preprocessing each expects.

Nothing downloads at run time: a weights name (`IMAGENET1K_V1`, or in full `ResNet18_Weights.IMAGENET1K_V1`) is
the file torchvision would have downloaded, looked up in `torch.hub.get_dir()/checkpoints` (which follows
TORCH_HOME); when it is missing, the error names the file and the folder to put it in. The file is read with
weights_only=True, and the model is built by torchvision's own builder, so whatever a builder sets for pretrained
weights (Inception's input transform, a ViT's image size, DenseNet's key renames) is set here too.
"""
from __future__ import annotations

import contextlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from squeezer.evaluators.preprocess import Preprocess, from_weights
from squeezer.builders import FILE_SUFFIXES, torchvision_name
from squeezer.model_error import ModelError

__all__ = ["build_pretrained", "cache_file", "classes_of", "is_weights_name", "preprocessing_of",
           "read_cached", "weights_entry", "weights_preprocessing"]

_BUILDING = threading.Lock()  # the state_dict a builder is handed is set on its weights class while it builds


def is_weights_name(weights: str) -> bool:
    """True for a weights name (`IMAGENET1K_V1`, `ResNet18_Weights.DEFAULT`), False for what looks like a file."""
    if weights.endswith(FILE_SUFFIXES) or os.sep in weights or "/" in weights or Path(weights).exists():
        return False
    return re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)?", weights) is not None


def weights_entry(model: str, weights: str) -> Any:
    """The torchvision weights entry (a `WeightsEnum` member) that `weights` names for the torchvision `model`."""
    name = torchvision_name(model)
    if name is None:
        raise ModelError(f"--weights {weights!r} names torchvision weights, but --model {model!r} is not a "
                         "torchvision model: pass a torchvision --model, or a state_dict file as --weights")
    import torchvision

    kind = torchvision.models.get_model_weights(name)
    prefix, _, short = weights.rpartition(".")
    choices = ", ".join(kind.__members__)
    if prefix and prefix != kind.__name__:
        raise ModelError(f"--weights {weights!r} are not weights of {name} (its are {kind.__name__}): choose from "
                         f"{choices}")
    if short not in kind.__members__:
        raise ModelError(f"{name} has no weights {weights!r}: choose from {choices}")
    return kind[short]


def cache_file(entry: Any) -> Path:
    """Where torchvision would have downloaded the entry's file: the hub cache's checkpoints folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(entry.url).path)


def classes_of(entry: Any) -> int:
    """How many classes the entry's weights were trained on (its model's output count)."""
    return len(entry.meta.get("categories") or ())


def read_cached(entry: Any) -> dict[str, torch.Tensor]:
    """The entry's state_dict from the local hub cache, read with weights_only=True; never downloaded."""
    path = cache_file(entry)
    if not path.is_file():
        raise ModelError(f"pretrained weights {entry} are not in the torch hub cache: put {path.name} (from "
                         f"{entry.url}) in {path.parent} (the folder follows TORCH_HOME); nothing downloads here")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"hub cache file {str(path)!r} is not a state_dict of tensors ({type(exc).__name__}): "
                         f"replace it with the file from {entry.url}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"hub cache file {str(path)!r} holds a {type(state).__name__}, not a state_dict: replace "
                         f"it with the file from {entry.url}")
    return state


@contextlib.contextmanager
def _handed(entry: Any, state: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """While a builder runs, its weights entry hands it `state` instead of downloading (or unpickling) a file.

    Patched on the entry's own weights class, through the public `get_state_dict` every builder calls."""
    kind = type(entry)

    def get_state_dict(self: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        if self is not entry:
            raise ModelError(f"building {entry} asked for other weights, {self}: pass those as --weights instead")
        return dict(state)

    with _BUILDING:
        had = "get_state_dict" in kind.__dict__
        previous = kind.__dict__.get("get_state_dict")
        setattr(kind, "get_state_dict", get_state_dict)
        try:
            yield
        finally:
            if had:
                setattr(kind, "get_state_dict", previous)
            else:
                delattr(kind, "get_state_dict")


def build_pretrained(model: str, entry: Any, state: Mapping[str, torch.Tensor], *, in_channels: int = 3) -> nn.Module:
    """torchvision's `model` built as for `entry`, its weights set from `state` (read here, never downloaded)."""
    if in_channels != 3:
        raise ModelError(f"pretrained weights {entry} take 3-channel (RGB) images but the data has {in_channels} "
                         "channel(s): convert the images to RGB, or train the model without pretrained weights")
    import torchvision

    builder = torchvision.models.get_model_builder(torchvision_name(model) or model)
    try:
        with _handed(entry, state):
            return builder(weights=entry, progress=False)
    except RuntimeError as exc:  # load_state_dict: the file is not this entry's
        first = str(exc).strip().splitlines()[0][:200]
        raise ModelError(f"the weights given for {entry} do not fit its model ({first}): replace "
                         f"{cache_file(entry).name} with the file from {entry.url}") from None


def preprocessing_of(weights: Any) -> Preprocess:
    """The preprocessing a weights entry was trained with, from its own `transforms()`: what the data of a model
    loaded with these weights gets by default."""
    try:
        return from_weights(weights)
    except (AttributeError, IndexError, TypeError, ValueError):
        raise ModelError(f"weights {weights} do not preprocess single images to one size (not an image classifier's "
                         "weights): pass --image-size and --mean/--std instead") from None


def weights_preprocessing(model: str, weights: str | None) -> Preprocess | None:
    """The preprocessing `--model MODEL --weights NAME` expects, or None when `weights` names no torchvision
    weights (no file is read: the data can be set up before the model is loaded)."""
    if not weights or not is_weights_name(weights) or torchvision_name(model) is None:
        return None
    return preprocessing_of(weights_entry(model, weights))
