"""The data an evaluator scores on: splits (train / val / test) and the facts a model is built for.

A split is read in batches, never indexed whole: small sources (the bundled sets, tensor files, arrays a
torchvision dataset holds) are in-memory tensors (`Split`), image folders are streamed from disk through a
DataLoader (`StreamSplit`, `squeezer.evaluators.streams`), so memory is bounded by the batch, not the dataset.
The search scores policies on `val`, carved from the training data, and never looks at `test`: choosing a policy
on the numbers you report would overfit the report (AMC makes the same point). Where the splits come from is the
workload's business: `squeezer.datasets`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch

from squeezer.evaluators.preprocess import Preprocess

__all__ = ["Batches", "DataBundle", "DataConfig", "DataError", "FileSplit", "Split", "order"]


class DataError(ValueError):
    """A data reference that cannot be loaded; the message names the fix."""


def order(n: int, *, shuffle: bool, seed: int) -> torch.Tensor:
    """The order a split's samples are read in: seeded, so in-memory and streamed splits give the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)


class Batches(Protocol):
    """What the evaluators read: batches, labels, and a few inputs for tracing and export."""

    def __len__(self) -> int: ...

    @property
    def y(self) -> torch.Tensor: ...

    @property
    def sample_shape(self) -> tuple[int, ...]: ...

    def head(self, n: int) -> torch.Tensor: ...

    def subset(self, indices: Sequence[int]) -> Batches: ...

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, limit: int | None = None,
                augment: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True)
class Split:
    """An in-memory split: inputs already preprocessed (nothing to augment)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def head(self, n: int) -> torch.Tensor:
        return self.x[:n].clone()

    def subset(self, indices: Sequence[int]) -> Split:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return Split(self.x[idx], self.y[idx])

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, limit: int | None = None,
                augment: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) batches; `limit` caps how many; shuffling is seeded so runs repeat."""
        idx_all = order(len(self), shuffle=shuffle, seed=seed)
        for i, start in enumerate(range(0, len(self), batch_size)):
            if limit is not None and i >= limit:
                return
            idx = idx_all[start:start + batch_size]
            yield self.x[idx], self.y[idx]


@dataclass(frozen=True, kw_only=True)
class FileSplit:
    """How an image folder's files were divided, recorded in the run so that a resumed search and `apply` read
    exactly the same images: the files carved out as `val` and `test` (paths relative to the data root; empty where
    the folder holds that split itself) and a digest of every file the data had (a changed folder is refused)."""

    seed: int
    val: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    digest: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "val": list(self.val), "test": list(self.test), "digest": self.digest}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileSplit:
        return cls(seed=int(data.get("seed", 0)), val=tuple(data.get("val", ())), test=tuple(data.get("test", ())),
                   digest=str(data.get("digest", "")))


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How a data reference is read: `preprocess` (None: in-memory sources as they are, an image folder at a size
    chosen from its images, with statistics computed from them), `val_samples` (the search scores on this fixed,
    seeded subset of the validation split; None: all of it), `loader_workers` (DataLoader processes reading a
    streamed split), `classes` (the model's output order by class-folder name: a folder holding a subset of them
    is scored against the right outputs) and `recovery_data` (a folder of images, flat or in sub-folders whose names
    are ignored, that replaces the training split for recovery and calibration: images without labels, read as the
    data's own images are; the data still gives the labelled validation and test splits)."""

    preprocess: Preprocess | None = None
    val_samples: int | None = None
    loader_workers: int = 0
    classes: tuple[str, ...] | None = None
    recovery_data: str | None = None

    def __post_init__(self) -> None:
        if self.val_samples is not None and self.val_samples < 1:
            raise ValueError(f"--val-samples must be at least 1, got {self.val_samples}")
        if self.loader_workers < 0:
            raise ValueError(f"--loader-workers must be 0 or more, got {self.loader_workers}")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
        if self.recovery_data is not None:  # recorded as an absolute path: workers and `apply` run elsewhere
            object.__setattr__(self, "recovery_data", str(Path(self.recovery_data).expanduser().absolute()))

    def resumed(self, recorded: DataConfig) -> DataConfig:
        """These settings where given, the recorded run's elsewhere: a re-run with no data flags resumes as it was,
        and one that repeats them reuses the statistics the run computed."""
        pre, was = self.preprocess, recorded.preprocess
        if pre is None or (was is not None and pre.mean is None and replace(was, mean=None, std=None) == pre):
            pre = was
        return replace(self, preprocess=pre,
                       val_samples=self.val_samples if self.val_samples is not None else recorded.val_samples,
                       classes=self.classes if self.classes is not None else recorded.classes,
                       recovery_data=self.recovery_data if self.recovery_data is not None else recorded.recovery_data)

    def scoring(self) -> dict[str, Any]:
        """What a trial's numbers depend on (not how many processes read the files)."""
        return {"preprocess": self.preprocess.to_json() if self.preprocess else None,
                "val_samples": self.val_samples, "classes": list(self.classes) if self.classes else None,
                "recovery_data": self.recovery_data}

    def to_json(self) -> dict[str, Any]:
        return {**self.scoring(), "loader_workers": self.loader_workers}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DataConfig:
        pre = data.get("preprocess")
        return cls(preprocess=Preprocess.from_json(pre) if pre else None, val_samples=data.get("val_samples"),
                   loader_workers=int(data.get("loader_workers", 0)),
                   classes=tuple(data["classes"]) if data.get("classes") else None,
                   recovery_data=data.get("recovery_data"))


@dataclass(frozen=True)
class DataBundle:
    name: str
    train: Any  # a Batches: Split or StreamSplit
    val: Any
    test: Any
    num_classes: int
    mean: tuple[float, ...] = ()  # per channel, of images scaled to [0, 1]: inputs are (x - mean) / std
    std: tuple[float, ...] = ()
    preprocess: Preprocess | None = None  # how a streamed source's images become inputs (None: in memory)
    file_split: FileSplit | None = None  # how an image folder's files were divided
    class_names: tuple[str, ...] = field(default=())

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one batch of one sample, e.g. (1, 1, 8, 8)."""
        return (1, *self.train.sample_shape)

    @property
    def in_channels(self) -> int:
        return int(self.train.sample_shape[0])

    def example_inputs(self, n: int = 1) -> torch.Tensor:
        return self.val.head(n)

    def calibration(self, batches: int = 4, batch_size: int = 64) -> list[torch.Tensor]:
        return [x for x, _ in self.train.batches(batch_size, shuffle=True, seed=1, limit=batches, augment=False)]

    def without_test(self) -> DataBundle:
        """The bundle as evaluation workers need it: the search never looks at the test split, so each worker need
        not hold a copy."""
        return replace(self, test=self.test.subset([]))

    def for_device(self, device: str | torch.device) -> DataBundle:
        """Streamed splits read into pinned memory when batches go to a GPU (faster, asynchronous copies)."""
        if torch.device(device).type != "cuda":
            return self
        pinned = {k: replace(s, pin_memory=True) for k in ("train", "val", "test")
                  if hasattr(s := getattr(self, k), "pin_memory")}
        return replace(self, **pinned)

    def preprocessing(self) -> dict[str, Any]:
        """How raw images become the model's inputs, for whoever deploys it: resized and cropped as the
        preprocessing says (streamed sources), scaled to [0, 1], then standardised per channel (saved with
        checkpoints and in exported ONNX files)."""
        pre = self.preprocess or Preprocess(mean=self.mean or None, std=self.std or None)
        return pre.metadata()
