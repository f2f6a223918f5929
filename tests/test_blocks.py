"""Block swaps build the depthwise-separable blocks the space predicts, the fit makes them mimic the original
convolutions (also on data it never saw), and swapping every unit of ResNet-20 stays fast."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from squeezer.evaluators.cost import count_macs
from squeezer.evaluators.finetune import evaluate
from squeezer.policies import blocks
from squeezer.policies.apply import apply_policy
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import LayerChoice, Policy, PolicyError
from squeezer.policies.quantize import QuantizedLayer
from squeezer.spaces.block_shapes import DEFAULT_GRID
from squeezer.spaces.knobs import SpaceConfig
from squeezer.spaces.space import SearchSpace

from model_checks import layer_params, relative_error, rows_match


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.mark.parametrize("name", ["resnet", "mobilenet", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_dwsep_matches_prediction_and_exports(request, digits, name) -> None:
    model = request.getfixturevalue(name)
    if name == "resnet18":
        calibration = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    else:
        calibration = digits.calibration(2, batch_size=32)
    x = calibration[0][:4]
    space = SearchSpace.from_model(model, x[:1])
    policy = Policy.uniform(space, block="dwsep")
    assert policy.layers, "the space offers no block swap"
    swapped = apply_policy(model, policy, calibration, space=space)
    predicted = space.predict(policy.layers)
    assert (count_macs(swapped, x)[0], layer_params(swapped)) == (predicted.macs, predicted.params)
    assert rows_match(swapped, space, policy)
    for unit in policy.layers:
        original, block = model.get_submodule(unit), swapped.get_submodule(unit)
        depthwise, bn, pointwise = block
        assert depthwise.groups == depthwise.in_channels == original.in_channels
        assert depthwise.kernel_size == original.kernel_size and depthwise.stride == original.stride
        assert isinstance(bn, nn.BatchNorm2d) and pointwise.kernel_size == (1, 1)
        assert pointwise.out_channels == original.out_channels
    session = ort.InferenceSession(export_onnx(swapped, x), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        out = swapped(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], out, rtol=1e-3, atol=1e-4)


def test_prune_rank_and_block_together_match_prediction(resnet, digits) -> None:
    x = digits.example_inputs(1)
    space = SearchSpace.from_model(resnet, x)
    policy = Policy.from_params({
        "conv1/prune": 0.5, "layer1.0.conv1/prune": 0.5, "layer1.0.conv1/block": "dwsep",
        "layer2.0.conv1/prune": 0.25, "layer2.0.conv2/block": "dwsep", "layer2.1.conv1/rank": 0.5,
        "layer3.0.conv1/block": "dwsep", "layer3.0.conv2/rank": 0.25, "fc/rank": 0.5,
    }, space)
    model = apply_policy(resnet, policy, digits.calibration(1), space=space)
    predicted = space.predict(policy.layers)
    assert (count_macs(model, x)[0], layer_params(model)) == (predicted.macs, predicted.params)
    assert model.layer1[0].conv1[0].in_channels == 8  # the swapped block sits on pruned channels


def test_fit_lowers_block_error_on_unseen_data(trained_resnet, digits) -> None:
    """The least-squares fit beats the SVD initialisation on validation inputs, not only on the fit batches."""
    unit = trained_resnet.layer2[1].conv1
    fit_inputs = blocks.capture_inputs(trained_resnet, unit, digits.calibration(4))
    val_inputs = blocks.capture_inputs(trained_resnet, unit, [digits.val.x])
    with torch.no_grad():
        fit_targets = [unit(x) for x in fit_inputs]
        val_targets = [unit(x) for x in val_inputs]
    block = blocks.dwsep_block(unit)
    blocks.set_bn_stats(block, fit_inputs)
    before = blocks.block_error(block, val_inputs, val_targets)
    after_fit = blocks.refit(block, fit_inputs, fit_targets)
    after = blocks.block_error(block, val_inputs, val_targets)
    assert after < 0.8 * before
    assert after_fit <= after * 1.5  # and it did not overfit the 256 fit samples badly
    steps_error = blocks.distill(block, fit_inputs, fit_targets, steps=10)  # optional Adam steps never hurt
    assert steps_error <= after_fit + 1e-6


def test_swapping_every_unit_and_fitting_keeps_accuracy(trained_resnet, digits) -> None:
    """All 19 ResNet-20 convs swapped: the closed-form fit recovers what the unfitted swap loses."""
    x = digits.example_inputs(1)
    space = SearchSpace.from_model(trained_resnet, x)
    policy = Policy.uniform(space, block="dwsep")
    assert len(policy.layers) == 19
    fitted = apply_policy(trained_resnet, policy, digits.calibration(4), space=space)
    unfitted = apply_policy(trained_resnet, policy, example_inputs=x, space=space)  # no calibration: no fit
    with torch.no_grad():
        reference = trained_resnet(digits.val.x)
        fitted_error = relative_error(fitted(digits.val.x), reference)
        unfitted_error = relative_error(unfitted(digits.val.x), reference)
    assert fitted_error < 0.5 * unfitted_error
    assert evaluate(fitted, digits.val)[0] > 0.85 > evaluate(unfitted, digits.val)[0]


def test_same_policy_gives_same_weights(resnet, digits) -> None:
    x = digits.example_inputs(1)
    space = SearchSpace.from_model(resnet, x)
    policy = Policy.from_params({"layer1.1.conv2/block": "dwsep", "layer2.0.conv1/block": "dwsep",
                                 "layer2.0.conv1/prune": 0.5}, space)
    a = apply_policy(resnet, policy, digits.calibration(2), space=space, distill_steps=3).state_dict()
    b = apply_policy(resnet, policy, digits.calibration(2), space=space, distill_steps=3).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_depthwise_fit_handles_stride_dilation_and_bias() -> None:
    """The unfolded-patch solve matches the conv's geometry: a block that can represent the target is recovered."""
    torch.manual_seed(0)
    target = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=8, bias=False),
                           nn.Conv2d(8, 12, 1, bias=True)).eval()
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, bias=True)
    inputs = [torch.randn(16, 8, 9, 9) for _ in range(2)]
    with torch.no_grad():
        targets = [target(x) for x in inputs]
    block = blocks.dwsep_block(conv)
    blocks.set_bn_stats(block, inputs)
    assert blocks.block_error(block, inputs, targets) > 0.5
    assert blocks.refit(block, inputs, targets, sweeps=20) < 0.05


