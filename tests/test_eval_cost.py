"""Measured cost: MACs equal a hand count, BOPs/size follow the bit widths, and match the space's prediction."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from squeezer.evaluators.cost import count_macs, measure_cost
from squeezer.policies.apply import apply_policy
from squeezer.policies.policy import Policy
from squeezer.spaces.space import SearchSpace


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, stride=2, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


def test_macs_equal_hand_count() -> None:
    model = Tiny().eval()
    x = torch.randn(3, 1, 8, 8)
    hand = 8 * 8 * 4 * 1 * 9 + 4 * 4 * 8 * 4 * 9 + 128 * 10
    total, per_module = count_macs(model, x)
    assert total == hand
    assert per_module["conv1"] == 8 * 8 * 4 * 9 and per_module["fc"] == 1280
    space = SearchSpace.from_model(model, x[:1])
    cost = measure_cost(model, x, Policy(), space)
    assert cost["macs"] == hand
    assert cost["params"] == sum(p.numel() for p in model.parameters())
    assert cost["bops"] == hand * 32 * 32
    assert cost["size_mb"] == pytest.approx(cost["params"] * 4 / 1e6)


def test_quantized_bops_and_size_follow_bits(resnet, digits) -> None:
    x = digits.example_inputs(1)
    space = SearchSpace.from_model(resnet, x)
    policy = Policy.uniform(space, w_bits=8, a_bits=8)
    model = apply_policy(resnet, policy, digits.calibration(2), space=space)
    cost = measure_cost(model, x, policy, space)
    predicted = space.predict(policy.layers)
    assert cost["macs"] == predicted.macs
    assert cost["bops"] == pytest.approx(predicted.bops)
    assert cost["size_mb"] == predicted.size_bytes / 1e6  # the same rule prices scales, zero points and biases
    factored = Policy.uniform(space, rank=0.5, w_bits=4, a_bits=4)  # every layer of each form has its quantizers
    model = apply_policy(resnet, factored, digits.calibration(1), space=space)
    assert measure_cost(model, x, factored, space)["size_mb"] == space.predict(factored.layers).size_bytes / 1e6


def test_pruned_macs_match_prediction(resnet, digits) -> None:
    x = digits.example_inputs(1)
    space = SearchSpace.from_model(resnet, x)
    policy = Policy.uniform(space, prune=0.5)
    model = apply_policy(resnet, policy, digits.calibration(1), space=space)
    cost = measure_cost(model, x, policy, space)
    assert cost["macs"] == space.predict(policy.layers).macs < space.baseline().macs
    assert cost["params"] == sum(p.numel() for p in model.parameters())
