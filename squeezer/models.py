"""Model references -> nn.Module, shaped for and checked against the data.

A model reference is one string accepted everywhere a model is: a zoo name (`resnet20`), a torchvision name
(`resnet18` or `torchvision:resnet18`), a builder (`package.module:function`), or a checkpoint file (`.pt`/`.pth`).
`weights` is a state_dict file for the architecture, or for a torchvision model the name of its pretrained weights,
read from the local hub cache. The pieces live in their own modules and are re-exported here: `zoo` (the small
models), `builders` (references to untrained models), `pretrained` (torchvision weights and their preprocessing),
`heads` (the final classifier), `model_files` (what squeezer writes and reads).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from squeezer.builders import build_model, builder_for, is_checkpoint, is_file_ref, torchvision_name
from squeezer.evaluators.data import DataBundle
from squeezer.heads import find_head, replace_head, replaced_head
from squeezer.model_error import ModelError
from squeezer.model_files import (PICKLE_WAYS, Recipe, arch_recipe, build_for_state, compressed_recipe, load,
                                  load_checkpoint, load_file, load_state, model_record, read_state_file,
                                  save_checkpoint, weights_shapes)
from squeezer.pretrained import (build_pretrained, classes_of, is_weights_name, preprocessing_of,
                                 read_cached, weights_entry, weights_preprocessing)
from squeezer.zoo import (ZOO, BasicBlock, CifarResNet, InvertedResidual, SmallMobileNetV2, SmallVGG,
                          mobilenetv2_small, resnet20, resnet56, vgg_small)

__all__ = ["BasicBlock", "CifarResNet", "InvertedResidual", "ModelError", "PICKLE_WAYS", "Recipe",
           "SmallMobileNetV2", "SmallVGG", "ZOO", "arch_recipe", "build_model", "builder_for", "check_outputs",
           "compressed_recipe", "find_head", "is_checkpoint", "load", "load_checkpoint", "load_model",
           "load_source", "load_workload", "mobilenetv2_small", "model_record", "preprocessing_of", "replace_head",
           "replaced_head", "resnet20", "resnet56", "resolve_model", "resolve_source", "save_checkpoint",
           "vgg_small", "weights_id", "weights_preprocessing", "weights_ref"]


def weights_id(entry: Any) -> str:
    """A torchvision weights entry's full name, e.g. 'ResNet18_Weights.IMAGENET1K_V1' (DEFAULT resolved)."""
    return f"{type(entry).__name__}.{entry.name}"


def weights_ref(model: str, weights: str | Path | None) -> str | None:
    """`weights` as a run records it: a weights name in full, a file as an absolute path."""
    if weights is None:
        return None
    if is_weights_name(str(weights)):
        return weights_id(weights_entry(model, str(weights)))
    return str(Path(weights).resolve())


def _with_weights(ref: str, weights: str | Path, *, num_classes: int,
                  in_channels: int) -> tuple[nn.Module, Recipe]:
    """The architecture `ref` with `weights` loaded: pretrained torchvision weights by name, or a state_dict file
    (the model built for as many classes as the file's classifier has)."""
    if is_weights_name(str(weights)):
        entry = weights_entry(ref, str(weights))
        state = read_cached(entry)
        model = build_pretrained(ref, entry, state, in_channels=in_channels)
        return model, arch_recipe(ref, num_classes=classes_of(entry), in_channels=in_channels,
                                  weights=weights_id(entry), shapes=weights_shapes(state))
    state = read_state_file(Path(weights))
    model, classes = build_for_state(ref, state, num_classes=num_classes, in_channels=in_channels)
    load_state(model, state, source=f"weights {str(weights)!r}", target=f"model {ref!r}")
    return model, arch_recipe(ref, num_classes=classes, in_channels=in_channels)


