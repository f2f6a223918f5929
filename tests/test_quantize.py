"""Quantization puts weights and activations on their grids, exports QDQ that ONNX Runtime fuses into int8
kernels, and the runtime computes what the fake-quantized torch model computes."""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from squeezer.evaluators.cost import count_macs, measure_cost
from squeezer.policies import quantize
from squeezer.policies.apply import apply_policy
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import Policy
from squeezer.policies.quantize import QuantizedLayer
from squeezer.spaces.space import SearchSpace


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def run_ort(model: bytes, x: torch.Tensor, optimized: Path | None = None) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def wrappers(model: nn.Module) -> list[QuantizedLayer]:
    return [m for m in model.modules() if isinstance(m, QuantizedLayer)]


def output_step(model: nn.Module) -> float:
    """The grid step of the model's last layer output (its logits)."""
    return float(wrappers(model)[-1].out_scale)


def quantized(model: nn.Module, digits, **knobs) -> nn.Module:
    space = SearchSpace.from_model(model, digits.example_inputs(1))
    return apply_policy(model, Policy.uniform(space, **knobs), digits.calibration(2), space=space)


def test_int8_export_fuses_into_qlinearconv_and_matches_torch(trained_resnet, digits, tmp_path) -> None:
    model = quantized(trained_resnet, digits, w_bits=8, a_bits=8)
    exported = export_onnx(model, digits.example_inputs(1))
    ops = collections.Counter(n.op_type for n in onnx.load_from_string(exported).graph.node)
    assert ops["QuantizeLinear"] >= 21 and ops["DequantizeLinear"] >= 21
    x = digits.val.x
    out = run_ort(exported, x, optimized=tmp_path / "optimized.onnx")
    fused = collections.Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert (fused["QLinearConv"], fused["QGemm"]) == (21, 1)  # every conv and the classifier run int8
    assert fused["Conv"] + fused["FusedConv"] + fused["Gemm"] == 0
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(out - expected).max() <= 2 * output_step(model)
    assert (out.argmax(1) == expected.argmax(1)).mean() >= 0.99


@pytest.mark.parametrize("w_bits,a_bits", [(4, 8), (8, 4), (4, 4), (2, 4)])
def test_low_bit_widths_match_onnxruntime(trained_resnet, digits, w_bits, a_bits) -> None:
    """Ties between grids and the runtime's int32 bias are modelled, so even 4-bit activations agree.

    What remains are the int8 kernels' own roundings: one 8-bit step in a layer's output can cross a 4-bit step
    of the next layer's input and move a logit by several steps, so the bound is on almost all logits."""
    model = quantized(trained_resnet, digits, w_bits=w_bits, a_bits=a_bits)
    x = digits.val.x
    out = run_ort(export_onnx(model, x[:1]), x)
    with torch.no_grad():
        expected = model(x).numpy()
    assert (np.abs(out - expected) <= 1.01 * output_step(model)).mean() >= 0.99
    assert (out.argmax(1) == expected.argmax(1)).mean() >= 0.99


