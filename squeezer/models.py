"""Models: the small ones Squeezer owns, and how any model reference becomes an nn.Module.

A model reference is one string accepted everywhere a model is: a zoo name (`resnet20`), a torchvision name
(`resnet18` or `torchvision:resnet18`), a builder (`package.module:function`), or a checkpoint file (`.pt`/`.pth`).
"""
from __future__ import annotations

import copy
import importlib
import io
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

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


def _is_file_ref(ref: str) -> bool:
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


# ---- model files: plain data that torch.load reads with weights_only=True ----------------------------------------
# A recipe says how to build a model's structure again without unpickling code: {"arch", "num_classes",
# "in_channels"} for a zoo/torchvision/builder reference, or {"base": the base model's record, "policy",
# "input_shape"} for a compressed model. A file stores the recipe beside the state_dict (`model_record`).
Recipe = dict[str, Any]

PICKLE_WAYS = ("pass --trust-pickle (Python: trust_pickle=True) if you trust who made it, or save the model's "
               "state_dict, torch.save(model.state_dict(), FILE), and pass --model ARCH --weights FILE")
NESTING = 8  # compressed models of compressed models one file may hold: a crafted file cannot recurse without end


def arch_recipe(ref: str, *, num_classes: int, in_channels: int) -> Recipe:
    return {"arch": ref, "num_classes": num_classes, "in_channels": in_channels}


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


def _state_dict_in(payload: Any) -> dict[str, torch.Tensor] | None:
    """A plain state_dict, or one wrapped as training scripts save it ({'state_dict': ...} or {'model': ...})."""
    if not isinstance(payload, dict):
        return None
    inner = payload.get("state_dict", payload.get("model", payload))
    tensors = isinstance(inner, dict) and bool(inner) and all(isinstance(v, torch.Tensor) for v in inner.values())
    return inner if tensors else None


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
            if not _cwd_on_path(exc.name):
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
    if "base" in record:
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
        recipe = compressed_recipe(base, base_recipe, policy=policy, input_shape=shape)
    else:
        recipe = arch_recipe(_field(record, "arch", str, path),
                             num_classes=int(record.get("num_classes", info.get("num_classes", 10))),
                             in_channels=int(record.get("in_channels", info.get("in_channels", 3))))
        model = build_model(recipe["arch"], num_classes=recipe["num_classes"], in_channels=recipe["in_channels"])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        what = f"model {recipe['arch']!r}" if "arch" in recipe else "its compressed model"
        raise ModelError(f"checkpoint {str(path)!r} does not match {what} ({first})") from None
    return model, recipe


def _load_file(path: Path, *, trust_pickle: bool) -> tuple[nn.Module, Recipe | None, dict[str, Any]]:
    if not path.is_file():
        raise ModelError(f"checkpoint {str(path)!r} does not exist: check the path or run `squeezer train` first")
    payload = _read(path, trust_pickle=trust_pickle)
    if isinstance(payload, nn.Module):
        return payload, None, {}
    wrapped = payload.get("model") if isinstance(payload, dict) and "squeezer_checkpoint" not in payload else None
    if isinstance(wrapped, nn.Module):
        return wrapped, None, {}  # a training script's {'model': model, 'epoch': ...}
    if not isinstance(payload, dict) or "squeezer_checkpoint" not in payload:
        if _state_dict_in(payload) is not None:
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
    model, _, info = _load_file(Path(path), trust_pickle=trust_pickle)
    return model, info


def load(path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """A model squeezer saved (`squeezer apply`'s compressed model, `squeezer train`'s checkpoint), in eval mode.

    Rebuilt from plain data, so loading runs no code from the file: the base architecture is built, the policy is
    applied to it, and the saved weights are loaded. Only a model that came from a pickle needs `trust_pickle`."""
    return load_checkpoint(path, trust_pickle=trust_pickle)[0].eval()


def _load_weights(model: nn.Module, weights: str | Path, ref: str) -> None:
    """Load a state_dict file into `model`, reading tensors only (weights_only=True)."""
    path = Path(weights)
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist: check the path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = "it pickles Python objects" if isinstance(exc, pickle.UnpicklingError) else type(exc).__name__
        raise ModelError(f"weights file {str(path)!r} is not a state_dict ({reason}): save the weights with "
                         "torch.save(model.state_dict(), FILE), which loads without unpickling code") from None
    state = _state_dict_in(payload)
    if state is None:
        raise ModelError(f"weights file {str(path)!r} holds a {type(payload).__name__}, not a state_dict: save the "
                         "weights with torch.save(model.state_dict(), FILE)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"weights {str(path)!r} do not match model {ref!r} "
                         f"({str(exc).strip().splitlines()[0][:200]})") from None


def load_source(ref: str | nn.Module, *, num_classes: int = 10, in_channels: int = 3,
                weights: str | Path | None = None, trust_pickle: bool = False) -> tuple[nn.Module, Recipe | None]:
    """Any model reference -> (nn.Module in eval mode, its recipe, or None when it came from a pickle or memory).

    `weights` loads a state_dict into the model (the architecture a zoo, torchvision or builder name gives); a
    module given in memory is copied, so the caller's stays as it is."""
    if isinstance(ref, nn.Module):
        model, recipe = copy.deepcopy(ref), None
    elif _is_file_ref(ref):
        model, recipe, _ = _load_file(Path(ref), trust_pickle=trust_pickle)
    else:
        model = build_model(ref, num_classes=num_classes, in_channels=in_channels)
        recipe = arch_recipe(ref, num_classes=num_classes, in_channels=in_channels)
    if weights is not None:
        _load_weights(model, weights, ref if isinstance(ref, str) else type(ref).__name__)
    return model.eval(), recipe


def load_model(ref: str, *, num_classes: int = 10, in_channels: int = 3, weights: str | Path | None = None,
               trust_pickle: bool = False) -> nn.Module:
    """Any model reference -> nn.Module in eval mode; `weights` loads a state_dict into it."""
    return load_source(ref, num_classes=num_classes, in_channels=in_channels, weights=weights,
                       trust_pickle=trust_pickle)[0]


def resolve_source(ref: str | nn.Module, data: DataBundle, *, weights: str | Path | None = None,
                   trust_pickle: bool = False) -> tuple[nn.Module, Recipe | None]:
    """The model for `ref` shaped for `data` (classes, input channels) and checked to run on its inputs, with its
    recipe (`load_source`)."""
    model, recipe = load_source(ref, num_classes=data.num_classes, in_channels=data.in_channels, weights=weights,
                                trust_pickle=trust_pickle)
    name = ref if isinstance(ref, str) else type(ref).__name__
    try:
        with torch.no_grad():
            out = model(data.example_inputs(2))
    except Exception as exc:
        raise ModelError(f"model {name!r} does not accept {data.name} inputs of shape {tuple(data.input_shape)} "
                         f"({type(exc).__name__}): pass a model built for this data") from None
    if out.dim() != 2 or out.shape[1] != data.num_classes:
        raise ModelError(f"model {name!r} outputs {tuple(out.shape)} but {data.name} has {data.num_classes} "
                         "classes: pass a model built for this data")
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