def load_source(ref: str | nn.Module, *, num_classes: int = 10, in_channels: int = 3,
                weights: str | Path | None = None, trust_pickle: bool = False) -> tuple[nn.Module, Recipe | None]:
    """Any model reference -> (nn.Module in eval mode, its recipe, or None when it came from a pickle or memory).

    `weights` loads a state_dict into the model, or names a torchvision model's pretrained weights; a module given
    in memory is copied, so the caller's stays as it is. `num_classes` is what an architecture is built for unless
    its weights were trained for another count (checked against the data by `resolve_source`)."""
    name = ref if isinstance(ref, str) else type(ref).__name__
    if isinstance(ref, nn.Module):
        model, recipe = copy.deepcopy(ref), None
    elif is_file_ref(ref):
        model, recipe, _ = load_file(Path(ref), trust_pickle=trust_pickle, num_classes=num_classes,
                                     in_channels=in_channels)
    elif weights is not None:
        model, recipe = _with_weights(ref, weights, num_classes=num_classes, in_channels=in_channels)
        weights = None
    else:
        model = build_model(ref, num_classes=num_classes, in_channels=in_channels)
        recipe = arch_recipe(ref, num_classes=num_classes, in_channels=in_channels)
    if weights is not None:  # a state_dict for a model loaded from a file or given in memory
        if is_weights_name(str(weights)):
            weights_entry(name, str(weights))  # says that a weights name needs a torchvision --model
        load_state(model, read_state_file(Path(weights)), source=f"weights {str(weights)!r}",
                   target=f"model {name!r}")
    return model.eval(), recipe


def load_model(ref: str, *, num_classes: int = 10, in_channels: int = 3, weights: str | Path | None = None,
               trust_pickle: bool = False) -> nn.Module:
    """Any model reference -> nn.Module in eval mode; `weights` loads a state_dict (or pretrained weights) into it."""
    return load_source(ref, num_classes=num_classes, in_channels=in_channels, weights=weights,
                       trust_pickle=trust_pickle)[0]


def check_outputs(model: nn.Module, data: DataBundle, *, name: str) -> None:
    """Refuse, in one line, a model that does not run on the data's inputs or whose outputs are not its classes."""
    try:
        with torch.no_grad():
            out = model(data.example_inputs(2))
    except Exception as exc:
        raise ModelError(f"model {name!r} does not accept {data.name} inputs of shape {tuple(data.input_shape)} "
                         f"({type(exc).__name__}): pass a model built for this data") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"model {name!r} outputs {shape}, not one score per class (batch x classes): pass a "
                         "classifier")
    if out.shape[1] != data.num_classes:
        raise ModelError(f"model {name!r} has {out.shape[1]} outputs but {data.name} has {data.num_classes} "
                         "classes: pass --classes FILE (the data's class names in the model's output order) if "
                         "they are among the model's, or fine-tune a new head first with `squeezer train "
                         "--replace-head`")


def resolve_source(ref: str | nn.Module, data: DataBundle, *, weights: str | Path | None = None,
                   trust_pickle: bool = False) -> tuple[nn.Module, Recipe | None]:
    """The model for `ref` shaped for `data` (classes, input channels) and checked to run on its inputs, with its
    recipe (`load_source`)."""
    model, recipe = load_source(ref, num_classes=data.num_classes, in_channels=data.in_channels, weights=weights,
                                trust_pickle=trust_pickle)
    check_outputs(model, data, name=ref if isinstance(ref, str) else type(ref).__name__)
    return model, recipe


def resolve_model(ref: str | nn.Module, data: DataBundle, *, weights: str | Path | None = None,
                  trust_pickle: bool = False) -> nn.Module:
    """The model for `ref`, shaped for `data`, checked to run on its inputs (`resolve_source`)."""
    return resolve_source(ref, data, weights=weights, trust_pickle=trust_pickle)[0]


def load_workload(*, model: str, data: str) -> tuple[nn.Module, DataBundle]:
    """A model reference and a data reference, loaded together: the model shaped for (and checked on) the data."""
    from squeezer.datasets import load_data

    bundle = load_data(data)
    return resolve_model(model, bundle), bundle
