"""Image folders streamed from disk: the same numbers as in memory, the weights' own transforms, one-line errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from squeezer.datasets import load_data
from squeezer.evaluators.data import DataConfig, DataError, Split
from squeezer.evaluators.preprocess import Preprocess, from_weights


def _folder(root: Path, n: int = 8, size: tuple[int, int] = (12, 12)) -> Path:
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"c{c}/{i}.png")
    return root


def test_streamed_batches_equal_the_in_memory_split_of_the_same_images(tmp_path) -> None:
    pre = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), augment=False)
    data = load_data(str(_folder(tmp_path / "f")), config=DataConfig(preprocess=pre))
    stream = data.train
    x = torch.cat([b for b, _ in stream.batches(64, augment=False)])
    memory = Split(x, stream.y)
    for (a, ya), (b, yb) in zip(stream.batches(5, shuffle=True, seed=3), memory.batches(5, shuffle=True, seed=3)):
        assert torch.equal(ya, yb) and torch.allclose(a, b)


def test_a_resumed_run_reads_the_same_files(tmp_path) -> None:
    root = _folder(tmp_path / "f")
    first = load_data(str(root))
    again = load_data(str(root), split=first.file_split, config=DataConfig(val_samples=3))
    assert first.file_split is not None and again.val.files == tuple(f for f in first.val.files if f in
                                                                      again.val.files) and len(again.val) == 3
    (root / "c0/extra.png").write_bytes((root / "c0/0.png").read_bytes())
    with pytest.raises(DataError, match="changed since this run divided them"):
        load_data(str(root), split=first.file_split)


def test_the_weights_transforms_equal_torchvisions(tmp_path) -> None:
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 410, 3), dtype=np.uint8))
    ours = from_weights(weights).eval_transform()(img)
    assert torch.allclose(ours, weights.transforms()(img), atol=1e-5)


def test_a_classes_file_maps_folders_to_the_models_outputs(tmp_path) -> None:
    from squeezer.image_folders import read_classes

    root = _folder(tmp_path / "f")
    (tmp_path / "classes.txt").write_text("x\nc2\ny\nc0\nc1\n")
    data = load_data(str(root), config=DataConfig(classes=read_classes(tmp_path / "classes.txt")))
    assert data.num_classes == 5 and set(data.train.y.tolist()) == {1, 3, 4}
    (tmp_path / "few.txt").write_text("c0\nc1\n")
    with pytest.raises(DataError, match="'c2'.*add it to the classes file"):
        load_data(str(root), config=DataConfig(classes=read_classes(tmp_path / "few.txt")))


@pytest.mark.parametrize("argv,message", [
    (["--classes", "/nonexistent.txt"], "classes file '/nonexistent.txt' not found"),
    (["--image-size", "224", "--resize", "100"], "--resize 100 is smaller than --image-size 224"),
    (["--mean", "0.5"], "--mean and --std go together"),
    (["--image-size", "32"], "applies to image folders"),
])
def test_bad_data_flags_are_one_line_usage_errors(capsys, tmp_path, argv, message) -> None:
    from squeezer.cli import main

    code = main(["train", "--data", "digits", "--out", str(tmp_path / "m.pt"), "--steps", "1", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_a_pretrained_models_weights_preprocess_an_image_folder_given_none(tmp_path) -> None:
    from squeezer.evaluators.preprocess import Preprocess
    from squeezer.models import weights_preprocessing

    root = _folder(tmp_path / "f")
    implied = weights_preprocessing("resnet18", "IMAGENET1K_V1")
    data = load_data(str(root), implied=implied)
    assert data.preprocess.size == 224 and data.preprocess.resize == 256
    assert data.preprocess.mean == pytest.approx((0.485, 0.456, 0.406)) and data.input_shape[-2:] == (224, 224)
    told = load_data(str(root), config=DataConfig(preprocess=Preprocess(size=32, resize=40)), implied=implied)
    assert told.preprocess.size == 32  # what the user says wins
