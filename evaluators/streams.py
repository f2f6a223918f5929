"""Image files read from disk batch by batch: a `torch.utils.data.Dataset` behind a DataLoader.

A `StreamSplit` is a list of files and labels plus how to preprocess them: small to pickle (workers get the list,
not the images) and bounded in memory by the batch size and the loader's prefetch, whatever the folder's size. Its
batches come in the same seeded order as an in-memory `Split`'s, so the two give the same numbers on the same data.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from squeezer.evaluators.data import order
from squeezer.evaluators.preprocess import Preprocess

__all__ = ["ImageFiles", "StreamSplit", "open_image"]

GRAY_MODES = ("1", "L", "I", "I;16", "F")


def open_image(path: str | Path, mode: str) -> Any:
    """The image at `path` as a PIL image in `mode` ("L" for a grayscale source, "RGB" otherwise)."""
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


class ImageFiles(Dataset):
    """(tensor, label) of each file, through `transform`."""

    def __init__(self, root: str, files: Sequence[str], labels: Sequence[int], mode: str,
                 transform: Callable[[Any], torch.Tensor]) -> None:
        self.root, self.files, self.labels, self.mode, self.transform = Path(root), files, labels, mode, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(open_image(self.root / self.files[i], self.mode)), int(self.labels[i])


@dataclass(frozen=True)
class StreamSplit:
    """Files under `root` (relative paths) with their labels, read in `mode` and preprocessed by `preprocess`;
    `loader_workers` DataLoader processes read them (0: the calling process), into pinned memory with `pin_memory`
    (on CUDA). `shape` is (C, H, W) of one preprocessed image."""

    root: str
    files: tuple[str, ...]
    labels: tuple[int, ...]
    preprocess: Preprocess
    mode: str = "RGB"
    shape: tuple[int, ...] = ()
    loader_workers: int = 0
    pin_memory: bool = False

    def __len__(self) -> int:
        return len(self.files)

    @property
    def y(self) -> torch.Tensor:
        return torch.tensor(self.labels, dtype=torch.long)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.shape

    def subset(self, indices: Sequence[int]) -> StreamSplit:
        return replace(self, files=tuple(self.files[i] for i in indices),
                       labels=tuple(self.labels[i] for i in indices))

    def dataset(self, *, augment: bool = False) -> ImageFiles:
        pre = self.preprocess
        transform = pre.train_transform(tuple(self.shape[1:])) if augment else pre.eval_transform()  # type: ignore
        return ImageFiles(self.root, self.files, self.labels, self.mode, transform)

    def head(self, n: int) -> torch.Tensor:
        ds = self.dataset()
        return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, limit: int | None = None,
                augment: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) batches in the seeded order an in-memory Split uses; `augment` applies the training
        transform (random resized crop and flip, when the preprocessing has augmentation on). Only the batches
        asked for are read."""
        indices = order(len(self), shuffle=shuffle, seed=seed)
        if limit is not None:
            indices = indices[:limit * batch_size]
        if not len(indices):
            return
        loader = DataLoader(self.dataset(augment=augment), batch_size=batch_size, sampler=indices.tolist(),
                            num_workers=self.loader_workers, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(seed),
                            prefetch_factor=2 if self.loader_workers else None)
        yield from loader