def test_weight_only_quantization_exports_exactly(trained_resnet, digits) -> None:
    model = quantized(trained_resnet, digits, w_bits=4)
    assert all(not w.quantize_output and w.a_bits == 32 for w in wrappers(model))
    x = digits.val.x[:64]
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(run_ort(export_onnx(model, x[:1]), x), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("w_bits", [2, 4, 6, 8])
def test_weights_lie_on_the_grid(resnet, digits, w_bits) -> None:
    model = quantized(resnet, digits, w_bits=w_bits, a_bits=8)
    qmax = 63 if w_bits == 8 else 2 ** (w_bits - 1) - 1  # 8 bits: reduced range, see quantize.WEIGHT8
    for wrapper in wrappers(model):
        weight, _, scale = wrapper._folded()
        q = weight.detach() / scale.view(-1, *[1] * (weight.dim() - 1))
        torch.testing.assert_close(q, q.round(), atol=1e-3, rtol=0)
        assert q.abs().max() <= qmax + 1e-3
        assert len(q.round().unique()) > 1


@pytest.mark.parametrize("a_bits", [4, 8])
def test_layer_inputs_take_at_most_2_to_the_a_bits_values(resnet, digits, a_bits, monkeypatch) -> None:
    model = quantized(resnet, digits, w_bits=32, a_bits=a_bits)
    seen: dict[str, torch.Tensor] = {}
    for name, wrapper in model.named_modules():
        if isinstance(wrapper, QuantizedLayer) and isinstance(wrapper.layer, nn.Conv2d):
            forward = wrapper.layer._conv_forward
            monkeypatch.setattr(wrapper.layer, "_conv_forward",
                                lambda x, w, b, f=forward, n=name: seen.setdefault(n, x) is not None and f(x, w, b))
    with torch.no_grad():
        model(digits.val.x)
    assert len(seen) == 21
    for name, x in seen.items():
        assert 1 < len(x.unique()) <= 2 ** a_bits, name


def test_batchnorm_folded_and_relu_absorbed(resnet, digits) -> None:
    model = quantized(resnet, digits, w_bits=8, a_bits=8)
    block = model.layer1[0]
    assert isinstance(block.bn1, nn.Identity) and isinstance(block.bn2, nn.Identity)
    conv1, conv2 = block.conv1, block.conv2
    assert conv1.bn is not None and conv2.bn is not None
    assert conv1.quantize_output and int(conv1.out_zero) == 0  # ReLU follows: the output grid starts at 0
    assert conv2.quantize_output and int(conv2.out_zero) > 0  # the residual add follows: negatives stay


def test_mobilenet_relu6_int8_matches(mobilenet, digits) -> None:
    model = quantized(mobilenet, digits, w_bits=8, a_bits=8)
    x = digits.val.x[:128]
    out = run_ort(export_onnx(model, x[:1]), x)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(out - expected).max() <= 2 * output_step(model)
    hi = [float(w.out_scale) * (255 - int(w.out_zero)) for w in wrappers(model) if w.bn is not None]
    assert max(hi) <= 6.01  # ReLU6 absorbed into the int8 output range


def test_mixed_policy_costs_match_prediction(resnet, digits) -> None:
    x = digits.example_inputs(1)
    space = SearchSpace.from_model(resnet, x)
    policy = Policy.from_params({
        "layer1.0.conv1/prune": 0.5, "layer1.0.conv1/w_bits": 4, "layer1.0.conv1/a_bits": 8,
        "layer2.0.conv2/block": "dwsep", "layer2.0.conv2/w_bits": 8, "layer2.0.conv2/a_bits": 8,
        "layer3.0.conv1/rank": 0.5, "layer3.0.conv1/w_bits": 6, "layer3.0.conv1/a_bits": 4,
        "fc/w_bits": 8, "fc/a_bits": 8,
    }, space)
    model = apply_policy(resnet, policy, digits.calibration(2), space=space)
    predicted = space.predict(policy.layers)
    cost = measure_cost(model, x, policy, space)
    assert count_macs(model, x)[0] == cost["macs"] == predicted.macs
    assert cost["bops"] == pytest.approx(predicted.bops)
    assert [type(m) for m in model.layer3[0].conv1] == [QuantizedLayer] * 3  # every factor layer is quantized
    xv = digits.val.x
    with torch.no_grad():
        expected = model(xv).numpy()
    out = run_ort(export_onnx(model, x), xv)
    assert (out.argmax(1) == expected.argmax(1)).mean() >= 0.99


def test_uint8_weight_mode_keeps_the_full_grid_and_matches(trained_resnet, digits, monkeypatch) -> None:
    monkeypatch.setattr(quantize, "WEIGHT8", "uint8")
    model = quantized(trained_resnet, digits, w_bits=8, a_bits=8)
    weight, _, scale = model.layer2[0].conv1._folded()
    assert (weight.detach() / scale.view(-1, 1, 1, 1)).round().abs().max() == 127
    exported = onnx.load_from_string(export_onnx(model, digits.example_inputs(1)))
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in exported.graph.initializer}
    aliases = {n.output[0]: n.input[0] for n in exported.graph.node if n.op_type == "Identity"}

    def constant(name: str) -> np.ndarray | None:
        while name in aliases:
            name = aliases[name]
        return constants.get(name)

    zero_points = [constant(n.input[2]) for n in exported.graph.node if n.op_type == "DequantizeLinear"]
    weight_zeros = [z for z in zero_points if z is not None and z.ndim == 1]  # per-channel: the weights'
    assert len(weight_zeros) == 22 and all(z.dtype == np.uint8 and (z == 128).all() for z in weight_zeros)
    x = digits.val.x
    out = run_ort(exported.SerializeToString(), x)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(out - expected).max() <= 2 * output_step(model)


def test_same_policy_gives_same_model(resnet, digits) -> None:
    a = quantized(resnet, digits, w_bits=4, a_bits=4).state_dict()
    b = quantized(resnet, digits, w_bits=4, a_bits=4).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("knobs", [dict(w_bits=8, a_bits=8), dict(w_bits=6, a_bits=8), dict(w_bits=4),
                                   dict(w_bits=4, a_bits=8), dict(w_bits=2, a_bits=4)])
def test_onnx_file_size_matches_reported_size(trained_resnet, digits, knobs) -> None:
    """Weights leave as integers (INT4 for widths <= 4) and the size counts every scale, zero point and float bias
    the file stores beside them, so the file is the size the search reports, and the space predicts it exactly."""
    x = digits.example_inputs(1)
    space = SearchSpace.from_model(trained_resnet, x)
    policy = Policy.uniform(space, **knobs)
    model = apply_policy(trained_resnet, policy, digits.calibration(2), space=space)
    exported = export_onnx(model, x)
    size_mb = measure_cost(model, x, policy, space)["size_mb"]
    assert abs(len(exported) / (size_mb * 1e6) - 1) <= 0.05
    assert space.predict(policy.layers).size_bytes / 1e6 == size_mb
    assert len(exported) < len(export_onnx(trained_resnet, x))
    xv = digits.val.x
    with torch.no_grad():
        expected = model(xv).numpy()
    out = run_ort(exported, xv)
    assert (out.argmax(1) == expected.argmax(1)).mean() >= 0.99
