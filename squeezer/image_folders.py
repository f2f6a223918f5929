"""Image folders as streamed splits: one folder of class folders, or ImageNet's train/ with val/ and/or test/.

Only the file list is read up front (and the headers and pixels of a small seeded sample, to choose a size and
statistics when none is given); the images are read batch by batch. A folder without its own val/ or test/ is
divided per class with a seeded shuffle, and the division is recorded (`FileSplit`) so a resumed search and
`apply` read exactly the same images.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
import numpy as np
import torch

from squeezer.evaluators.data import DataBundle, DataConfig, DataError, FileSplit
from squeezer.evaluators.preprocess import Preprocess
from squeezer.evaluators.streams import GRAY_MODES, StreamSplit

__all__ = ["IMAGE_EXTENSIONS", "NO_LABEL", "SPLIT_FOLDERS", "folder_bundle", "read_classes", "unlabelled_split"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LARGEST_CHOSEN = 224  # a mixed-size folder with no size given is cropped to its median shorter side, at most this
SAMPLE = 64  # images whose headers choose the size and mode
STATS_SAMPLE = 256  # images whose pixels give the statistics when none are given
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
NO_LABEL = -1  # the label of an image without one: an index no loss accepts, should anything read it


def _split_folders(root: Path) -> dict[str, Path]:
    """root/train with root/val and/or root/test (ImageNet's layout), if root has them; else {}."""
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        for name in names:
            if (root / name).is_dir():
                found[split] = root / name
                break
    return found if "train" in found and len(found) > 1 else {}


def read_classes(path: str | Path) -> tuple[str, ...]:
    """The class-folder names of a --classes file, one per line in the model's output order."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"classes file {str(path)!r} not found: give a text file with one class-folder name per "
                        "line, in the model's output order")
    names = tuple(line.strip() for line in file.read_text().splitlines() if line.strip())
    if not names:
        raise DataError(f"classes file {str(path)!r} is empty: write one class-folder name per line, in the model's "
                        "output order")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"classes file {str(path)!r} names {repeated[0]!r} twice: each output is one class, so list "
                        "each folder name once")
    return names


def _listing(folder: Path, base: Path) -> list[tuple[str, str]]:
    """(path relative to `base`, class-folder name) of every image under `folder`'s class folders, sorted."""
    out = []
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    for name in classes:
        for dirpath, dirnames, filenames in os.walk(folder / name, followlinks=True):
            dirnames.sort()
            rel = Path(dirpath).relative_to(base)
            out += [((rel / f).as_posix(), name) for f in sorted(filenames)
                    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    if not out:
        raise DataError(f"{str(folder)!r} is not an image folder (no images in class folders): it needs one "
                        "sub-folder of images per class, or train/ and val/ (or test/) folders that each have them")
    return out


def _carve(items: list[tuple[str, str]], frac: float, seed: int) -> tuple[list[tuple[str, str]], list[str]]:
    """(the rest, the carved files): `frac` of each class (rounded), chosen by a seeded shuffle, so every class is
    represented as it is in the whole."""
    by_class: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    rng = np.random.default_rng(seed)
    carved: list[str] = []
    for name in sorted(by_class):
        group = by_class[name]
        n = int(round(len(group) * frac))
        carved += [group[i][0] for i in rng.permutation(len(group))[:n]]
    taken = set(carved)
    return [it for it in items if it[0] not in taken], sorted(carved)


def _digest(items: list[tuple[str, str]]) -> str:
    return hashlib.sha1("\n".join(rel for rel, _ in items).encode()).hexdigest()[:16]


def _divide(root: Path, seed: int, val_frac: float, test_frac: float,
            recorded: FileSplit | None) -> tuple[dict[str, list[tuple[str, str]]], FileSplit]:
    """{train, val, test: [(file, class)]} and how they were divided (as `recorded` says, when resuming)."""
    folders = _split_folders(root)
    given = {k: _listing(folders[k], root) for k in ("train", "val", "test") if k in folders} if folders \
        else {"train": _listing(root, root)}
    everything = [it for k in sorted(given) for it in given[k]]
    digest = _digest(everything)
    if recorded is not None:
        if recorded.digest and recorded.digest != digest:
            raise DataError(f"the files under {str(root)!r} changed since this run divided them ({len(everything):,} "
                            "now): restore the folder as it was, or start a new run with another --out")
        carved = {"val": set(recorded.val), "test": set(recorded.test)}
        held = given["train"]
        split = FileSplit(seed=recorded.seed, val=recorded.val, test=recorded.test, digest=digest)
        out = {k: [it for it in held if it[0] in carved[k]] for k in ("val", "test")}
        out["train"] = [it for it in held if it[0] not in carved["val"] and it[0] not in carved["test"]]
        for k in ("val", "test"):
            if k in given:
                out[k] = given[k]
        return out, split
    train = given["train"]
    test_files: list[str] = []
    val_files: list[str] = []
    if "test" not in given and "val" not in given:
        train, test_files = _carve(train, test_frac, seed)
    if not ("test" in given and "val" in given):  # a lone val/ is the test split, as ImageNet's is used
        # a fraction of what is left, as the in-memory sources carve it
        train, val_files = _carve(train, val_frac, seed + 1)
    split = FileSplit(seed=seed, val=tuple(val_files), test=tuple(test_files), digest=digest)
    lookup = dict(given["train"])
    out = {"train": train, "val": [(f, lookup[f]) for f in val_files], "test": [(f, lookup[f]) for f in test_files]}
    if "val" in given and "test" in given:
        out["val"], out["test"] = given["val"], given["test"]
    elif "val" in given or "test" in given:
        out["test"] = given.get("test", given.get("val", []))
    return out, split


def _choose(root: Path, files: list[tuple[str, str]], given: Preprocess | None, seed: int,
            where: str) -> tuple[Preprocess, str]:
    """The preprocessing (size chosen where none is given) and the PIL mode of a folder, from a seeded sample of
    image headers: one size throughout keeps it (a model built for 28x28 runs unchanged); mixed sizes are resized
    and centre-cropped to their median shorter side (at most 224, then as ImageNet: shorter side to 256 first), and
    a note says so."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(files))[:SAMPLE]
    sizes, modes = [], set()
    for i in picks:
        try:
            with Image.open(root / files[i][0]) as img:
                sizes.append(img.size)
                modes.add(img.mode)
        except OSError as exc:
            raise DataError(f"cannot read image {str(root / files[i][0])!r} ({type(exc).__name__}): remove or "
                            "replace the file") from None
    mode = "L" if modes <= set(GRAY_MODES) else "RGB"
    pre = given or Preprocess()
    if pre.size is None and pre.resize is not None:
        pre = Preprocess(**{**pre.to_json(), "size": pre.resize})
    if pre.size is None and len(set(sizes)) > 1:
        short = int(np.median([min(s) for s in sizes]))
        size, resize = (LARGEST_CHOSEN, 256) if short >= LARGEST_CHOSEN else (short, short)
        pre = Preprocess(**{**pre.to_json(), "size": size, "resize": resize})
        low, high = min(min(s) for s in sizes), max(min(s) for s in sizes)
        log.warning("note: images in %s have different sizes (shorter side %d-%d px): resized to %d px and "
                    "centre-cropped to %dx%d, %s; pass --image-size/--resize or --preprocess imagenet to choose",
                    where, low, high, resize, size, size,
                    "as ImageNet models expect" if size == LARGEST_CHOSEN else "their median shorter side")
    return pre, mode


def _statistics(split: StreamSplit, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and deviation of [0, 1] pixels over a seeded sample of training images (as the in-memory
    sources are standardised with their training part's statistics)."""
    picks = sorted(np.random.default_rng(seed).permutation(len(split))[:STATS_SAMPLE].tolist())
    total, square, count = None, None, 0
    for x, _ in split.subset(picks).batches(64, augment=False):
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
        total = flat.sum(1) if total is None else total + flat.sum(1)
        square = (flat ** 2).sum(1) if square is None else square + (flat ** 2).sum(1)
        count += flat.shape[1]
    mean = total / count
    std = (square / count - mean ** 2).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def folder_bundle(root: Path, config: DataConfig, *, seed: int, val_frac: float, test_frac: float,
                  recorded: FileSplit | None = None) -> DataBundle:
    """An image folder as streamed splits (see the module docstring)."""
    parts, split = _divide(root, seed, val_frac, test_frac, recorded)
    train_classes = sorted({c for _, c in parts["train"]})
    names = config.classes or tuple(train_classes)
    index = {n: i for i, n in enumerate(names)}
    for k, items in parts.items():
        missing = sorted({c for _, c in items} - set(index))
        if missing:
            fix = ("add it to the classes file in the model's output order" if config.classes else
                   "every held-out class needs a training folder of the same name")
            raise DataError(f"class folder {missing[0]!r} of {str(root)!r} ({k}) is not among the {len(names)} "
                            f"classes{' of the classes file' if config.classes else ' of train/'}: {fix}")
    pre, mode = _choose(root, parts["train"], config.preprocess, seed, str(root))

    def stream(items: list[tuple[str, str]], p: Preprocess, shape: tuple[int, ...] = ()) -> StreamSplit:
        return StreamSplit(str(root), tuple(f for f, _ in items), tuple(index[c] for _, c in items), p, mode=mode,
                           shape=shape, loader_workers=config.loader_workers)

    first = stream(parts["train"][:1], pre).head(1)
    if not pre.resolved:
        mean, std = _statistics(stream(parts["train"], pre, tuple(first.shape[1:])), seed)
        pre = Preprocess(**{**pre.to_json(), "mean": mean, "std": std})
    shape = tuple(first.shape[1:])
    splits = {k: stream(parts[k], pre, shape) for k in ("train", "val", "test")}
    return DataBundle(root.name, splits["train"], splits["val"], splits["test"], len(names), pre.mean or (),
                      pre.std or (), preprocess=pre, file_split=split, class_names=tuple(names))


def unlabelled_split(root: str | Path, bundle: DataBundle, *, loader_workers: int = 0) -> StreamSplit:
    """Every image under `root` (flat, or in sub-folders whose names are ignored) as a split without labels, read as
    `bundle`'s images are: an image folder's preprocessing, or for in-memory data its size and statistics. It
    replaces the training split for recovery, which never reads its labels (`RecoveryConfig.unlabelled`)."""
    folder = Path(root)
    if not folder.is_dir():
        raise DataError(f"recovery data {str(root)!r} is not a folder: give a folder of images (labels not needed)")
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(folder)
        files += [(rel / f).as_posix() for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    if not files:
        raise DataError(f"recovery data {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...): put "
                        "the images to recover on there")
    shape = tuple(bundle.train.sample_shape)
    pre = bundle.preprocess
    if pre is None:
        if shape[1] != shape[2]:
            raise DataError(f"recovery data needs square images to match {bundle.name!r} ({shape[1]}x{shape[2]}): "
                            "save the labelled data as an image folder, whose preprocessing the images then get")
        pre = Preprocess(size=shape[1], mean=bundle.mean or None, std=bundle.std or None, augment=False)
    mode = getattr(bundle.train, "mode", "L" if shape[0] == 1 else "RGB")
    return StreamSplit(str(folder), tuple(files), (NO_LABEL,) * len(files), pre, mode=mode, shape=shape,
                       loader_workers=loader_workers)