# ---- the compact-block families ---------------------------------------------------------------------------------
FAMILY_VALUES = ["invres:2", "fire:0.25", "shuffle:4", "spatial:0.5", "bottleneck:0.5"]


def _run_ort(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(export_onnx(model, x[:1]), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def _swap_all(space: SearchSpace, value: str) -> Policy:
    """Every unit offering the family swapped to `value`, or to the family's first offered value where `value`
    builds the same block as another (the space offers one value per shape)."""
    params = {f"{unit}/block": _pick(space, unit, value) for unit in space.units if _pick(space, unit, value)}
    return Policy.from_params(params, space)


def _pick(space: SearchSpace, unit: str, value: str) -> str | None:
    offered = [v for v in space.choices(unit, "block") if v.partition(":")[0] == value.partition(":")[0]]
    return (value if value in offered else offered[0]) if offered else None


@pytest.mark.parametrize("value", [*FAMILY_VALUES, "invres:0.5"])
def test_family_matches_prediction_and_exports(resnet, digits, value) -> None:
    """Every unit that offers the family is swapped: MACs and params are what the space predicted, each block keeps
    the unit's shapes, and ONNX Runtime computes what torch does (a narrowing expansion too, given in the grid)."""
    calibration = digits.calibration(2, batch_size=32)
    x = calibration[0][:4]
    space = SearchSpace.from_model(resnet, x[:1], SpaceConfig(choices={"block": (*DEFAULT_GRID, value)}))
    policy = _swap_all(space, value)
    assert len(policy.layers) >= 15, "the family is offered on too few units"
    swapped = apply_policy(resnet, policy, calibration, space=space)
    predicted = space.predict(policy.layers)
    assert (count_macs(swapped, x[:1])[0], layer_params(swapped)) == (predicted.macs, predicted.params)
    assert rows_match(swapped, space, policy)
    for unit in policy.layers:
        assert not isinstance(swapped.get_submodule(unit), nn.Conv2d)
        with torch.no_grad():
            inputs = blocks.capture_inputs(resnet, resnet.get_submodule(unit), [x])[0]
            assert swapped.get_submodule(unit)(inputs).shape == resnet.get_submodule(unit)(inputs).shape
    with torch.no_grad():
        out = swapped(x).numpy()
    np.testing.assert_allclose(_run_ort(swapped, x), out, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("family, ladder", [
    ("spatial", ["spatial:0.25", "spatial:0.5", "spatial:1"]),
    ("bottleneck", ["bottleneck:0.25", "bottleneck:0.5", "bottleneck:1"]),
    ("invres", ["invres:0.25", "invres:0.5", "invres:1", "invres:3", "invres:9"]),
    ("fire", ["fire:0.125", "fire:0.25", "fire:0.5"]),
    ("shuffle", ["shuffle:8", "shuffle:4", "shuffle:2"]),
])
def test_fit_error_falls_with_capacity(family, ladder) -> None:
    """The closed-form start and the least-squares fit after it both get closer as the sub-choice gives the family
    more capacity; the fit never does worse than its start."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1, bias=True).eval()
    inputs = [torch.randn(8, 32, 10, 10) for _ in range(2)]
    with torch.no_grad():
        targets = [conv(x) for x in inputs]
    starts, fits = [], []
    for value in ladder:
        block = blocks.swap_block(conv, value, round_to=8)
        blocks.set_block_bn_stats(block, inputs)
        starts.append(blocks.block_error(block, inputs, targets))
        fits.append(blocks.refit_heads(block, inputs, targets))
    assert starts == sorted(starts, reverse=True) and starts[0] > starts[-1]
    assert fits == sorted(fits, reverse=True) and all(f <= s + 1e-6 for f, s in zip(fits, starts))
    if family in ("bottleneck", "invres"):  # full capacity reproduces the kernel exactly
        assert starts[-1] < 1e-4


def test_spatial_factorisation_keeps_stride_padding_and_dilation() -> None:
    """A kernel of spatial rank 4 is reproduced exactly by a factorisation of rank 6, on a strided, dilated,
    asymmetrically padded conv."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(2, 1), dilation=(2, 1), bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("rcy,nrx->ncyx", torch.randn(4, 6, 3), torch.randn(10, 4, 5)))
    block = blocks.swap_block(conv, "spatial:1", round_to=8)
    x = torch.randn(2, 6, 13, 11)
    with torch.no_grad():
        assert relative_error(block(x), conv(x)) < 1e-5


@pytest.mark.parametrize("value", FAMILY_VALUES)
def test_family_composes_with_prune_and_bits(resnet, digits, value) -> None:
    """A swapped unit pruned at its outputs (and inputs) and quantized: the cost is as predicted and ONNX Runtime
    agrees with torch."""
    x = digits.example_inputs(1)
    space = SearchSpace.from_model(resnet, x)
    unit = "layer2.0.conv1"  # stride 2, its output group prunable, its input the pruned stage-1 group
    policy = Policy.from_params({
        f"{unit}/block": _pick(space, unit, value), f"{unit}/prune": 0.5, "conv1/prune": 0.5, f"{unit}/w_bits": 4,
        f"{unit}/a_bits": 8, "layer2.1.conv1/block": _pick(space, "layer2.1.conv1", value),
        "layer2.1.conv1/w_bits": 8,
    }, space)
    model = apply_policy(resnet, policy, digits.calibration(2), space=space)
    predicted = space.predict(policy.layers)
    assert (count_macs(model, x)[0], layer_params(model)) == (predicted.macs, predicted.params)
    assert sum(isinstance(m, QuantizedLayer) for m in model.get_submodule(unit).modules()) >= 2
    xv = digits.val.x[:256]
    with torch.no_grad():
        expected = model(xv).numpy()
    out = _run_ort(model, xv)
    assert (out.argmax(1) == expected.argmax(1)).mean() >= 0.99


def test_old_policy_files_still_load_and_families_round_trip(resnet, digits, tmp_path) -> None:
    x = digits.example_inputs(1)
    space = SearchSpace.from_model(resnet, x)
    old = {"format": "squeezer.policy", "version": 1, "fingerprint": space.fingerprint, "meta": {},
           "layers": {"layer1.0.conv1": {"block": "dwsep", "prune": 0.5}, "layer1.0.conv2": {"block": "keep"}}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    policy = Policy.load(path).validate(space)
    assert policy.layers["layer1.0.conv1"].block == "dwsep" and policy.layers["layer1.0.conv2"].block == "keep"
    model = apply_policy(resnet, policy, digits.calibration(1), space=space)
    assert isinstance(model.layer1[0].conv1[1], nn.BatchNorm2d)
    new = Policy.from_params({"layer1.0.conv1/block": "fire:0.125", "layer3.0.conv2/block": "invres:2"}, space)
    again = Policy.load(new.save(tmp_path / "new.json")).validate(space)
    assert again.layers == new.layers


@pytest.mark.parametrize("value", ["fire", "invres:2.5", "shuffle:3", "spatial:0", "bogus:1", "bottleneck"])
def test_a_block_the_unit_cannot_take_is_refused_in_one_line(resnet, value) -> None:
    space = SearchSpace.from_model(resnet, torch.randn(1, 1, 28, 28))
    with pytest.raises(PolicyError) as info:
        Policy(layers={"layer1.0.conv1": LayerChoice(block=value)}, fingerprint=space.fingerprint).validate(space)
    assert "not offered" in str(info.value) and "\n" not in str(info.value)
