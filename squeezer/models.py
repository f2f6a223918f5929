"""Models: the small ones Squeezer owns, and how any model reference becomes an nn.Module.

A model reference is one string accepted everywhere a model is: a zoo name (`resnet20`), a torchvision name
(`resnet18` or `torchvision:resnet18`), a builder (`package.module:function`), or a checkpoint file (`.pt`/`.pth`).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from squeezer.evaluators.data import DataBundle


class ModelError(ValueError):
    """A model reference that cannot be turned into a model; the message names the fix."""


# ---- CIFAR-style ResNets (He et al. 2016, option B shortcuts so every block is prunable) -----------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56), got {depth}")
        n = (depth - 2) // 6
        widths = [width, width * 2, width * 4]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallVGG(nn.Module):
    """A VGG-style stack: plain convs, so every layer's filters are independent channel groups."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(cin, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


class SmallMobileNetV2(nn.Module):
    """MobileNetV2 shrunk for small images: depthwise convs tie the expansion channels into one group each."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        cfg = [(1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 1)]  # expand, out, repeats, stride
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(True)]
        cin = 32
        for t, c, n, s in cfg:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6(True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(20, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(56, num_classes, in_channels)


def vgg_small(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return SmallVGG(num_classes, in_channels)


def mobilenetv2_small(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return SmallMobileNetV2(num_classes, in_channels)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg_small": vgg_small,
    "mobilenetv2_small": mobilenetv2_small,
}


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
        # No weights can be downloaded here: torchvision models are built untrained (train or load a checkpoint).
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


def _cwd_on_path(missing: str | None) -> bool:
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
    """Import `module_name`, also from the current folder (`_cwd_on_path`)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name.split(".")[0] or not _cwd_on_path(exc.name):
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
    return ref.endswith((".pt", ".pth", ".ckpt")) or Path(ref).is_file()


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


def save_checkpoint(model: nn.Module, path: str | Path, *, arch: str | None = None, **info: Any) -> Path:
    """Save weights with the recipe to rebuild the model (arch + kwargs) or, for a changed model, the whole module."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"squeezer_checkpoint": 1, "info": info}
    if arch is not None:
        payload.update(arch=arch, state_dict=model.state_dict())
    else:
        payload["module"] = model
    torch.save(payload, path)
    return path


def _is_state_dict(payload: Any) -> bool:
    """A plain state_dict, or one wrapped as training scripts save it ({'state_dict': ...} or {'model': ...})."""
    if isinstance(payload, dict) and not payload.get("squeezer_checkpoint"):
        inner = payload.get("state_dict", payload.get("model", payload))
        return isinstance(inner, dict) and bool(inner) and all(isinstance(v, torch.Tensor) for v in inner.values())
    return False


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A model and its info from a checkpoint written by `save_checkpoint` or a plain `torch.save(model)`."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {str(path)!r} does not exist: check the path or run `squeezer train` first")
    try:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as exc:  # a pickled model whose classes live in the user's module
            if not _cwd_on_path(exc.name):
                raise ModelError(f"checkpoint {str(path)!r} needs module {exc.name!r}, which defines the model's "
                                 "classes: run from the folder that holds it, or put it on PYTHONPATH") from None
            payload = torch.load(path, map_location="cpu", weights_only=False)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot read checkpoint {str(path)!r} ({type(exc).__name__}): is it a torch.save "
                         "file?") from None
    if isinstance(payload, nn.Module):
        return payload, {}
    wrapped = payload.get("model") if isinstance(payload, dict) and "squeezer_checkpoint" not in payload else None
    if isinstance(wrapped, nn.Module):
        return wrapped, {}  # a training script's {'model': model, 'epoch': ...}
    if _is_state_dict(payload):
        raise ModelError(f"checkpoint {str(path)!r} holds weights only (a state_dict), not the model: load them into "
                         "your model and save the module itself, torch.save(model, 'model.pt'), or pass a "
                         "module:function that builds the model and loads them")
    if not isinstance(payload, dict) or "squeezer_checkpoint" not in payload:
        raise ModelError(f"checkpoint {str(path)!r} holds a {type(payload).__name__}, not a model: save the "
                         "nn.Module itself or use `squeezer train`")
    info = dict(payload.get("info", {}))
    if "module" in payload:
        return payload["module"], info
    info["arch"] = payload["arch"]
    model = build_model(payload["arch"], num_classes=info.get("num_classes", 10),
                        in_channels=info.get("in_channels", 3))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"checkpoint {str(path)!r} does not match model {payload['arch']!r} ({first})") from None
    return model, info


def load_model(ref: str, *, num_classes: int = 10, in_channels: int = 3, state_dict: str | None = None) -> nn.Module:
    """Any model reference -> nn.Module in eval mode; `state_dict` optionally loads weights saved for that arch."""
    if is_checkpoint(ref) and not ref.startswith("torchvision:") and ":" not in ref.replace("\\", "/").split("/")[-1]:
        model, _ = load_checkpoint(ref)
    else:
        model = build_model(ref, num_classes=num_classes, in_channels=in_channels)
    if state_dict is not None:
        sd = torch.load(state_dict, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(sd)
        except RuntimeError as exc:
            raise ModelError(f"weights {state_dict!r} do not match model {ref!r} "
                             f"({str(exc).splitlines()[0]})") from None
    return model.eval()


def resolve_model(ref: str, data: DataBundle) -> nn.Module:
    """The model for `ref`, shaped for `data` (classes, input channels), checked to run on its inputs."""
    if is_checkpoint(ref) and ":" not in Path(ref).name:
        model, _ = load_checkpoint(ref)
    else:
        model = load_model(ref, num_classes=data.num_classes, in_channels=data.in_channels)
    model.eval()
    try:
        with torch.no_grad():
            out = model(data.example_inputs(2))
    except Exception as exc:
        raise ModelError(f"model {ref!r} does not accept {data.name} inputs of shape {tuple(data.input_shape)} "
                         f"({type(exc).__name__}): pass a model built for this data") from None
    if out.dim() != 2 or out.shape[1] != data.num_classes:
        raise ModelError(f"model {ref!r} outputs {tuple(out.shape)} but {data.name} has {data.num_classes} "
                         "classes: pass a model built for this data")
    return model


def load_workload(*, model: str, data: str) -> tuple[nn.Module, DataBundle]:
    """A model reference and a data reference, loaded together: the model shaped for (and checked on) the data."""
    from squeezer.datasets import load_data

    bundle = load_data(data)
    return resolve_model(model, bundle), bundle
