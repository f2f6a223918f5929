"""The demo: train ResNet-20 on the bundled digits, search under a budget, apply the best policy."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from squeezer.apply_job import ApplySummary, apply
from squeezer.evaluators.pool import PoolConfig
from squeezer.evaluators.settings import RecoveryConfig
from squeezer.search.config import SearchConfig
from squeezer.search_job import SearchSummary, search_policies
from squeezer.side_by_side import SideBySide, side_by_side
from squeezer.training import TrainResult, train

__all__ = ["DemoSummary", "demo"]


DEMO_BUDGET = "macs<=50%"
# Pruning alone: on inputs this small (8x8) only physically removed channels make the ONNX model both faster and
# smaller. Int8 weights and activations shrink the file too, but their quantize/dequantize steps cost more than
# the tiny convolutions they speed up (benchmarks/RESULTS.md); every knob is one `--knobs` away in `squeezer search`.
DEMO_KNOBS = ("prune",)
# Short but honest: every candidate is distilled from the base for a few steps (a half-pruned ResNet-20 on digits
# scores far lower after BN recalibration alone); latency is timed as in every search.
DEMO_RECOVERY = RecoveryConfig(mode="kd", finetune_steps=30)


@dataclass
class DemoSummary:
    trained: TrainResult | None
    search: SearchSummary
    applied: ApplySummary | None
    compared: SideBySide | None = None  # the applied model beside the base: accuracy, MACs, bytes, latency


def demo(*, out: str | Path = "runs/demo", trials: int = 24, workers: int | None = None, sampler: str = "tpe",
         budget: str = DEMO_BUDGET, progress: bool = False, on_stage: Any = None) -> DemoSummary:
    """The whole story on bundled data in a few minutes: train ResNet-20 on digits (once), search pruning under
    half the MACs, apply the most accurate policy of the front, and measure it beside the base
    (test accuracy, MACs, ONNX bytes, onnxruntime latency timed interleaved), leaving base.onnx beside
    compressed.onnx so that anyone can time both."""
    out = Path(out)
    say = on_stage or (lambda text: None)
    checkpoint = out / "resnet20.pt"
    trained = None
    if not checkpoint.is_file():
        say("training ResNet-20 on the bundled digits")
        trained = train(model="resnet20", data="digits", out=checkpoint, progress=progress)
    say(f"searching {trials} policies under {budget}")
    summary = search_policies(model=str(checkpoint), data="digits", out=out / "search",
                              search=SearchConfig(budget=budget, trials=trials, sampler=sampler, knobs=DEMO_KNOBS,
                                                  repair=True),
                              recovery=DEMO_RECOVERY, pool=PoolConfig(workers=workers), progress=progress)
    applied = None
    if summary.front:
        best = max(summary.front, key=lambda r: r.accuracy)
        say(f"applying trial {best.number}, the most accurate on the front")
        applied = apply(out / "search", trial=best.number, out=out / "compressed.pt", onnx=out / "compressed.onnx")
    compared = None
    if applied is not None and applied.onnx is not None:
        say("timing base.onnx and compressed.onnx side by side")
        compared = side_by_side(base=checkpoint, compressed=applied.out, compressed_onnx=applied.onnx, data="digits",
                                base_onnx=out / "base.onnx")
    return DemoSummary(trained=trained, search=summary, applied=applied, compared=compared)
