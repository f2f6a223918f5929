"""Does w_bits=8, a_bits=8 on every unit make ResNet-20 faster in ONNX Runtime, and does ORT really run int8?

Exports the float model and the quantized one (and, for contrast, the quantized one without output quantization,
which ORT cannot fuse), counts the QLinearConv/QGemm nodes in ORT's optimised graph, checks torch and ORT agree,
and times each against the float model with the interleaved `LatencyMeter` (batch 1, torch idle meanwhile).
`--size` upsamples the 8x8 digits (bilinear) to time larger activations; `--w-bits 6` shows the int8-weight kernels.
Run: python benchmarks/int8_latency.py [--threads 1] [--runs 300] [--size 8] [--w-bits 8] [--train-steps 80]
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.nn import functional as F

from squeezer.datasets import load_data
from squeezer.evaluators.latency import LatencyMeter
from squeezer.evaluators.finetune import FitConfig, fit
from squeezer.models import resnet20
from squeezer.policies import apply as apply_module
from squeezer.policies.apply import apply_policy
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import Policy
from squeezer.policies.quantize import apply_quantize
from squeezer.spaces.space import SearchSpace


def optimized_ops(model: bytes) -> collections.Counter:
    """Op counts of the graph ORT actually runs (all optimisations, written via optimized_model_filepath)."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: every core)")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=8, help="input height/width (digits are 8x8; larger is upsampled)")
    ap.add_argument("--w-bits", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=80, help="train briefly: agreement on a real model")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_data("digits")
    torch.manual_seed(0)
    model = fit(resnet20(num_classes=10, in_channels=1), data.train, FitConfig(steps=args.train_steps)).eval()
    def resize(t: torch.Tensor) -> torch.Tensor:
        return t if args.size == t.shape[-1] else F.interpolate(t, size=(args.size, args.size), mode="bilinear")

    x, val = resize(data.example_inputs(1)), resize(data.val.x)
    calibration = [resize(b) for b in data.calibration(4)]
    space = SearchSpace.from_model(model, x)
    policy = Policy.uniform(space, w_bits=args.w_bits, a_bits=8)
    int8 = apply_policy(model, policy, calibration, space=space)
    original = dict(apply_module.APPLIERS)
    qdq = functools.partial(apply_quantize, int8_outputs=False)  # one object under both bit widths: it runs once
    apply_module.APPLIERS.update({knob: qdq for knob, applier in original.items() if applier is apply_quantize})
    try:
        qdq_only = apply_policy(model, policy, calibration, space=space)
    finally:
        apply_module.APPLIERS.update(original)

    fp32_onnx, int8_onnx, qdq_onnx = (export_onnx(m, x) for m in (model, int8, qdq_only))
    session = ort.InferenceSession(int8_onnx, providers=["CPUExecutionProvider"])
    ort_out = session.run(None, {"input": val.numpy()})[0]
    with torch.no_grad():
        torch_out = int8(val).numpy()
    agree = float((ort_out.argmax(1) == torch_out.argmax(1)).mean())
    diff, top = np.abs(ort_out - torch_out).max(), np.abs(torch_out).max()
    print(f"resnet20 digits 1x1x{args.size}x{args.size}, every unit w{args.w_bits}a8: torch/ORT argmax agreement "
          f"{agree:.4f}, max |diff| {diff:.3f} (logits up to {top:.1f})")
    variants = (("fp32", fp32_onnx), ("int8 (QDQ + output Q)", int8_onnx), ("QDQ without output Q", qdq_onnx))
    for name, blob in variants:
        ops = optimized_ops(blob)
        print(f"  {name:<22} optimised graph: QLinearConv {ops['QLinearConv']}, QGemm {ops['QGemm']}, "
              f"Conv {ops['Conv'] + ops['FusedConv']}, DequantizeLinear {ops['DequantizeLinear']}")

    meter = LatencyMeter(fp32_onnx, tuple(x.shape), batch=1, threads=args.threads, runs=args.runs, reps=args.reps)
    print(f"latency, batch 1, {meter.threads} ORT thread(s), {meter.reps} x {meter.runs} runs interleaved with fp32:")
    for name, blob in (("int8", int8_onnx), ("QDQ without output Q", qdq_onnx)):
        r = meter.measure(blob)
        print(f"  {name:<22} {r.median_ms * 1e3:7.1f} us (p90 {r.p90_ms * 1e3:.1f}, spread {r.spread:.2f}) vs fp32 "
              f"{r.ref_ms * 1e3:7.1f} us (spread {r.ref_spread:.2f}): {r.rel:.2f}x fp32")


if __name__ == "__main__":
    main()
