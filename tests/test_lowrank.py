"""Low-rank decomposition builds the factor layers the space predicts, they compute what the layer did, and the
decompositions are cached and repeatable."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from squeezer.evaluators.cost import count_macs
from squeezer.policies import lowrank
from squeezer.policies.apply import apply_policy
from squeezer.policies.export import export_onnx
from squeezer.policies.policy import Policy
from squeezer.spaces.space import SearchSpace

from model_checks import layer_params, relative_error, rows_match


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def onnx_output(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(export_onnx(model, x), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("name,decomposition", [
    ("resnet", "tucker"), ("resnet", "cp"), ("mobilenet", "tucker"), ("mobilenet", "cp"), ("resnet18", "tucker"),
    ("resnet18", "cp"),
])
def test_uniform_rank_matches_prediction_and_exports(request, name, decomposition) -> None:
    model = request.getfixturevalue(name)
    x = torch.randn(2, 3, 32, 32) if name == "resnet18" else torch.randn(2, 1, 8, 8)
    # CP of ResNet-18's 256/512-channel kernels is slow, so CP there covers the first two stages only.
    include = ("conv1", "layer1.*", "layer2.*") if (name, decomposition) == ("resnet18", "cp") else ("*",)
    space = SearchSpace.from_model(model, x[:1], decomposition=decomposition, include=include)
    policy = Policy.uniform(space, rank=0.5)
    assert policy.layers, "the space offers no rank choice"
    factored = apply_policy(model, policy, example_inputs=x, space=space)
    predicted = space.predict(policy.layers)
    assert (count_macs(factored, x)[0], layer_params(factored)) == (predicted.macs, predicted.params)
    assert rows_match(factored, space, policy)
    assert predicted.macs < space.baseline().macs
    for unit in policy.layers:
        assert isinstance(factored.get_submodule(unit), nn.Sequential)
    with torch.no_grad():
        out = factored(x).numpy()
    np.testing.assert_allclose(onnx_output(factored, x), out, rtol=1e-3, atol=1e-4)


def test_factor_layers_have_the_predicted_form(resnet) -> None:
    x = torch.randn(1, 1, 8, 8)
    for decomposition, kinds in (("tucker", [(1, 1), (3, 3), (1, 1)]), ("cp", [(1, 1), (3, 1), (1, 3), (1, 1)])):
        space = SearchSpace.from_model(resnet, x, decomposition=decomposition)
        policy = Policy.from_params({"layer2.0.conv2/rank": 0.5, "fc/rank": 0.5}, space)
        model = apply_policy(resnet, policy, example_inputs=x, space=space)
        chain = model.layer2[0].conv2
        assert [m.kernel_size for m in chain] == kinds
        assert chain[0].in_channels == 32 and chain[-1].out_channels == 32
        if decomposition == "cp":  # the two spatial factors are depthwise
            assert chain[1].groups == chain[1].in_channels == chain[2].groups
        assert [type(m) for m in model.fc] == [nn.Linear, nn.Linear] and model.fc[1].bias is not None


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=True),
    lambda: nn.Conv2d(16, 24, 1, stride=2, bias=True),
    lambda: nn.Linear(40, 24),
])
def test_full_rank_factorisation_is_exact(make) -> None:
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(4, 40) if isinstance(layer, nn.Linear) else torch.randn(4, 16, 9, 9)
    space = SearchSpace.from_model(nn.Sequential(layer), x[:1])
    info = space.units["0"].layer
    factored = lowrank.decompose(layer, info, 1.0, round_to=8)
    with torch.no_grad():
        assert relative_error(factored(x), layer(x)) < 1e-5


@pytest.mark.parametrize("decomposition", ["tucker", "cp"])
def test_error_falls_as_rank_grows(decomposition) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1, bias=False)
    x = torch.randn(8, 32, 8, 8)
    info = SearchSpace.from_model(nn.Sequential(conv), x[:1]).units["0"].layer
    with torch.no_grad():
        errors = [relative_error(lowrank.decompose(conv, info, r, 8, decomposition, largest=0.75)(x), conv(x))
                  for r in (0.25, 0.5, 0.75)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("decomposition", ["tucker", "cp"])
def test_cold_and_cached_applies_give_identical_weights(resnet, decomposition) -> None:
    x = torch.randn(1, 1, 8, 8)
    space = SearchSpace.from_model(resnet, x, decomposition=decomposition)
    policy = Policy.from_params({"layer1.0.conv1/rank": 0.5, "layer3.1.conv2/rank": 0.25, "fc/rank": 0.5,
                                 "layer2.0.downsample.0/rank": 0.5, "layer2.0.conv1/prune": 0.5}, space)
    lowrank.clear_cache()
    cold = apply_policy(resnet, policy, example_inputs=x, space=space).state_dict()
    assert lowrank._cache, "nothing was cached"
    warm = apply_policy(resnet, policy, example_inputs=x, space=space).state_dict()
    assert cold.keys() == warm.keys() and all(torch.equal(cold[k], warm[k]) for k in cold)


def test_cache_skips_recomputation_and_stays_bounded(monkeypatch) -> None:
    calls = []
    original = lowrank._hosvd_factors
    monkeypatch.setattr(lowrank, "_hosvd_factors", lambda w: calls.append(1) or original(w))
    monkeypatch.setattr(lowrank, "CACHE_SIZE", 2)
    lowrank.clear_cache()
    torch.manual_seed(0)
    convs = [nn.Conv2d(16, 16, 3, padding=1) for _ in range(3)]
    info = SearchSpace.from_model(nn.Sequential(convs[0]), torch.randn(1, 16, 8, 8)).units["0"].layer
    for ratio in (0.5, 0.25):  # a second rank of the same weights is a truncation, not a new decomposition
        lowrank.decompose(convs[0], info, ratio, 8)
    assert len(calls) == 1
    for conv in convs:
        lowrank.decompose(conv, info, 0.5, 8)
    assert len(calls) == 3 and len(lowrank._cache) == 2  # the least recently used entry was dropped
    lowrank.decompose(convs[0], info, 0.5, 8)
    assert len(calls) == 4
