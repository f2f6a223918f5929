"""How raw images become a model's inputs: resize, centre crop, scale to [0, 1], standardise per channel.

One config serves every job: the search scores with it, `apply` applies the same one (it is recorded in run.json),
and the exported ONNX file carries it, so whoever deploys the model preprocesses as it was measured. Training and
fine-tuning see the usual augmentation (random resized crop, horizontal flip) unless `augment` is off; scoring and
BatchNorm recalibration see the deterministic transform only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Mapping

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "Preprocess", "from_weights", "imagenet"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True, kw_only=True)
class Preprocess:
    """`resize`: the shorter side is resized to this many pixels first (None: not resized); `size`: then the centre
    `size` x `size` crop is taken (None: the image as it is, for sources whose images share one size); `mean` /
    `std`: per-channel statistics of [0, 1] pixels (None: computed from the training images when the data loads);
    `augment`: random resized crop and flip for training batches."""

    size: int | None = None
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: bool = True
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("size", "resize"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"image {name} must be at least 1 pixel, got {value}")
        if self.resize is not None and self.size is not None and self.resize < self.size:
            raise ValueError(f"--resize {self.resize} is smaller than --image-size {self.size}: the centre crop must "
                             "fit inside the resized image, so give a resize of at least the image size")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if (self.mean is None) != (self.std is None) or (self.mean is not None and len(self.mean) != len(self.std)):
            raise ValueError("--mean and --std go together, one value per channel each (e.g. --mean 0.485,0.456,0.406 "
                             "--std 0.229,0.224,0.225)")
        if self.std is not None and not all(v > 0 for v in self.std):
            raise ValueError(f"--std values must be above 0, got {','.join(map(str, self.std))}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}: choose from {', '.join(INTERPOLATIONS)}")

    @property
    def resolved(self) -> bool:
        """True when nothing is left to compute from the data (the statistics are known)."""
        return self.mean is not None

    def _mode(self) -> Any:
        from torchvision.transforms import InterpolationMode

        return InterpolationMode(self.interpolation)

    def _normalise(self) -> list[Callable[..., Any]]:
        from torchvision import transforms as T

        return [T.Normalize(self.mean, self.std)] if self.mean is not None else []

    def eval_transform(self) -> Callable[[Any], Any]:
        """PIL image -> normalised tensor, deterministically: how inputs are scored and deployed."""
        from torchvision import transforms as T

        steps: list[Callable[..., Any]] = []
        if self.resize is not None:
            steps.append(T.Resize(self.resize, interpolation=self._mode(), antialias=True))
        if self.size is not None:
            if self.resize is None:  # a crop of mixed-size images needs them at least that large first
                steps.append(T.Resize(self.size, interpolation=self._mode(), antialias=True))
            steps.append(T.CenterCrop(self.size))
        return T.Compose([*steps, T.ToTensor(), *self._normalise()])

    def train_transform(self, shape: tuple[int, int] | None = None) -> Callable[[Any], Any]:
        """PIL image -> normalised tensor with random resized crop and flip (`shape`: the output size of a source
        whose images keep their own size); the eval transform when `augment` is off."""
        from torchvision import transforms as T

        if not self.augment:
            return self.eval_transform()
        out = (self.size, self.size) if self.size is not None else shape
        if out is None:
            raise ValueError("training augmentation needs an output size: give the image size")
        return T.Compose([T.RandomResizedCrop(out, interpolation=self._mode(), antialias=True),
                          T.RandomHorizontalFlip(), T.ToTensor(), *self._normalise()])

    def metadata(self) -> dict[str, Any]:
        """What a deployer needs, as flat JSON values (checkpoint fields and ONNX metadata)."""
        out: dict[str, Any] = {"input_range": "[0, 1]",
                               "input_mean": [round(m, 6) for m in self.mean or ()],
                               "input_std": [round(v, 6) for v in self.std or ()]}
        if self.resize is not None:
            out["input_resize"] = self.resize
        if self.size is not None:
            out["input_crop"] = self.size
        if self.resize is not None or self.size is not None:
            out["input_interpolation"] = self.interpolation
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("mean", "std"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Preprocess:
        known = {k: data[k] for k in ("size", "resize", "mean", "std", "augment", "interpolation") if k in data}
        return cls(**known)


def imagenet(**overrides: Any) -> Preprocess:
    """The usual ImageNet evaluation: shorter side to 256, centre 224 crop, ImageNet statistics."""
    return replace(Preprocess(size=224, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD), **overrides)


def from_weights(weights: Any, *, augment: bool = True) -> Preprocess:
    """The preprocessing of a torchvision weights entry (e.g. `ResNet18_Weights.IMAGENET1K_V1`): its own
    `transforms()` (resize, crop, interpolation, statistics), so a pretrained model is scored on the inputs it was
    trained for. Nothing is downloaded: the transforms are a description, not a file."""
    t = weights.transforms()
    try:
        crop, resize = t.crop_size, t.resize_size
        mean, std, mode = t.mean, t.std, t.interpolation
    except AttributeError:
        raise ValueError(f"weights {weights!r} have transforms this version cannot read ({type(t).__name__}): pass "
                         "--image-size, --resize, --mean and --std") from None
    return Preprocess(size=int(crop[0]), resize=int(resize[0]), mean=tuple(mean), std=tuple(std), augment=augment,
                      interpolation=getattr(mode, "value", str(mode)))
