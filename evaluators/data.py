"""The data an evaluator scores on: in-memory splits (train / val / test) and the facts a model is built for.

The search scores policies on `val`, carved from the training data, and never looks at `test`: choosing a policy
on the numbers you report would overfit the report (AMC makes the same point). Where the splits come from (the
bundled sets, folders, torchvision datasets, tensor files) is the workload's business: `squeezer.datasets`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator

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
    mean: tuple[float, ...] = ()  # per channel, of images scaled to [0, 1]: inputs are (x - mean) / std
    std: tuple[float, ...] = ()

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

    def without_test(self) -> DataBundle:
        """The bundle as evaluation workers need it: the search never looks at the test split, so each worker need
        not hold a copy."""
        return replace(self, test=Split(self.test.x[:0], self.test.y[:0]))

    def preprocessing(self) -> dict[str, Any]:
        """How raw images become the model's inputs, for whoever deploys it: scaled to [0, 1], then standardised
        per channel with the training split's statistics (saved with checkpoints and in exported ONNX files)."""
        return {"input_range": "[0, 1]", "input_mean": [round(m, 6) for m in self.mean],
                "input_std": [round(v, 6) for v in self.std]}
