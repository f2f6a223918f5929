"""Structured pruning physically removes the channels the space predicts, and the model still exports."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

from squeezer.policies.apply import apply_policy
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import Policy
from squeezer.spaces.space import SearchSpace

MAC_OPS = ("conv", "linear", "matmul", "addmm")


def measured(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    flops = FlopCountAnalysis(model, x)
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    macs = sum(v for k, v in flops.by_operator().items() if k in MAC_OPS)
    params = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return macs, params


@pytest.fixture(params=["resnet", "mobilenet", "resnet18"])
def model_and_input(request):
    model = request.getfixturevalue(request.param)
    x = torch.randn(2, 3, 32, 32) if request.param == "resnet18" else torch.randn(2, 1, 8, 8)
    return model, x


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_uniform_prune_matches_prediction_and_exports(model_and_input, ratio) -> None:
    model, x = model_and_input
    space = SearchSpace.from_model(model, x[:1])
    policy = Policy.uniform(space, prune=ratio)
    pruned = apply_policy(model, policy, example_inputs=x, space=space)
    predicted = space.predict(policy.layers)
    macs, params = measured(pruned, x[:1])
    assert (macs, params) == (predicted.macs, predicted.params)
    assert macs < space.baseline().macs
    assert pruned(x).shape == model(x).shape
    session = ort.InferenceSession(export_onnx(pruned, x), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, pruned(x).detach().numpy(), rtol=1e-3, atol=1e-4)


def test_original_model_is_untouched(resnet) -> None:
    x = torch.randn(1, 1, 8, 8)
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    space = SearchSpace.from_model(resnet, x)
    apply_policy(resnet, Policy.uniform(space, prune=0.5), example_inputs=x, space=space)
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())


def test_same_policy_gives_same_model(resnet) -> None:
    x = torch.randn(1, 1, 8, 8)
    space = SearchSpace.from_model(resnet, x)
    policy = Policy.from_params({"layer2.0.conv1/prune": 0.5, "conv1/prune": 0.5}, space)
    a = apply_policy(resnet, policy, example_inputs=x, space=space).state_dict()
    b = apply_policy(resnet, policy, example_inputs=x, space=space).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_least_important_channels_are_removed(resnet) -> None:
    x = torch.randn(1, 1, 8, 8)
    conv = resnet.layer3[0].conv1
    with torch.no_grad():
        conv.weight[:32] *= 0.01  # make the first half of the filters clearly least important
    space = SearchSpace.from_model(resnet, x)
    pruned = apply_policy(resnet, Policy.from_params({"layer3.0.conv1/prune": 0.5}, space),
                          example_inputs=x, space=space)
    kept = pruned.layer3[0].conv1.weight
    assert kept.shape[0] == 32
    torch.testing.assert_close(kept, resnet.layer3[0].conv1.weight[32:])


@pytest.mark.parametrize("importance", ["l1", "bn"])
def test_importance_criteria(resnet, importance) -> None:
    x = torch.randn(1, 1, 8, 8)
    space = SearchSpace.from_model(resnet, x)
    pruned = apply_policy(resnet, Policy.uniform(space, prune=0.5), example_inputs=x, space=space,
                          importance=importance)
    assert pruned(x).shape == (1, 10)


def test_layer_order_of_a_policy_does_not_change_the_result(resnet) -> None:
    """A policy read back from JSON lists units by name; the model must be pruned as the search pruned it."""
    x = torch.randn(1, 1, 8, 8)
    space = SearchSpace.from_model(resnet, x)
    params = {f"{g}/prune": (0.25, 0.5, 0.75)[i % 3] for i, g in enumerate(space.groups)
              if (0.25, 0.5, 0.75)[i % 3] in space.choices(g, "prune")}
    forward = Policy.from_params(params, space)
    backward = Policy(layers=dict(reversed(list(forward.layers.items()))), fingerprint=forward.fingerprint)
    a = apply_policy(resnet, forward, example_inputs=x, space=space)
    b = apply_policy(resnet, backward, example_inputs=x, space=space)
    for (name, wa), (_, wb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(wa, wb, msg=name)


def test_a_group_loses_the_same_channels_whatever_else_is_pruned(resnet) -> None:
    """Channels are ranked on the untouched model: pruning the stage that feeds a block does not change which of
    the block's inner channels go (ranked after the stage's pruning, the block's conv would be scored on fewer
    input channels)."""
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():  # the block's first conv alone ranks its group (Torch-Pruning normalises each layer)
        resnet.layer2[0].conv2.weight.fill_(0.01)
        resnet.layer2[0].bn1.weight.fill_(1.0)
        resnet.layer2[0].bn1.bias.copy_(torch.arange(32.0))  # names the channels (not part of the ranking)
    space = SearchSpace.from_model(resnet, x)
    alone = apply_policy(resnet, Policy.from_params({"layer2.0.conv1/prune": 0.5}, space), example_inputs=x,
                         space=space)
    both = apply_policy(resnet, Policy.from_params({"conv1/prune": 0.5, "layer2.0.conv1/prune": 0.5}, space),
                        example_inputs=x, space=space)
    assert both.conv1.out_channels == 8 and both.layer2[0].conv1.out_channels == 16
    assert torch.equal(alone.layer2[0].bn1.bias, both.layer2[0].bn1.bias)  # the same channels kept


def test_a_memo_ranks_once_and_gives_the_same_model(resnet) -> None:
    x = torch.randn(1, 1, 8, 8)
    space = SearchSpace.from_model(resnet, x)
    policy = Policy.uniform(space, prune=0.5)
    memo: dict = {}
    first = apply_policy(resnet, policy, example_inputs=x, space=space, memo=memo)
    plans = dict(memo["prune plans l2"])
    again = apply_policy(resnet, policy, example_inputs=x, space=space, memo=memo)
    plain = apply_policy(resnet, policy, example_inputs=x, space=space)
    assert set(plans) == {g for g in space.groups if space.kept(g, 0.5) < space.groups[g].channels}
    assert memo["prune plans l2"] == plans
    for model in (again, plain):
        for (name, a), (_, b) in zip(first.state_dict().items(), model.state_dict().items()):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "squeezenet"])
def test_replaying_the_plans_cuts_as_a_graph_of_the_copy_does(name, request, monkeypatch) -> None:
    """The cut each group's plan replays on the copy equals Torch-Pruning's groups pruned in turn on a graph of the
    copy, also where groups meet in a concatenation (SqueezeNet's fire modules)."""
    import random

    import torchvision

    import squeezer.policies.prune as prune

    if name == "squeezenet":
        torch.manual_seed(0)
        model, x = torchvision.models.squeezenet1_1(num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    else:
        model, x = request.getfixturevalue(name), torch.randn(1, 1, 8, 8)
    with torch.no_grad():  # distinct BatchNorm statistics, so a wrongly kept channel changes the output
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    space = SearchSpace.from_model(model, x, knobs=("prune",))
    rng = random.Random(0)
    policy = Policy.from_params({k: rng.choice(c) for k, c in space.distributions().items()}, space)
    memo: dict = {}
    replayed = apply_policy(model, policy, example_inputs=x, space=space, memo=memo)
    assert all(plan.layers is not None for plan in memo["prune plans l2"].values())
    monkeypatch.setattr(prune, "layer_cuts", lambda *args: None)  # every group pruned on a graph of the copy
    in_turn = apply_policy(model, policy, example_inputs=x, space=space)
    a, b = replayed.state_dict(), in_turn.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(replayed(x), in_turn(x))
