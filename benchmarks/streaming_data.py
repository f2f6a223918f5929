"""Memory and data time of a search on an ImageNet-like folder: streamed images keep memory bounded by the batch.

Generates (once, in parallel, under /tmp) a folder in ImageNet's layout, train/<wnid>/*.JPEG and
val/<wnid>/*.JPEG, of JPEGs 200-500 px on a side in `--classes` class folders, then runs a short search of
torchvision resnet18 (random weights: nothing downloads) at 224x224 with `--workers` evaluation processes (the
default pool: Ray actors where Ray is installed), and reports:

- peak RSS (VmHWM) of the driver and of each worker process, polled from /proc while the search runs;
- the data-loading time of one trial (reading, decoding and preprocessing exactly the batches a trial reads, alone)
  as a share of that trial's time (the trial's own `seconds`, fine-tune and scoring included).

    python benchmarks/streaming_data.py --images 5000
    python benchmarks/streaming_data.py --images 50000
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _write_chunk(args: tuple[str, int, int, int, int]) -> int:
    """Images start..stop of the folder (their class and split follow from the index, so chunks are independent)."""
    from PIL import Image

    root, start, stop, classes, seed = args
    for i in range(start, stop):
        rng = np.random.default_rng(seed + i)
        cls = i % classes
        split = "val" if (i // classes) % 10 == 9 else "train"  # a tenth of each class is the held-out val/
        w, h = (int(v) for v in rng.integers(200, 501, size=2))
        base = np.random.default_rng(cls).integers(0, 256, size=(6, 6, 3))  # each class its own colour layout
        small = np.clip(base + rng.normal(0, 30, size=base.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        folder = Path(root) / split / f"n{cls:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"img_{i:07d}.JPEG", quality=85)
    return stop - start


def generate(root: Path, images: int, classes: int, jobs: int) -> float:
    """The folder of `images` JPEGs (kept: a second run with the same size reuses it); returns seconds spent."""
    marker = root / "generated.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"images": images, "classes": classes}:
        return 0.0
    start = time.perf_counter()
    step = 500
    chunks = [(str(root), a, min(images, a + step), classes, 0) for a in range(0, images, step)]
    with ProcessPoolExecutor(jobs) as pool:
        list(pool.map(_write_chunk, chunks))
    marker.write_text(json.dumps({"images": images, "classes": classes}))
    return time.perf_counter() - start


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _hwm_mb(pid: int) -> tuple[float, str] | None:
    """(peak RSS in MB, role) of a process, or None once it is gone. A process forked by an evaluation worker is
    one of its DataLoader processes (it inherits the worker's title); its RSS counts the pages it shares with it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        parent = Path(f"/proc/{ppid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return None
    role = "other"
    if "EvalActor" in cmd:
        role = "loader process" if "EvalActor" in parent else "evaluation worker"
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024, role
    return None


class PeakWatcher:
    """Polls the peak RSS of every descendant of this process until stopped; `peaks`: pid -> (MB, kind)."""

    def __init__(self, every: float = 0.5) -> None:
        self.peaks: dict[int, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            for pid in _children(os.getpid()):
                got = _hwm_mb(pid)
                if got is not None:
                    mb, cmd = got
                    self.peaks[pid] = (max(mb, self.peaks.get(pid, (0, ""))[0]), cmd.strip()[:48])
            self._stop.wait(every)

    def stop(self) -> dict[int, tuple[float, str]]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def data_seconds(bundle: object, recovery: object) -> float:
    """Seconds to read exactly the batches one trial reads (fine-tune batches, then the scored val batches)."""
    start = time.perf_counter()
    steps = 0
    for _ in bundle.train.batches(recovery.batch_size, shuffle=True, seed=0):  # type: ignore[attr-defined]
        steps += 1
        if steps >= recovery.finetune_steps:  # type: ignore[attr-defined]
            break
    for _ in bundle.val.batches(256, augment=False):  # type: ignore[attr-defined]
        pass
    for _ in bundle.calibration():  # type: ignore[attr-defined]
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--root", default=None, help="folder to generate into (default /tmp/squeezer-bench-N)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes generating images")
    parser.add_argument("--workers", type=int, default=2, help="evaluation workers of the search")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--val-samples", type=int, default=32)
    parser.add_argument("--finetune-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--loader-workers", type=int, default=1)
    args = parser.parse_args()

    root = Path(args.root or f"/tmp/squeezer-bench-{args.images}")
    made = generate(root, args.images, args.classes, args.jobs)
    print(f"folder {root}: {args.images} JPEGs in {args.classes} classes (generated in {made:.0f} s)", flush=True)

    import resource

    import squeezer
    from squeezer.datasets import load_data
    from squeezer.evaluators.data import DataConfig
    from squeezer.evaluators.preprocess import imagenet

    data_config = DataConfig(preprocess=imagenet(), val_samples=args.val_samples,
                             loader_workers=args.loader_workers)
    recovery = squeezer.RecoveryConfig(mode="finetune", finetune_steps=args.finetune_steps,
                                       batch_size=args.batch_size, bn_batches=2)
    watcher = PeakWatcher()
    out = Path(tempfile.mkdtemp(prefix="squeezer-stream-"))
    start = time.perf_counter()
    summary = squeezer.search_policies(
        model="resnet18", data=str(root), out=out,
        search=squeezer.SearchConfig(budget="macs<=70%", trials=args.trials, knobs=("prune",), seed=0),
        recovery=recovery, latency="none", pool=squeezer.PoolConfig(workers=args.workers),
        data_config=data_config)
    seconds = time.perf_counter() - start
    peaks = watcher.stop()
    driver_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    from squeezer.inspection import load_result
    from squeezer.run_folder import read_run

    rows = [r for r in load_result(out).rows if r.completed]
    trial_s = float(np.median([r.seconds for r in rows])) if rows else float("nan")
    bundle = load_data(str(root), config=data_config, split=read_run(out).data_split)
    loading = float(np.median([data_seconds(bundle, recovery) for _ in range(2)]))
    print(f"search: {summary.completed} trials completed, {summary.failed} failed, {seconds:.0f} s in all")
    print(f"peak RSS: driver {driver_mb:.0f} MB")
    for role in ("evaluation worker", "loader process", "other"):
        mbs = sorted((mb for mb, r in peaks.values() if r == role), reverse=True)
        if mbs:
            print(f"peak RSS: {role}s ({len(mbs)}): " + ", ".join(f"{mb:.0f}" for mb in mbs[:6]) + " MB")
    print(f"trial time (median of {len(rows)}): {trial_s:.1f} s; data loading of one trial alone: {loading:.1f} s "
          f"({100 * loading / trial_s:.0f}% of the trial)")


if __name__ == "__main__":
    main()
