"""The base model and a compressed one measured side by side, as a user would compare the two files they hold:
test accuracy, MACs, ONNX bytes on disk and onnxruntime latency, both timed in the same interleaved runs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from squeezer.datasets import load_data
from squeezer.evaluators.finetune import evaluate
from squeezer.evaluators.latency import LatencyMeter
from squeezer.evaluators.mac_count import forward_macs
from squeezer.models import resolve_source
from squeezer.policies.export import export_onnx, with_metadata

__all__ = ["Column", "SideBySide", "side_by_side"]


@dataclass(frozen=True, kw_only=True)
class Column:
    onnx: Path
    test_accuracy: float
    macs: int
    onnx_bytes: int
    latency_ms: float


@dataclass(frozen=True, kw_only=True)
class SideBySide:
    base: Column
    compressed: Column

    @property
    def speedup(self) -> float:
        return self.base.latency_ms / max(1e-12, self.compressed.latency_ms)

    @property
    def faster(self) -> bool:
        return self.speedup > 1.0

    @property
    def smaller(self) -> bool:
        return self.compressed.onnx_bytes < self.base.onnx_bytes


def side_by_side(*, base: str | Path, compressed: str | Path, compressed_onnx: str | Path, data: str,
                 base_onnx: str | Path, threads: int | None = None) -> SideBySide:
    """Export the base model (a checkpoint) to `base_onnx` beside the compressed model's ONNX file and measure both
    alike. Latency: one LatencyMeter times the two files in alternating blocks of runs, so drift of a busy machine
    falls on both; the compressed model's time is the base's times their median ratio."""
    bundle = load_data(data)
    columns = {}
    for name, source in (("base", base), ("compressed", compressed)):
        net, _ = resolve_source(str(source), bundle)
        net = net.cpu().eval()
        accuracy, _ = evaluate(net, bundle.test, device="cpu")
        macs = int(forward_macs(net, bundle.example_inputs(), names=())[0])
        columns[name] = (net, accuracy, macs)
    base_path, compressed_path = Path(base_onnx), Path(compressed_onnx)
    base_path.write_bytes(with_metadata(export_onnx(columns["base"][0], bundle.example_inputs()),
                                        bundle.preprocessing()))
    base_bytes, compressed_bytes = base_path.read_bytes(), compressed_path.read_bytes()
    meter = LatencyMeter(base_bytes, bundle.input_shape, batch=1, threads=threads, reps=4)
    timed = meter.measure(compressed_bytes)

    def column(name: str, path: Path, size: int, ms: float) -> Column:
        _, accuracy, macs = columns[name]
        return Column(onnx=path, test_accuracy=accuracy, macs=macs, onnx_bytes=size, latency_ms=ms)

    return SideBySide(base=column("base", base_path, len(base_bytes), timed.ref_ms),
                      compressed=column("compressed", compressed_path, len(compressed_bytes),
                                        timed.ref_ms * timed.rel))
