"""The search space: units, coupled channel groups, knob choices, restriction and cost prediction."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from squeezer.spaces.graph import SpaceError
from squeezer.spaces.knobs import SpaceConfig, kept_channels
from squeezer.spaces.space import SearchSpace

X8 = torch.randn(1, 1, 8, 8)


def test_resnet_residual_channels_form_one_group(resnet) -> None:
    space = SearchSpace.from_model(resnet, X8)
    stem = space.groups["conv1"]
    # The stem and every block's second conv in stage 1 add into the same residual stream.
    assert set(stem.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    # Only the group leader carries the prune knob; other producers follow it.
    assert space.choices("conv1", "prune") and not space.choices("layer1.0.conv2", "prune")
    # The classifier output is never pruned.
    assert "fc" not in space.groups and not space.choices("fc", "prune")


def test_depthwise_conv_shares_its_group(mobilenet) -> None:
    space = SearchSpace.from_model(mobilenet, X8)
    dw = space.units["features.4.block.3"]
    assert dw.layer.kind == "dwconv"
    assert dw.out_group == dw.in_group == "features.4.block.0"
    assert not space.choices("features.4.block.3", "rank") and not space.choices("features.4.block.3", "block")


def test_kept_channels_round_to_multiples_of_eight() -> None:
    assert kept_channels(64, 0.3, 8) == 48
    assert kept_channels(64, 0.75, 8) == 16
    assert kept_channels(16, 0.9, 8) == 8
    assert kept_channels(10, 0.5, 8) == 8  # never below one step


def test_prune_choices_are_distinct_widths(resnet) -> None:
    space = SearchSpace.from_model(resnet, X8)
    widths = [space.kept("layer3.0.conv1", r) for r in space.choices("layer3.0.conv1", "prune")]
    assert widths == sorted(set(widths), reverse=True) and all(w % 8 == 0 for w in widths)


def test_knob_applicability(resnet) -> None:
    space = SearchSpace.from_model(resnet, X8)
    blocks = space.choices("layer1.0.conv1", "block")
    assert blocks[0] == "keep" and "dwsep" in blocks and {b.partition(":")[0] for b in blocks} >= {
        "invres", "fire", "shuffle", "spatial", "bottleneck"}
    assert not space.choices("fc", "block")
    assert 1.0 in space.choices("fc", "rank") or not space.choices("fc", "rank")
    assert space.choices("layer2.0.downsample.0", "rank")[0] == 1.0  # a 1x1 conv factors by SVD


def test_restriction_by_knob_pattern_and_choice(resnet) -> None:
    space = SearchSpace.from_model(resnet, X8, knobs=("prune", "w_bits"), include=("layer3.*",),
                                   choices={"w_bits": (4, 8)})
    names = {name.split("/")[0] for name in space.distributions()}
    knobs = {name.split("/")[1] for name in space.distributions()}
    assert all(n.startswith("layer3.") for n in names)
    assert knobs == {"prune", "w_bits"}
    assert space.choices("layer3.0.conv1", "w_bits") == (32, 8, 4)
    full = SearchSpace.from_model(resnet, X8)
    assert space.size() < full.size()


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown knob"):
        SpaceConfig(knobs=("prune", "sparsity"))


def test_model_that_fails_on_inputs_gives_clear_error(resnet) -> None:
    with pytest.raises(SpaceError, match="fails on inputs of shape"):
        SearchSpace.from_model(resnet, torch.randn(1, 3, 8, 8))


def test_model_without_layers_is_refused() -> None:
    with pytest.raises(SpaceError, match="no convolution, Linear"):
        SearchSpace.from_model(nn.Sequential(nn.ReLU()), X8)


def test_fingerprint_depends_on_shapes(resnet, mobilenet) -> None:
    a = SearchSpace.from_model(resnet, X8).fingerprint
    assert a == SearchSpace.from_model(resnet, X8).fingerprint
    assert a != SearchSpace.from_model(mobilenet, X8).fingerprint


def test_table_lists_every_unit(resnet) -> None:
    space = SearchSpace.from_model(resnet, X8)
    rows = space.table()
    assert [r["unit"] for r in rows] == list(space.units)
    assert sum(r["macs"] for r in rows) == space.baseline().macs


def test_shuffle_net_groups_are_refused_not_broken() -> None:
    import torchvision

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    space = SearchSpace.from_model(model, torch.randn(1, 3, 32, 32))
    assert space.units and space.size() > 1  # the model still gets its other knobs


def test_unit_costs_add_up_to_the_prediction(resnet) -> None:
    from squeezer.policies.policy import Policy

    space = SearchSpace.from_model(resnet, X8)
    policy = Policy.uniform(space, prune=0.5)
    costs = space.unit_costs(policy.layers)
    assert set(costs) == set(space.units)
    assert sum(m for m, _ in costs.values()) == space.predict(policy.layers).macs
    assert all(m <= space.unit_costs({})[u][0] for u, (m, _) in costs.items())


class TwoHeads(nn.Module):
    """A trunk with a conv head (a 1x1 conv classifier, then pooling) and a linear head, returned in a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.seg = nn.Conv2d(16, 5, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.trunk(x))
        return {"seg": torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.seg(h)), 1), 1),
                "cls": self.fc(h.mean((2, 3)))}


def test_every_layer_that_reaches_an_output_keeps_its_channels() -> None:
    import torchvision

    from squeezer.policies.apply import apply_policy
    from squeezer.policies.policy import Policy

    squeeze = torchvision.models.squeezenet1_1(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    space = SearchSpace.from_model(squeeze, x)
    assert [u for u, unit in space.units.items() if unit.layer.is_output] == ["classifier.1"]
    assert apply_policy(squeeze, Policy.uniform(space, prune=0.5), example_inputs=x, space=space)(x).shape == (1, 10)
    heads = TwoHeads().eval()
    space = SearchSpace.from_model(heads, X8)
    assert {u for u, unit in space.units.items() if unit.layer.is_output} == {"seg", "fc"}
    assert space.choices("trunk.0", "prune") and not space.choices("seg", "prune")
    out = apply_policy(heads, Policy.uniform(space, prune=0.5), example_inputs=X8, space=space)(X8)
    assert out["seg"].shape == (1, 5) and out["cls"].shape == (1, 3)


def test_a_finer_channel_rounding_reaches_six_percent_of_resnet20_with_pruning_alone(resnet) -> None:
    from squeezer.search.budget import Budget, BudgetError
    from squeezer.search.shrink import cheapest_policy
    from tests.fakes import FakeEvaluator

    coarse = SearchSpace.from_model(resnet, X8, SpaceConfig(knobs=("prune",)))
    fine = SearchSpace.from_model(resnet, X8, SpaceConfig(knobs=("prune",), round_to=4))
    # a 16-channel group: two widths at multiples of 8, four at multiples of 4
    assert [fine.kept("conv1", r) for r in fine.choices("conv1", "prune")] == [16, 12, 8, 4]
    assert len(coarse.choices("conv1", "prune")) == 2
    assert coarse.kept("layer3.0.conv1", coarse.choices("layer3.0.conv1", "prune")[-1]) == 8  # the grid goes to 7/8
    cheapest = fine.predict(cheapest_policy(fine, "macs").layers).macs / fine.baseline().macs
    assert cheapest < 0.05
    Budget.parse("macs<=6%").check_reachable(fine, FakeEvaluator(fine).base())
    with pytest.raises(BudgetError, match=r"smaller --channel-round than 8"):
        Budget.parse("macs<=6%").check_reachable(coarse, FakeEvaluator(coarse).base())
