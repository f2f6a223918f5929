"""Block swaps build the depthwise-separable blocks the space predicts, the fit makes them mimic the original
convolutions (also on data it never saw), and swapping every unit of ResNet-20 stays fast."""
from __future__ import annotations


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
from squeezer.policies.policy import Policy
from squeezer.spaces.space import SearchSpace

from model_checks import layer_params, relative_error


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
